"""Screen a cohort sheet before conversion: cheap checks that keep bad patients out of the workflow.

``cpmn screen --sheet COHORT.tsv --included results/cohort.included.tsv --excluded results/qc/excluded.tsv
[--phases nct,ctpa] [--config F] [--params J]``

Per row, in order (the first failure excludes the row; the rest of the cohort goes on):

1. ``sheet``: the row validates against ``workflow/schemas/cohort.schema.yaml``; a patient_id that occurs in
   several rows excludes all of them.
2. ``dicom``: every file in the row's DICOM folders is a readable CT DICOM image (headers only, see
   :mod:`cpmn.data.dicomio`); non-image DICOM objects and documentation files are ignored.
3. ``phase``: each requested phase has exactly one best series (rules first, the blood-pool heuristic on a
   few slices only when the rules do not decide).
4. ``mask``: the mask loads, sits on the CTPA series grid (same shape and world corners within half a voxel,
   allowing axis flips/permutations), is not empty for a PE patient (label 1), and is plausible for its
   CTPA (:func:`mask_plausibility`: at least ``mask_plausible_fraction`` of its voxels at clot-like HU
   next to contrast-enhanced blood).

Outputs: ``included`` (the sheet's columns, paths made absolute) and ``excluded`` (patient_id, stage, file,
reason). Each exclusion prints one line ``EXCLUDED patient P: <file>: <reason>`` to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import nibabel as nib
import numpy as np
import pandas as pd
import yaml
from scipy import ndimage

from cpmn.config import add_config_arguments, resolve
from cpmn.data.convert import parse_phases
from cpmn.data.dicomio import PHASES, Series, params_with_defaults, read_hu_slice, scan_series, select_phases
from cpmn.data.readers import load_readers
from cpmn.errors import InputError, atomic_path, report

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "cohort.schema.yaml"
COLUMNS = ["patient_id", "label", "study_date", "nct_dicom", "ctpa_dicom", "ctpa_mask"]
PATH_COLUMNS = ["nct_dicom", "ctpa_dicom", "ctpa_mask"]
EXCLUDED_COLUMNS = ["patient_id", "stage", "file", "reason"]


def row_ref(i: int) -> str:
    """How a message names data row ``i`` (1-based, the first line under the header): the data row and the
    line of the file a user sees in an editor."""
    return f"data row {i} (line {i + 1})"


def _message(err: jsonschema.ValidationError) -> str:
    """A schema error's message, with the expected format where the schema names one."""
    if err.validator == "format" and err.validator_value == "date":
        return f"{err.message} (expected YYYY-MM-DD, e.g. 2020-04-10)"
    return err.message


def tab_hint(path: str | os.PathLike) -> str:
    """`` (...)`` when the sheet's header looks comma- or semicolon-separated, else ``""``."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            header = fh.readline()
    except OSError:
        return ""
    if "\t" not in header:
        for sep, name in ((",", "comma"), (";", "semicolon")):
            if sep in header:
                return (
                    f" (the sheet is read as tab-separated, TSV; this header is {name}-separated:"
                    " save it as TSV)"
                )
    return ""


def load_schema(path: str | os.PathLike = SCHEMA_PATH) -> dict[str, Any]:
    with open(path) as fh:
        return yaml.safe_load(fh)


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """The cohort sheet as text cells (no NA conversion, surrounding blanks stripped)."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    return df.apply(lambda col: col.str.strip())


def _row_errors(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate_sheet(df: pd.DataFrame, schema: dict[str, Any] | None = None) -> list[str]:
    """Validate every row of a cohort sheet against the cohort schema.

    Args:
        df: the sheet as read by :func:`read_sheet` (text cells).
        schema: the row schema (default ``workflow/schemas/cohort.schema.yaml``).

    Returns:
        One message per problem, ``data row N (line N+1) (patient P): column C: <what is wrong>``; data rows
        are numbered from 1 (the first line under the header, line 2 of the file). Missing columns give
        ``column C: missing``.
    """
    schema = schema or load_schema()
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        return [f"column {c}: missing from the sheet" for c in missing]
    validator = _row_errors(schema)
    errors: list[str] = []
    for i, row in enumerate(df.to_dict(orient="records"), start=1):
        pid = row.get("patient_id") or "?"
        for err in sorted(validator.iter_errors(row), key=lambda e: list(e.path)):
            col = (
                err.path[0] if err.path else (err.validator_value[0] if err.validator == "required" else "-")
            )
            errors.append(f"{row_ref(i)} (patient {pid}): column {col}: {_message(err)}")
    return errors


def _canonical_grid(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(affine, shape) of the same grid reoriented to the closest RAS+ axis order."""
    ornt = nib.orientations.io_orientation(affine)
    shape = np.asarray(shape[:3], int)
    aff = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return aff, shape[ornt[:, 0].astype(int)]


def grid_mismatch(
    mask_affine: np.ndarray, mask_shape: Sequence[int], ref_affine: np.ndarray, ref_shape: Sequence[int]
) -> str | None:
    """Why the mask grid is not the reference grid (``None`` = same grid up to axis flips/permutation).

    Both grids are reoriented to RAS+; then the shapes must be equal and the first and last voxel centres
    must agree within half a voxel of the reference grid along every axis.
    """
    ma, ms = _canonical_grid(np.asarray(mask_affine, float), mask_shape)
    ra, rs = _canonical_grid(np.asarray(ref_affine, float), ref_shape)
    if tuple(ms) != tuple(rs):
        return f"mask shape {tuple(int(v) for v in ms)} != CTPA grid {tuple(int(v) for v in rs)} (RAS order)"
    inv = np.linalg.inv(ra[:3, :3])
    worst = 0.0
    for corner in (np.zeros(3), ms - 1.0):
        d = (ma[:3, :3] @ corner + ma[:3, 3]) - (ra[:3, :3] @ corner + ra[:3, 3])
        worst = max(worst, float(np.max(np.abs(inv @ d))))
    if worst > 0.5:
        return f"mask grid is off the CTPA series grid by {worst:.2f} voxel (world corners differ)"
    return None


def ctpa_volume(series: Series) -> np.ndarray:
    """``(X=columns, Y=rows, Z=slices)`` HU of a series, on the grid of :meth:`Series.ras_affine`."""

    return np.stack([read_hu_slice(h).T for h in series.slices], axis=-1)


#: CTPA HU range of clot (clot 20-90 HU, with partial volume at its border); below is fat, lung or air,
#: above is contrast-enhanced blood
CLOT_HU = (-50.0, 150.0)
#: an embolus voxel lies within this distance (mm) of enhanced blood: the lumen it occludes or narrows. It was
#: 4 voxels, 12.8 mm on the phantom's 3.2 mm grid; as a voxel count it put the inside of a large clot
#: out of reach at a clinical 0.75 mm grid (the paper-scale smoke run excluded both PE patients: 35-39%)
NEAR_MM = 12.8


def mask_on_ctpa(
    mask: np.ndarray, mask_affine: np.ndarray, ctpa_shape: Sequence[int], ctpa_affine: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Index arrays into the CTPA volume: the nearest CTPA voxel of each mask voxel's centre (clipped)."""
    world = nib.affines.apply_affine(mask_affine, np.argwhere(mask > 0))
    vox = np.rint(nib.affines.apply_affine(np.linalg.inv(ctpa_affine), world)).astype(int)
    return tuple(np.clip(vox, 0, np.array(ctpa_shape) - 1).T)


def mask_plausibility(
    mask: np.ndarray, mask_affine: np.ndarray, ctpa_hu: np.ndarray, ctpa_affine: np.ndarray, vessel_hu: float
) -> tuple[float, int]:
    """``(fraction, voxels)``: the fraction of the mask's voxels at clot-like CTPA HU (:data:`CLOT_HU`)
    within :data:`NEAR_MM` mm (Euclidean) of enhanced blood (``> vessel_hu``), each mask voxel's centre
    sampled at its nearest CTPA voxel. An embolus annotation is a filling defect of an enhanced artery;
    another patient's mask lands on enhanced blood, lung or fat. On the benchmark phantom's first 24 PE
    patients (3.2 mm): 0.77–0.98 for the true masks, 0.05–0.49 for each patient's mask given to the next
    patient (with 4 voxels instead of 12.8 mm: 0.72–0.93 and 0.05–0.49)."""
    if not np.any(mask > 0):
        return 1.0, 0
    at = mask_on_ctpa(mask, mask_affine, ctpa_hu.shape, ctpa_affine)
    spacing = np.linalg.norm(np.asarray(ctpa_affine, dtype=float)[:3, :3], axis=0)
    near = (ndimage.distance_transform_edt(ctpa_hu <= vessel_hu, sampling=spacing) <= NEAR_MM)[at]
    hu = ctpa_hu[at]
    ok = near & (hu > CLOT_HU[0]) & (hu < CLOT_HU[1])
    return float(ok.mean()), int(len(at[0]))


def _check_mask(
    pid: str, label: str, mask_path: Path, ctpa: Series, params: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray] | None:
    try:
        img = nib.load(mask_path)
        shape = img.shape
        data = np.asarray(img.dataobj)  # decode it all: a truncated .nii.gz fails here, not downstream
    except FileNotFoundError as err:
        raise InputError(pid, mask_path, "mask file does not exist") from err
    except Exception as err:
        raise InputError(pid, mask_path, f"mask is not a readable NIfTI ({type(err).__name__})") from err
    if len(shape) != 3:
        raise InputError(pid, mask_path, f"mask must be 3-D, got shape {shape}")
    why = grid_mismatch(img.affine, shape, ctpa.ras_affine(), ctpa.shape)
    if why:
        raise InputError(
            pid, mask_path, f"inconsistent geometry: {why} (series {ctpa.key} '{ctpa.first.description}')"
        )
    values = np.unique(data)
    if not np.all(np.isin(values, (0, 1))):
        raise InputError(pid, mask_path, f"mask must contain only 0 and 1, found {values[:5].tolist()}")
    if label == "1" and not np.any(data > 0):
        raise InputError(pid, mask_path, "empty mask on a PE patient (label 1)")
    p = params_with_defaults(params)
    need = float(p["mask_plausible_fraction"])
    if need > 0 and np.any(data > 0):
        vessel = float(p["contrast_threshold_hu"])
        hu = ctpa_volume(ctpa)
        frac, n = mask_plausibility(data, img.affine, hu, ctpa.ras_affine(), vessel)
        if frac < need:
            raise InputError(
                pid,
                mask_path,
                f"mask implausible for its CTPA (series {ctpa.key}): {100 * frac:.0f}% of its {n} voxels"
                f" are at clot-like HU ({CLOT_HU[0]:g} to {CLOT_HU[1]:g}) within {NEAR_MM:g} mm of"
                f" enhanced blood (> {vessel:g} HU), expected >="
                f" {100 * need:.0f}% (another patient's mask? convert.mask_plausible_fraction)",
            )
        return data, img.affine, frac, hu
    return None


def _resolve(base: Path, value: str) -> str:
    if not value:
        return ""
    p = Path(value)
    return str((p if p.is_absolute() else base / p).resolve())


def write_overlay(
    pid: str, mask: np.ndarray, mask_affine: np.ndarray, ctpa: Series, frac: float, hu: np.ndarray, out: Path
) -> Path:
    """A PNG of the mask's contour on the CTPA's axial slice holding most mask voxels (W400/L40)."""
    # matplotlib: heavy, and the Agg backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_ctpa = np.zeros(hu.shape, bool)
    on_ctpa[mask_on_ctpa(mask, mask_affine, hu.shape, ctpa.ras_affine())] = True
    z = int(np.argmax(on_ctpa.sum(axis=(0, 1))))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(hu[:, :, z].T, cmap="gray", vmin=-160, vmax=240, origin="lower")
    ax.contour(on_ctpa[:, :, z].T.astype(float), levels=[0.5], colors="red", linewidths=1.0, origin="lower")
    ax.set_title(f"{pid}: mask on CTPA, slice {z} ({100 * frac:.0f}% plausible)", fontsize=9)
    ax.axis("off")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return out


def screen_row(
    row: dict[str, str],
    params: dict[str, Any] | None,
    phases: Sequence[str] = PHASES,
    overlays: str | os.PathLike | None = None,
) -> tuple[str, InputError] | None:
    """Screen one validated row whose paths are already absolute: ``None`` or ``(stage, error)``. With
    ``overlays``, a PE patient's mask is drawn on its CTPA into ``overlays/{pid}.png`` (passed or not)."""
    pid = row["patient_id"]
    dirs = list(dict.fromkeys([row["nct_dicom"], row["ctpa_dicom"]]))
    try:
        series, _ = scan_series(dirs, pid)
    except InputError as err:
        return "dicom", err
    try:
        chosen, _ = select_phases(series, params, phases, pid, heuristic_all=False)
    except InputError as err:
        return "phase", err
    if "ctpa" in chosen and row.get("ctpa_mask"):
        try:
            drawn = _check_mask(pid, row["label"], Path(row["ctpa_mask"]), chosen["ctpa"], params)
        except InputError as err:
            return "mask", err
        if overlays is not None and drawn is not None:
            mask, affine, frac, hu = drawn
            write_overlay(pid, mask, affine, chosen["ctpa"], frac, hu, Path(overlays) / f"{pid}.png")
    return None


def check_readers(path: str | os.PathLike, sheet_ids: set[str]) -> None:
    """Validate the reader-study TSV and that every patient it reads is in the cohort sheet
    (:func:`cpmn.data.readers.load_readers`); raises :class:`InputError` naming the file and data row."""

    load_readers(path, patients=sheet_ids)


def screen_cohort(
    sheet_path: str | os.PathLike,
    out_included: str | os.PathLike,
    out_excluded: str | os.PathLike,
    params: dict[str, Any] | None = None,
    phases: Sequence[str] = PHASES,
    leave_out: Sequence[str] = (),
    readers: str | os.PathLike | None = None,
    overlays: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check every cohort-sheet row before conversion; write the included and excluded tables.

    Args:
        sheet_path: cohort TSV (columns :data:`COLUMNS`, paths relative to the sheet).
        out_included: TSV of the rows that passed, same columns, paths absolute.
        out_excluded: TSV ``patient_id, stage, file, reason`` (stage: sheet, config, dicom, phase, mask).
        params: the ``convert`` config section (series rules, thresholds).
        phases: phases every patient must have.
        leave_out: patient ids to leave out (``cohort.exclude``: e.g. one that failed a later stage),
            excluded with stage ``config``; an id not in the sheet is a warning.
        readers: the reader-study TSV, checked here, before any training: its columns, 0/1 decisions, one
            decision per reader and patient, and patient ids that exist in the sheet.
        overlays: folder for one PNG per screened PE patient: the mask on its CTPA (:func:`write_overlay`).

    Returns:
        (included, excluded) data frames as written.

    Raises:
        InputError: the sheet itself cannot be read or lacks a required column, or the readers file is
            bad (naming its data row); nothing is written then.
    """
    sheet_path = Path(sheet_path)
    try:
        df = read_sheet(sheet_path)
    except Exception as err:
        raise InputError(None, sheet_path, f"cannot read the cohort sheet: {err}") from err
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            None, sheet_path, f"cohort sheet lacks column(s) {', '.join(missing)}{tab_hint(sheet_path)}"
        )
    base = sheet_path.resolve().parent
    if readers:
        check_readers(readers, set(df["patient_id"]))
    if overlays is not None:
        Path(overlays).mkdir(parents=True, exist_ok=True)  # the workflow's output, even with no PE patient
    excluded: list[dict[str, str]] = []

    def exclude(pid: str, stage: str, file: str, reason: str) -> None:
        excluded.append({"patient_id": pid, "stage": stage, "file": file, "reason": reason})
        print(f"EXCLUDED patient {pid or '?'}: {file}: {reason}", file=sys.stderr)

    schema = load_schema()
    validator = _row_errors(schema)
    bad_rows: set[int] = set()
    for i, row in enumerate(df.to_dict(orient="records")):
        errs = sorted(validator.iter_errors(row), key=lambda e: list(e.path))
        if errs:
            e = errs[0]
            col = e.path[0] if e.path else "-"
            exclude(
                row["patient_id"], "sheet", str(sheet_path), f"{row_ref(i + 1)}: column {col}: {_message(e)}"
            )
            bad_rows.add(i)
    counts = df["patient_id"].value_counts()
    for pid in counts[counts > 1].index:
        rows = [i + 1 for i in np.flatnonzero(df["patient_id"].to_numpy() == pid)]
        for r in rows:
            if r - 1 not in bad_rows:
                exclude(
                    pid,
                    "sheet",
                    str(sheet_path),
                    f"duplicate patient_id (data rows {', '.join(map(str, rows))})",
                )
                bad_rows.add(r - 1)

    listed = set(map(str, leave_out))
    for pid in sorted(listed - set(df["patient_id"])):
        print(f"WARNING cohort.exclude: patient {pid} is not in {sheet_path}", file=sys.stderr)
    keep: list[int] = []
    for i, row in enumerate(df.to_dict(orient="records")):
        if i in bad_rows:
            continue
        if row["patient_id"] in listed:
            exclude(row["patient_id"], "config", str(sheet_path), "listed in cohort.exclude")
            continue
        row = {k: (_resolve(base, v) if k in PATH_COLUMNS else v) for k, v in row.items()}
        res = screen_row(row, params, phases, overlays)
        if res is None:
            df.loc[df.index[i], PATH_COLUMNS] = [row[c] for c in PATH_COLUMNS]
            keep.append(i)
        else:
            stage, err = res
            exclude(err.patient, stage, err.path, err.reason)

    included = df.iloc[keep].reset_index(drop=True)
    excl = pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS)
    with atomic_path(out_included) as tmp:
        included.to_csv(tmp, sep="\t", index=False)
    with atomic_path(out_excluded) as tmp:
        excl.to_csv(tmp, sep="\t", index=False)
    return included, excl


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sheet", required=True, help="cohort sheet TSV (paths relative to it)")
    parser.add_argument(
        "--included", required=True, help="output: rows that passed (results/cohort.included.tsv)"
    )
    parser.add_argument("--excluded", required=True, help="output: exclusions (results/qc/excluded.tsv)")
    parser.add_argument(
        "--phases", type=parse_phases, default=PHASES, help="phases required (default nct,ctpa)"
    )
    parser.add_argument(
        "--exclude", nargs="*", default=[], metavar="ID", help="patient ids to leave out (cohort.exclude)"
    )
    parser.add_argument(
        "--readers",
        default=None,
        metavar="TSV",
        help="reader-study TSV to check (reader, patient_id, decision)",
    )
    parser.add_argument("--overlays", default=None, metavar="DIR", help="a PNG per PE patient: mask on CTPA")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = resolve(args, "convert")
    try:
        inc, exc = screen_cohort(
            args.sheet,
            args.included,
            args.excluded,
            params,
            phases=args.phases,
            leave_out=args.exclude,
            readers=args.readers,
            overlays=args.overlays,
        )
    except InputError as err:
        return report(err)
    print(
        f"screen: {len(inc)} included, {len(exc)} row(s) excluded"
        f" ({exc['patient_id'].nunique()} patient id(s))",
        file=sys.stderr,
    )
    return 0
