"""DICOM header helpers shared by ``convert`` and ``screen``: scan folders, group series, pick phases.

Everything here reads headers with pydicom (``stop_before_pixels``) and, for the blood-pool heuristic, the
pixel data of a handful of slices. No NIfTI is written here; dcm2niix does the conversion in ``convert``.

File policy (what a file in a patient's DICOM folder may be):

- hidden files (``.*``) and documentation/sidecar files by name (``README``, ``*.txt``, ``*.json`` ...) are
  ignored and listed in the QC record;
- DICOM objects that are not images (DICOMDIR / media directory, structured reports, presentation states)
  and secondary captures (dose reports, screenshots) are ignored and listed;
- anything else must be a readable DICOM image with complete pixel data, or the patient fails with an
  :class:`~cpmn.errors.InputError` naming the file ("not a DICOM file", "corrupt DICOM", "truncated pixel
  data"); an image whose Modality is not CT fails the patient too (the folder is the wrong study).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from cpmn.config import schema_defaults
from cpmn.errors import InputError

#: the ``convert:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("convert")

PHASES = ("nct", "ctpa")

_DOC_SUFFIXES = {
    ".txt",
    ".md",
    ".json",
    ".xml",
    ".html",
    ".htm",
    ".pdf",
    ".ini",
    ".csv",
    ".tsv",
    ".log",
    ".nii",
}
_DOC_NAMES = {"readme", "license", "licence", "version", "lockfile", "thumbs.db", "desktop.ini", "notes"}
_DIRECTORY_SOP = "1.2.840.10008.1.3.10"
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture image storage family
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def params_with_defaults(params: dict[str, Any] | None) -> dict[str, Any]:
    """The ``convert`` section merged over :data:`DEFAULTS` (``series_rules`` merged per phase)."""
    p = dict(DEFAULTS)
    p["series_rules"] = dict(DEFAULTS["series_rules"])
    for k, v in (params or {}).items():
        if k == "series_rules" and isinstance(v, dict):
            p["series_rules"].update(v)
        else:
            p[k] = v
    return p


@dataclass
class SliceHeader:
    """The header fields of one DICOM image file that the series logic needs."""

    path: Path
    series_uid: str
    series_number: int | None
    description: str
    modality: str
    image_type: tuple[str, ...]
    iop: np.ndarray  # (6,) row then column direction cosines (LPS)
    ipp: np.ndarray  # (3,) ImagePositionPatient (LPS, mm)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rows: int
    cols: int
    thickness: float | None
    slope: float
    intercept: float
    instance: int | None


@dataclass
class Series:
    """One DICOM series (files sorted along the slice normal) and its header geometry."""

    key: str
    slices: list[SliceHeader]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def first(self) -> SliceHeader:
        return self.slices[0]

    @property
    def files(self) -> list[Path]:
        return [s.path for s in self.slices]

    @property
    def normal(self) -> np.ndarray:
        iop = self.first.iop
        n = np.cross(iop[:3], iop[3:])
        return n / (np.linalg.norm(n) or 1.0)

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    @property
    def positions(self) -> np.ndarray:
        """(N,) slice positions along the normal, mm, ascending."""
        return np.array([float(s.ipp @ self.normal) for s in self.slices])

    @property
    def slice_spacing(self) -> float:
        d = np.diff(self.positions)
        return float(np.median(d)) if d.size else float("nan")

    @property
    def thickness(self) -> float:
        t = [s.thickness for s in self.slices if s.thickness]
        return float(np.median(t)) if t else self.slice_spacing

    @property
    def tilt_deg(self) -> float:
        """Angle between the slice normal and the patient z axis (0 = axial), degrees."""
        return math.degrees(math.acos(min(1.0, abs(float(self.normal[2])))))

    @property
    def orientation(self) -> str:
        k = int(np.argmax(np.abs(self.normal)))
        return ("sagittal", "coronal", "axial")[k]

    def ras_affine(self) -> np.ndarray:
        """(4, 4) RAS world affine of voxel (i=column, j=row, k=slice) from the headers (nibabel convention).

        For a gantry-tilted series the slice step is not perpendicular to the image plane (a sheared
        grid); dcm2niix's ``_Tilt_`` output resamples it.
        """
        first = self.first
        a = np.eye(4)
        a[:3, 0] = first.iop[:3] * first.pixel_spacing[1]
        a[:3, 1] = first.iop[3:] * first.pixel_spacing[0]
        if self.n_slices > 1:
            a[:3, 2] = (self.slices[-1].ipp - first.ipp) / (self.n_slices - 1)
        else:
            a[:3, 2] = self.normal * (first.thickness or 1.0)
        a[:3, 3] = first.ipp
        return _LPS_TO_RAS @ a

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid (X=columns, Y=rows, Z=slices) of :meth:`ras_affine`."""
        return (self.first.cols, self.first.rows, self.n_slices)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description of the series for QC (no UIDs, no identifiers)."""
        f = self.first
        return {
            "series": self.key,
            "series_number": f.series_number,
            "description": f.description,
            "modality": f.modality,
            "image_type": list(f.image_type),
            "n_slices": self.n_slices,
            "slice_thickness_mm": _r(self.thickness),
            "slice_spacing_mm": _r(self.slice_spacing),
            "pixel_spacing_mm": [_r(v) for v in f.pixel_spacing],
            "rows": f.rows,
            "columns": f.cols,
            "orientation": self.orientation,
            "tilt_deg": _r(self.tilt_deg),
            "first_file": str(f.path),
            **self.info,
        }


def _r(x: float | None, nd: int = 3) -> float | None:
    if x is None or not math.isfinite(float(x)):
        return None
    return round(float(x), nd)


# ----------------------------------------------------------------------------- file scanning


def _ignored_by_name(path: Path) -> str | None:
    name = path.name.lower()
    if name.startswith("."):
        return "hidden file"
    stem = name.split(".")[0]
    if path.suffix.lower() in _DOC_SUFFIXES or name.endswith(".nii.gz") or stem in _DOC_NAMES:
        return "documentation / non-image file by name"
    return None


def _expected_pixel_bytes(ds: pydicom.Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return (
        int(ds.Rows)
        * int(ds.Columns)
        * int(ds.get("SamplesPerPixel", 1))
        * int(ds.BitsAllocated)
        // 8
        * frames
    )


def _float_list(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not numeric ({value!r})") from err
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must have {n} finite values, got {value!r}")
    return arr


def read_header(path: Path, patient: str | None) -> SliceHeader | str:
    """Read one file's header: a :class:`SliceHeader`, or a string saying why the file is ignored.

    Raises:
        InputError: not DICOM, corrupt DICOM, truncated pixel data, or an image whose modality is not CT.
    """
    # pydicom warns (on stderr) about values it cannot validate, e.g. a UID cut short; the errors of
    # _read_header say what is wrong in one line instead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _read_header(path, patient)


def _read_header(path: Path, patient: str | None) -> SliceHeader | str:
    why = _ignored_by_name(path)
    if why:
        return why
    try:
        with open(path, "rb") as fh:
            try:
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
            except InvalidDicomError:
                fh.seek(0)
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
                if "SOPClassUID" not in ds or "Rows" not in ds:
                    raise InputError(patient, path, "not a DICOM file") from None
            pixel_pos = fh.tell()
            tag = fh.read(4)
        meta = getattr(ds, "file_meta", None) or {}
        sop = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "")
        if sop == _DIRECTORY_SOP:
            return "DICOMDIR (media storage directory)"
        if "Rows" not in ds:
            known = pydicom.uid.UID_dictionary.get(sop)
            if known is not None and "Image Storage" in known[0]:
                # an image SOP class without Rows: the header was cut short, as in a file copied only in
                # part; skipping it would convert the series with a slice missing
                raise InputError(
                    patient,
                    path,
                    f"corrupt DICOM: header ends after {pixel_pos} bytes without image attributes (Rows)"
                    f" for SOP class {known[0]}",
                )
            # a report, a dose SR, a vendor's private non-image object (Siemens CSA, GE, Philips ...)
            what = known[0] if known else f"SOP class {sop or 'unknown'}"
            return f"DICOM object without image ({what})"
        if sop.startswith(_SC_PREFIX):
            return "secondary capture (e.g. dose report), not an acquired image"
        if tag not in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"):
            raise InputError(patient, path, "corrupt DICOM: image without pixel data")
        ts = meta.get("TransferSyntaxUID")
        remaining = os.path.getsize(path) - pixel_pos
        if ts is None or not pydicom.uid.UID(ts).is_compressed:
            need = _expected_pixel_bytes(ds)
            if remaining < need + 8:
                raise InputError(
                    patient, path, f"truncated pixel data ({max(0, remaining - 8)} of {need} bytes)"
                )
        elif remaining <= 16:
            raise InputError(patient, path, "truncated pixel data (empty encapsulated frame)")
        modality = str(ds.get("Modality", "") or "").upper()
        if modality != "CT":
            raise InputError(patient, path, f"modality {modality or 'missing'}, expected CT")
        iop = _float_list(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
        ipp = _float_list(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient")
        ps = _float_list(ds.get("PixelSpacing"), 2, "PixelSpacing")
        th = ds.get("SliceThickness")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        number = ds.get("SeriesNumber")
        inst = ds.get("InstanceNumber")
        return SliceHeader(
            path=path,
            series_uid=series_uid or f"number-{number}-{ds.get('SeriesDescription', '')}",
            series_number=int(number) if number not in (None, "") else None,
            description=str(ds.get("SeriesDescription", "") or ""),
            modality=modality,
            image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or [])),
            iop=iop,
            ipp=ipp,
            pixel_spacing=(float(ps[0]), float(ps[1])),
            rows=int(ds.Rows),
            cols=int(ds.Columns),
            thickness=float(th) if th not in (None, "") else None,
            slope=float(ds.get("RescaleSlope", 1) or 1),
            intercept=float(ds.get("RescaleIntercept", 0) or 0),
            instance=int(inst) if inst not in (None, "") else None,
        )
    except InputError:
        raise
    except OSError as err:
        raise InputError(patient, path, f"cannot read file: {err.strerror or err}") from err
    except Exception as err:  # pydicom raises many types on malformed data
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(patient, path, f"corrupt DICOM: {msg[:160]}") from err


def iter_files(dirs: Iterable[str | os.PathLike], patient: str | None) -> list[Path]:
    """All files under the given folders (recursive, sorted, de-duplicated across overlapping folders)."""
    seen: set[Path] = set()
    out: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise InputError(patient, d, "DICOM folder does not exist" if not d.exists() else "not a folder")
        for root, dirnames, files in os.walk(d):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            for name in sorted(files):
                p = Path(root, name)
                rp = p.resolve()
                if rp not in seen:
                    seen.add(rp)
                    out.append(p)
    return out


def scan_series(
    dirs: Sequence[str | os.PathLike], patient: str | None
) -> tuple[list[Series], list[dict[str, str]]]:
    """Read every file's header and group the images into series.

    Returns:
        (series sorted by series number then description, ignored files ``[{"file", "reason"}]``).

    Raises:
        InputError: on the first bad file (see module docstring) or when no CT image is found.
    """
    groups: dict[str, list[SliceHeader]] = {}
    ignored: list[dict[str, str]] = []
    files = iter_files(dirs, patient)
    for p in files:
        h = read_header(p, patient)
        if isinstance(h, str):
            ignored.append({"file": str(p), "reason": h})
        else:
            groups.setdefault(h.series_uid, []).append(h)
    if not groups:
        where = ", ".join(str(d) for d in dirs)
        raise InputError(patient, where, f"no CT images found ({len(files)} files, {len(ignored)} ignored)")
    series = []
    for hs in groups.values():
        s = Series(key="", slices=hs)
        n = s.normal
        hs.sort(key=lambda h: (float(h.ipp @ n), h.instance or 0))
        series.append(s)
    series.sort(key=lambda s: (s.first.series_number or 0, s.first.description, s.first.path.name))
    for i, s in enumerate(series):
        s.key = f"S{i + 1:02d}"
    return series, ignored


# ----------------------------------------------------------------------------- acceptance and phases


def rejection_reason(s: Series, params: dict[str, Any]) -> str | None:
    """Why a series cannot be a phase image (``None`` = acceptable)."""
    p = params_with_defaults(params)
    if "LOCALIZER" in s.first.image_type or s.n_slices <= 2:
        return "localizer" if "LOCALIZER" in s.first.image_type else f"localizer-like ({s.n_slices} slices)"
    if any(t in s.first.image_type for t in ("MIP", "MINIP", "MAXIP")):
        return "projection image (MIP)"
    if s.tilt_deg > float(p["axial_max_angle_deg"]):
        return f"not axial ({s.orientation}, {s.tilt_deg:.0f} deg from axial)"
    if len({tuple(np.round(h.iop, 3)) for h in s.slices}) > 1:
        return "image orientation varies within the series"
    if len({(h.rows, h.cols) for h in s.slices}) > 1:
        return "matrix size varies within the series"
    if s.n_slices < int(p["min_slices"]):
        return f"too few slices ({s.n_slices} < min_slices {p['min_slices']})"
    return None


def read_hu_slice(h: SliceHeader) -> np.ndarray:
    """(rows, cols) HU of one slice (stored * RescaleSlope + RescaleIntercept)."""
    ds = pydicom.dcmread(h.path)
    return ds.pixel_array.astype(np.float32) * h.slope + h.intercept


def blood_pool_hu(s: Series, n_slices: int = 7, patient: str | None = None) -> float:
    """Robust mediastinal blood-pool HU of a chest series (image heuristic for contrast phase).

    On ``n_slices`` slices evenly spread over the middle 30-70 % of the series, the body is the largest
    connected region above -500 HU; the mediastinal box spans the central 35-65 % of the body's left-right
    extent and 25-60 % of its antero-posterior extent (from the anterior side: heart and great vessels,
    clear of sternum and spine). The estimate is the 90th percentile of the box's soft-tissue voxels
    (-50..1000 HU): ~40-70 HU without contrast, >> 150 HU with a contrast-filled blood pool.

    Returns:
        HU, or NaN when fewer than 50 soft-tissue voxels fall in the box.
    """
    idx = np.unique(np.round(np.linspace(0.3, 0.7, max(1, n_slices)) * (s.n_slices - 1)).astype(int))
    anterior_low = s.first.iop[4] >= 0  # increasing row index runs posterior (LPS +y)
    vals: list[np.ndarray] = []
    for i in idx:
        h = s.slices[int(i)]
        try:
            hu = read_hu_slice(h)
        except Exception as err:
            raise InputError(patient, h.path, f"corrupt DICOM pixel data: {str(err)[:160]}") from err
        lab, n = ndimage.label(hu > -500)
        if n == 0:
            continue
        big = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(hu), lab, index=np.arange(1, n + 1))))
        rr, cc = np.nonzero(lab == big)
        r0, r1, c0, c1 = rr.min(), rr.max(), cc.min(), cc.max()
        fr = (0.25, 0.60) if anterior_low else (0.40, 0.75)
        ra, rb = int(r0 + fr[0] * (r1 - r0)), int(math.ceil(r0 + fr[1] * (r1 - r0)))
        ca, cb = int(c0 + 0.35 * (c1 - c0)), int(math.ceil(c0 + 0.65 * (c1 - c0)))
        box = hu[ra : rb + 1, ca : cb + 1]
        vals.append(box[(box >= -50) & (box <= 1000)])
    v = np.concatenate(vals) if vals else np.empty(0)
    if v.size < 50:
        return float("nan")
    return float(np.percentile(v, 90))


def _seen(s: Series) -> str:
    bp = s.info.get("blood_pool_hu")
    extra = "" if bp is None else f", blood pool {bp} HU"
    return f"{s.key} '{s.first.description}' {s.info.get('decision')}: {s.info.get('reason')}{extra}"


def _preference(s: Series) -> tuple[float, int]:
    """Sort key among candidates of one phase: thinner slices first, then more slices."""
    return (round(s.thickness, 2), -s.n_slices)


def select_phases(
    series: list[Series],
    params: dict[str, Any] | None,
    phases: Sequence[str],
    patient: str | None,
    heuristic_all: bool = True,
) -> tuple[dict[str, Series], dict[str, str]]:
    """Pick one series per requested phase.

    Rules: each acceptable series' SeriesDescription is matched (case-insensitive) against the per-phase
    regex ``series_rules``; a series matching exactly one phase's rule belongs to it. A phase decided by
    exactly one series takes it. Otherwise (no match, or several) the blood-pool heuristic classes the
    acceptable series (``> contrast_threshold_hu`` = ctpa, else nct) and the best candidate is taken:
    thinner slices, then more slices. Each series' ``info`` gets ``blood_pool_hu``, ``rule_match``,
    ``heuristic``, ``decision`` and ``reason``. With ``heuristic_all=False`` (cheap screening) pixel data
    is read only for series whose class the rules leave open.

    Returns:
        ({phase: series}, {phase: why it was chosen}).

    Raises:
        InputError: a requested phase has no candidate, or two candidates tie (unresolvable duplicates).
    """
    p = params_with_defaults(params)
    rules = {ph: re.compile(p["series_rules"][ph], re.IGNORECASE) for ph in PHASES if ph in p["series_rules"]}
    thr = float(p["contrast_threshold_hu"])
    ok: list[Series] = []
    for s in series:
        why = rejection_reason(s, p)
        s.info.update(blood_pool_hu=None, rule_match=[], heuristic=None)
        if why:
            s.info.update(decision="rejected", reason=why)
            continue
        s.info["rule_match"] = [ph for ph, rx in rules.items() if rx.search(s.first.description or "")]
        s.info.update(decision="not used", reason="acceptable; another series was chosen")
        ok.append(s)

    def heuristic(s: Series) -> str | None:
        if s.info["blood_pool_hu"] is None and "_bp_done" not in s.info:
            bp = blood_pool_hu(s, int(p["heuristic_slices"]), patient)
            s.info["blood_pool_hu"] = _r(bp, 1)
            s.info["heuristic"] = None if not math.isfinite(bp) else ("ctpa" if bp > thr else "nct")
            s.info["_bp_done"] = True
        return s.info["heuristic"]

    if heuristic_all:
        for s in ok:
            heuristic(s)

    chosen: dict[str, Series] = {}
    why_chosen: dict[str, str] = {}
    by_rule = {ph: [s for s in ok if s.info["rule_match"] == [ph]] for ph in PHASES}
    for ph in phases:
        cands = by_rule.get(ph, [])
        if len(cands) == 1:
            chosen[ph] = cands[0]
            why_chosen[ph] = f"only series whose description matches the {ph} rule"
            continue
        other_rule = {id(x) for other in PHASES if other != ph for x in by_rule[other]}
        if len(cands) > 1:
            agree = [s for s in cands if heuristic(s) == ph]
            pool = agree or cands
            basis = f"{len(cands)} series match the {ph} rule; " + (
                f"{len(agree)} agree with the blood-pool heuristic; " if agree else "heuristic undecided; "
            )
        else:
            pool = [s for s in ok if id(s) not in other_rule and heuristic(s) == ph]
            basis = (
                f"no single rule match for {ph}; blood-pool heuristic ({thr:g} HU) classes "
                f"{len(pool)} series {ph}; "
            )
        if not pool:
            seen = "; ".join(_seen(s) for s in series)
            where = str(series[0].first.path.parent) if series else "-"
            raise InputError(patient, where, f"no series for phase {ph} (series seen: {seen})")
        pool.sort(key=_preference)
        if len(pool) > 1 and _preference(pool[0]) == _preference(pool[1]):
            a, b = pool[0], pool[1]
            raise InputError(
                patient,
                a.first.path.parent,
                f"ambiguous {ph} series: {a.key} '{a.first.description}' (series {a.first.series_number})"
                f" and {b.key} '{b.first.description}' (series {b.first.series_number}) have the same slice "
                f"thickness {a.thickness:g} mm and {a.n_slices} slices",
            )
        chosen[ph] = pool[0]
        why_chosen[ph] = basis + (
            f"thinnest/most slices of {len(pool)}" if len(pool) > 1 else "the only candidate"
        )
    if len(chosen) == 2 and chosen.get("nct") is chosen.get("ctpa"):
        s = chosen["nct"]
        raise InputError(patient, s.first.path, f"the same series {s.key} was picked for nct and ctpa")
    for ph, s in chosen.items():
        s.info.update(decision=ph, reason=why_chosen[ph])
    for s in series:
        s.info.pop("_bp_done", None)
    return chosen, why_chosen
