"""Collect per-patient registration QC files (``qc.json``) into one TSV.

``cpmn collect-qc --out results/qc/registration.tsv D1/qc.json D2/qc.json ...``

One row per patient, sorted by ``patient_id``; the summary printed to stdout gives the mean Dice against
the phantom truth (patients without truth, NaN, are left out), in how many patients registration raised
the NCC, the smallest Jacobian determinant and the largest folding percentage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cpmn.errors import InputError, atomic_path, report

#: columns written first, in this order; any further keys follow alphabetically
COLUMNS = [
    "patient_id",
    "ncc_before",
    "ncc_after",
    "jac_min",
    "folding_pct",
    "seconds",
    "dice_truth",
    "transform",
]


def collect_qc(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Read every ``qc.json`` in ``paths``, write the sorted table to ``out`` (TSV) and print a summary."""
    rows = []
    for path in paths:
        path = Path(path)
        try:
            row = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(None, path, f"cannot read QC JSON ({exc})") from exc
        if not isinstance(row, dict) or "patient_id" not in row:
            raise InputError(None, path, "QC JSON has no patient_id")
        rows.append({k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in row.items()})
    if not rows:
        raise InputError(None, out, "no QC files given")
    df = pd.DataFrame(rows)
    df["patient_id"] = df["patient_id"].astype(str)
    dup = df["patient_id"][df["patient_id"].duplicated()].tolist()
    if dup:
        raise InputError(dup[0], out, "patient appears in more than one QC file")
    for col in COLUMNS:
        if col not in df:
            df[col] = float("nan")
    df = df[COLUMNS + sorted(c for c in df.columns if c not in COLUMNS)]
    df = df.sort_values("patient_id", kind="stable").reset_index(drop=True)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, sep="\t", index=False, na_rep="NaN")
    print(summary(df))
    return df


def summary(df: pd.DataFrame) -> str:
    """A few lines: patients, mean/min Dice vs truth, NCC improvements, Jacobian and folding extremes."""
    n = len(df)
    dice = pd.to_numeric(df["dice_truth"], errors="coerce").dropna()
    before = pd.to_numeric(df["ncc_before"], errors="coerce")
    after = pd.to_numeric(df["ncc_after"], errors="coerce")
    both = before.notna() & after.notna()
    improved = int((after[both] > before[both]).sum())
    lines = [f"registration QC: {n} patients"]
    if len(dice):
        lines.append(
            f"  mean Dice(warped mask, truth) {dice.mean():.3f} (min {dice.min():.3f}, n={len(dice)})"
        )
    else:
        lines.append("  mean Dice(warped mask, truth) n/a (no truth masks)")
    no_before = "" if both.all() else f" ({n - int(both.sum())} without an NCC before or after)"
    lines.append(f"  NCC improved in {improved}/{int(both.sum())} patients{no_before}")
    jac = pd.to_numeric(df["jac_min"], errors="coerce")
    fold = pd.to_numeric(df["folding_pct"], errors="coerce")
    if jac.notna().any():
        lines.append(f"  min Jacobian determinant {jac.min():.3f}; max folding {fold.max():.4f}% of voxels")
    sec = pd.to_numeric(df["seconds"], errors="coerce")
    if sec.notna().any() and not math.isnan(sec.mean()):
        lines.append(f"  seconds per patient: mean {sec.mean():.1f}, max {sec.max():.1f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output TSV (e.g. results/qc/registration.tsv)")
    parser.add_argument("qc", nargs="+", help="per-patient qc.json files")


def run(args: argparse.Namespace) -> int:
    try:
        collect_qc(args.qc, args.out)
    except InputError as err:
        return report(err)
    return 0
