"""DICOM -> NIfTI for one patient: pick the NCT and CTPA series, convert each with dcm2niix, write QC.

``cpmn convert DICOM_DIR [DICOM_DIR ...] OUT_DIR --patient P [--phases nct,ctpa] [--config F] [--params J]``

Writes ``OUT_DIR/{phase}.nii.gz`` and ``OUT_DIR/{phase}.json`` (anonymised dcm2niix sidecar) for each
requested phase and ``OUT_DIR/qc.json`` (every series seen, its blood-pool HU, the decision and the reason,
the chosen series per phase and the dcm2niix output used). Series picking lives in
:mod:`cpmn.data.dicomio`. The conversion itself is dcm2niix's: gantry-tilted series use its tilt-corrected
``_Tilt_`` output and variable slice spacing its equalised ``_Eq_`` output.

Bad input raises :class:`~cpmn.errors.InputError`; nothing is written to ``OUT_DIR`` unless every phase
converted (work happens in a hidden sibling folder that is moved into place at the end).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from cpmn.config import add_config_arguments, resolve
from cpmn.data.dicomio import PHASES, Series, params_with_defaults, scan_series, select_phases
from cpmn.errors import InputError, report

log = logging.getLogger("cpmn.convert")

#: sidecar keys removed on top of dcm2niix's ``-ba y`` (site and person identifiers, dates and times)
SIDECAR_DROP = {
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientWeight",
    "PatientSize",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "AccessionNumber",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "StudyDate",
    "SeriesDate",
    "ContentDate",
}

#: preference among dcm2niix outputs of one series (first found wins)
_VARIANTS = ("Tilt_Eq", "Tilt", "Eq", "plain")


def dcm2niix_binary() -> str:
    """Path of the dcm2niix binary from the pinned PyPI wheel (falls back to PATH)."""
    try:  # optional: the wheel ships the binary; a conda env or a site may put dcm2niix on PATH instead
        from dcm2niix import bin_path

        if Path(bin_path).exists():
            return str(bin_path)
    except ImportError:
        pass
    found = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which("dcm2niix")
    if not found:
        raise RuntimeError("dcm2niix not found: install the pinned `dcm2niix` wheel")
    return found


def dcm2niix_version() -> str:
    out = subprocess.run([dcm2niix_binary(), "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout + out.stderr).strip().splitlines()
    return next((t for t in text if "version" in t.lower()), text[0] if text else "unknown")[:120]


def _variant(name: str) -> str:
    stem = name.removesuffix(".nii.gz")
    if "_Tilt_Eq_" in stem:
        return "Tilt_Eq"
    if "_Tilt_" in stem:
        return "Tilt"
    if "_Eq_" in stem:
        return "Eq"
    return "plain"


def run_dcm2niix(series: Series, work: Path, patient: str) -> tuple[Path, Path, str, list[str]]:
    """Convert one series with dcm2niix in ``work`` (links to its files only).

    Returns:
        (chosen NIfTI, its sidecar JSON, variant in ``_VARIANTS``, dcm2niix warning lines).
    """
    src = work / "in"
    out = work / "out"
    src.mkdir(parents=True)
    out.mkdir()
    for i, f in enumerate(series.files):
        os.symlink(Path(f).resolve(), src / f"{i:06d}.dcm")
    cmd = [dcm2niix_binary(), "-z", "y", "-b", "y", "-ba", "y", "-f", "series", "-o", str(out), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    msgs = [
        ln.strip()
        for ln in (res.stdout + res.stderr).splitlines()
        if ln.lower().startswith(("warning", "error"))
    ]
    niis = sorted(out.glob("*.nii.gz"))
    if res.returncode != 0 or not niis:
        detail = msgs[-1] if msgs else f"exit status {res.returncode}"
        raise InputError(
            patient, series.first.path.parent, f"dcm2niix failed on series {series.key}: {detail}"
        )
    by_variant: dict[str, list[Path]] = {}
    for p in niis:
        by_variant.setdefault(_variant(p.name), []).append(p)
    variant = next(v for v in _VARIANTS if v in by_variant)
    cands = by_variant[variant]
    if len(cands) > 1:  # dcm2niix split the series: keep the volume with the most slices
        cands.sort(key=lambda p: -int(np.prod(nib.load(p).shape[2:3])))
        msgs.append(
            f"note: dcm2niix split the series into {len(by_variant[variant])} volumes; kept {cands[0].name}"
        )
    nii = cands[0]
    jsons = sorted(out.glob("*.json"))
    base = nii.name.removesuffix(".nii.gz")
    for tag in ("_Tilt_Eq_", "_Tilt_", "_Eq_"):
        base = base.split(tag)[0]
    sidecar = out / f"{base}.json"
    if not sidecar.exists():
        if not jsons:
            raise InputError(
                patient, series.first.path.parent, f"dcm2niix wrote no sidecar for series {series.key}"
            )
        sidecar = jsons[0]
    return nii, sidecar, variant, msgs


def _check_geometry(img: nib.Nifti1Image, series: Series, patient: str) -> dict[str, Any]:
    """Sanity of a converted volume: finite affine, orthogonal axes, in-plane size as in the headers."""
    aff = img.affine
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    cols = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
    ortho = float(np.max(np.abs(cols.T @ cols - np.eye(3))))
    where = series.first.path.parent
    if not np.all(np.isfinite(aff)) or min(zooms) <= 0:
        raise InputError(patient, where, f"series {series.key}: dcm2niix output has an invalid affine")
    if img.ndim != 3:
        raise InputError(
            patient, where, f"series {series.key}: dcm2niix output is {img.ndim}-D, expected 3-D"
        )
    return {
        "shape": [int(v) for v in img.shape],
        "spacing_mm": [round(z, 4) for z in zooms],
        "axes_orthogonal": bool(ortho < 1e-3),
        "affine": np.round(aff, 4).tolist(),
    }


def _anonymise_sidecar(src: Path, dst: Path) -> dict[str, Any]:
    meta = json.loads(src.read_text())
    for k in list(meta):
        if k in SIDECAR_DROP or (k.startswith("Patient") and k != "PatientPosition"):
            meta.pop(k)
    dst.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def convert_patient(
    dicom_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    patient_id: str,
    params: dict[str, Any] | None = None,
    phases: Sequence[str] = PHASES,
) -> dict[str, Any]:
    """Convert one patient's DICOM folders into ``out_dir/{phase}.nii.gz`` + sidecars + ``qc.json``.

    Args:
        dicom_dirs: folders holding the patient's series (may overlap or be the same folder).
        out_dir: output folder (created; only our files are replaced in it).
        patient_id: pseudonymous id used in messages and the QC record.
        params: the ``convert`` config section (defaults: :data:`cpmn.data.dicomio.DEFAULTS`).
        phases: phases required (subset of ``("nct", "ctpa")``); a missing one is an error.

    Returns:
        The QC record written to ``qc.json``.

    Raises:
        InputError: bad file, non-CT image, a missing phase, ambiguous duplicates, dcm2niix failure.
    """
    phases = tuple(phases)
    bad = [p for p in phases if p not in PHASES]
    if bad or not phases:
        raise ValueError(f"phases must be a non-empty subset of {PHASES}, got {phases}")
    p = params_with_defaults(params)
    out_dir = Path(out_dir)
    series, ignored = scan_series(dicom_dirs, patient_id)
    chosen, why = select_phases(series, p, phases, patient_id)
    for s in series:
        log.info(
            "patient %s: %s series %s '%s' %d slices: %s (%s)",
            patient_id,
            s.key,
            s.first.series_number,
            s.first.description,
            s.n_slices,
            s.info.get("decision"),
            s.info.get("reason"),
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        final = stage / "final"
        final.mkdir()
        qc_phases: dict[str, Any] = {}
        for ph in phases:
            s = chosen[ph]
            nii, sidecar, variant, msgs = run_dcm2niix(s, stage / f"work_{ph}", patient_id)
            img = nib.load(nii)
            geom = _check_geometry(img, s, patient_id)
            shutil.move(str(nii), final / f"{ph}.nii.gz")
            meta = _anonymise_sidecar(sidecar, final / f"{ph}.json")
            qc_phases[ph] = {
                "series": s.key,
                "series_number": s.first.series_number,
                "description": s.first.description,
                "reason": why[ph],
                "file": f"{ph}.nii.gz",
                "sidecar": f"{ph}.json",
                "dcm2niix_output": variant,
                "dcm2niix_messages": msgs,
                "gantry_tilt_deg": meta.get("GantryDetectorTilt", round(s.tilt_deg, 2)),
                **geom,
            }
            log.info(
                "patient %s: %s <- %s (%s output, shape %s, spacing %s)",
                patient_id,
                ph,
                s.key,
                variant,
                geom["shape"],
                geom["spacing_mm"],
            )
        qc = {
            "patient_id": patient_id,
            "phases": list(phases),
            "dcm2niix": dcm2niix_version(),
            "params": {k: p[k] for k in sorted(p)},
            "chosen": qc_phases,
            "series": [s.summary() for s in series],
            "ignored_files": ignored,
        }
        (final / "qc.json").write_text(json.dumps(qc, indent=2) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in [f"{ph}{ext}" for ph in phases for ext in (".nii.gz", ".json")] + ["qc.json"]:
            os.replace(final / name, out_dir / name)
        return qc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------- command line


def parse_phases(text: str) -> tuple[str, ...]:
    out = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    if not out or any(t not in PHASES for t in out):
        raise argparse.ArgumentTypeError(
            f"--phases: comma-separated subset of {','.join(PHASES)}, got {text!r}"
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="DICOM_DIR ... OUT_DIR",
        help="one or more DICOM folders of the patient, then the output folder",
    )
    parser.add_argument("--patient", required=True, help="patient id (pseudonymous)")
    parser.add_argument(
        "--phases", type=parse_phases, default=PHASES, help="phases required (default nct,ctpa)"
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        print("ERROR cpmn convert: give at least one DICOM_DIR and the OUT_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = resolve(args, "convert")
    try:
        convert_patient(args.paths[:-1], args.paths[-1], args.patient, params, phases=args.phases)
    except InputError as err:
        return report(err)
    return 0
