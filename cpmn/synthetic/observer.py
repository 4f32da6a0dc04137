"""The phantom's ceiling: a truth-informed observer that scores each patient per phase on the network grid.

The observer knows what no network is told: where the pulmonary-arterial lumen is (the phantom's
``truth/{pid}/lumen_nct.nii.gz``, resampled onto the preprocessed grid of ``{pid}.npz``) and which way a
clot departs from blood in each phase (brighter than blood in NCT, darker than enhanced blood in CTPA). It
asks, everywhere in the lumen, whether the contents look like clot or like this patient's blood:

1. ``core`` = the lumen voxels (resampled lumen fraction at least ``core_fraction``) eroded by one
   voxel: a voxel at the vessel wall is partial volume with fat or lung, which mimics a filling defect
   in CTPA and hides a hyperdense clot in NCT;
2. the patient's blood level ``b`` = median of the image over the core (robust to the clot voxels among
   them);
3. ``z = sign · (image − b)`` on the core, ``sign`` = +1 for NCT, −1 for CTPA (the phantom's noise is the
   same for every patient, so no per-patient scaling; the enhanced blood of CTPA saturates the window
   and leaves no spread to scale by);
4. a matched filter for a clot core of ``kernel``³ voxels: the sum of ``z`` over the core voxels of each
   ``kernel``³ neighbourhood over √(their count);
5. the patient score = the maximum of that statistic over core voxels with at least ``min_voxels``
   core neighbours.

Its AUC over the patients is the ceiling of what a model can reach on that phase at that grid: a network
sees the same voxels without the lumen map.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

from cpmn.config import add_config_arguments, resolve, schema_defaults
from cpmn.data.split import read_splits
from cpmn.errors import InputError, atomic_path, report
from cpmn.stats import delong_ci

#: the ``ceiling:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("ceiling")
SIGN = {"nct": 1.0, "ctpa": -1.0}
COLUMNS = ("phase", "split", "n", "n_pe", "auc", "auc_low", "auc_high")


def observer_score(
    image: np.ndarray,
    lumen_fraction: np.ndarray,
    sign: float,
    core_fraction: float = 0.5,
    kernel: int = 3,
    min_voxels: int = 4,
) -> float:
    """The matched-filter statistic of one phase of one patient (module docstring, steps 1–5).

    ``image`` ``(X, Y, Z)`` in any linear intensity unit (windowed [0, 1] on the network grid);
    ``lumen_fraction`` ``(X, Y, Z)`` in [0, 1]. Returns a float (a maximum over the core, no reduction
    over patients); ``-inf`` when no core voxel has ``min_voxels`` core neighbours.
    """
    core = ndimage.binary_erosion(np.asarray(lumen_fraction) >= core_fraction)
    if core.sum() < max(min_voxels, 2):
        return float("-inf")
    values = np.asarray(image, dtype=np.float64)[core]
    blood = float(np.median(values))
    z = np.zeros(core.shape, dtype=np.float64)
    z[core] = sign * (values - blood)
    k = int(kernel)
    total = ndimage.uniform_filter(z, size=k, mode="constant") * k**3
    count = np.rint(ndimage.uniform_filter(core.astype(np.float64), size=k, mode="constant") * k**3)
    ok = core & (count >= min_voxels)
    if not ok.any():
        return float("-inf")
    return float(np.max(total[ok] / np.sqrt(count[ok])))


def lumen_on_grid(lumen_path: str | Path, npz: Mapping[str, Any], patient: str) -> np.ndarray:
    """The truth lumen (NCT grid, 0/1) as a fraction on the preprocessed, cropped grid of ``npz``."""
    try:
        img = nib.load(str(lumen_path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(patient, lumen_path, f"cannot read the truth lumen ({err})") from err
    can = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    shape = tuple(int(s) for s in np.asarray(npz["nct"]).shape)
    out = resample_from_to(can, (shape, np.asarray(npz["affine"])), order=1, mode="constant", cval=0.0)
    return np.clip(np.asarray(out.dataobj, dtype=np.float32), 0.0, 1.0)


def patient_scores(
    patient: str, preprocessed: str | Path, lumen_path: str | Path, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``{"patient_id", "label", "nct", "ctpa"}``: the observer's score per phase for one patient."""
    p = {**DEFAULTS, **(params or {})}
    try:
        with np.load(preprocessed) as z:
            npz = {k: z[k] for k in ("nct", "ctpa", "affine", "label")}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise InputError(patient, preprocessed, f"cannot read the preprocessed volume ({err})") from err
    frac = lumen_on_grid(lumen_path, npz, patient)
    out: dict[str, Any] = {"patient_id": patient, "label": int(npz["label"])}
    for phase, sign in SIGN.items():
        out[phase] = observer_score(
            npz[phase], frac, sign, float(p["core_fraction"]), int(p["kernel"]), int(p["min_voxels"])
        )
    return out


def ceiling_table(rows: Sequence[Mapping[str, Any]], splits: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per phase and split (and ``all``): patients, PE patients, AUC and its DeLong 95% CI."""

    table = []
    for phase in SIGN:
        for split in ("train", "val", "test", "all"):
            sel = [r for r in rows if split == "all" or splits.get(r["patient_id"]) == split]
            y = np.array([r["label"] for r in sel], dtype=int)
            s = np.array([r[phase] for r in sel], dtype=float)
            s = np.where(np.isfinite(s), s, np.nanmin(s[np.isfinite(s)]) - 1 if np.isfinite(s).any() else 0)
            rec: dict[str, Any] = {"phase": phase, "split": split, "n": len(sel), "n_pe": int(y.sum())}
            if 0 < y.sum() < len(y):
                ci = delong_ci(y, s)
                rec.update(auc=ci.auc, auc_low=ci.ci[0], auc_high=ci.ci[1])
            else:
                rec.update(auc=float("nan"), auc_low=float("nan"), auc_high=float("nan"))
            table.append(rec)
    return table


def write_ceiling(
    table: Sequence[Mapping[str, Any]], scores: Sequence[Mapping[str, Any]], out: str | Path
) -> None:
    """``out`` (the table, TSV) and ``out`` with ``.scores.tsv`` (the per-patient scores), atomically."""
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in table:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    with atomic_path(out.with_suffix(".scores.tsv")) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=("patient_id", "label", "nct", "ctpa"), delimiter="\t")
        w.writeheader()
        for r in scores:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--splits", required=True, help="splits TSV (patient_id, split)")
    parser.add_argument("--preprocessed-dir", required=True, help="folder of {pid}.npz")
    parser.add_argument(
        "--truth-dir", required=True, help="the phantom's truth/ folder ({pid}/lumen_nct.nii.gz)"
    )
    parser.add_argument("--out", required=True, help="ceiling TSV (per-patient scores beside it)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        params = resolve(args, "ceiling")
        parts = read_splits(args.splits)
        split_of = {pid: k for k, ids in parts.items() for pid in ids}
        scores = [
            patient_scores(
                pid,
                Path(args.preprocessed_dir) / f"{pid}.npz",
                Path(args.truth_dir) / pid / "lumen_nct.nii.gz",
                params,
            )
            for pid in split_of
        ]
        table = ceiling_table(scores, split_of)
        write_ceiling(table, scores, args.out)
    except InputError as err:
        return report(err)
    for r in table:
        ci = f"{r['auc_low']:.3f}-{r['auc_high']:.3f}"
        print(f"ceiling {r['phase']} {r['split']}: n={r['n']} AUC {r['auc']:.3f} ({ci})")
    return 0
