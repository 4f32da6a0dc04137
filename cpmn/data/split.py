"""Temporal hold-out split: the latest calendar year is the test set, 20% of the rest is validation.

``cpmn split --sheet COHORT.tsv --out results/splits.tsv``

The test set is every patient whose ``study_date`` falls in the latest calendar year present in the
sheet (a temporal hold-out: the model is tested on scans acquired after everything it was trained and
tuned on). The earlier patients are split at random into train and validation (``val_fraction``),
stratified by ``label`` (``sklearn.model_selection.train_test_split(stratify=...)``) with ``seed``.
Each split must hold at least one PE and one normal patient (AUC is undefined otherwise); a clear
error says which split failed.

Output TSV columns: ``patient_id, split`` (train | val | test), then ``label`` and ``study_date``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.model_selection import train_test_split

from cpmn.config import add_config_arguments, resolve, schema_defaults
from cpmn.data.screen import read_sheet
from cpmn.errors import InputError, atomic_path, report

#: the ``split:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("split")

SPLITS = ("train", "val", "test")


def temporal_split(
    df: pd.DataFrame, params: dict[str, Any] | None = None, source: str = "cohort sheet"
) -> pd.DataFrame:
    """Assign ``split`` to every row of ``df`` (columns ``patient_id, label, study_date``).

    Returns a new frame ``patient_id, split, label, study_date`` in the input order. Raises
    :class:`InputError` (naming ``source`` and the offending row or split) on bad dates or labels, duplicate
    patients, or a split that is empty or lacks positives or negatives.
    """
    p = {**DEFAULTS, **(params or {})}
    missing = [c for c in ("patient_id", "label", "study_date") if c not in df.columns]
    if missing:
        raise InputError(None, source, f"missing column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise InputError(
            None, source, "no patients to split (when screening excluded every row, see qc/excluded.tsv)"
        )
    out = pd.DataFrame({"patient_id": df["patient_id"].astype(str)})
    dates = pd.to_datetime(df["study_date"], errors="coerce", format="ISO8601")
    labels = pd.to_numeric(df["label"], errors="coerce")
    for i in range(len(df)):
        pid = out["patient_id"].iloc[i]
        if pd.isna(dates.iloc[i]):
            raise InputError(
                pid, source, f"row {i + 1}: study_date {df['study_date'].iloc[i]!r} is not an ISO date"
            )
        if labels.iloc[i] not in (0, 1):
            raise InputError(pid, source, f"row {i + 1}: label {df['label'].iloc[i]!r} is not 0 or 1")
    dup = out["patient_id"][out["patient_id"].duplicated()]
    if len(dup):
        raise InputError(dup.iloc[0], source, "patient_id appears more than once")
    out["label"] = labels.astype(int).to_numpy()
    out["study_date"] = dates.dt.strftime("%Y-%m-%d").to_numpy()
    year = dates.dt.year.to_numpy()
    test_year = int(year.max())
    is_test = year == test_year
    rest = out.index[~is_test]
    if len(rest) == 0:
        raise InputError(None, source, f"all patients are from {test_year}: no earlier years to train on")
    out["split"] = "test"
    rest_labels = out.loc[rest, "label"]
    try:
        train_idx, val_idx = train_test_split(
            rest.to_numpy(),
            test_size=float(p["val_fraction"]),
            stratify=rest_labels.to_numpy(),
            random_state=int(p["seed"]),
        )
    except ValueError as exc:
        counts = rest_labels.value_counts().to_dict()
        raise InputError(
            None, source, f"cannot stratify the pre-{test_year} patients {counts} into train/val: {exc}"
        ) from exc
    out.loc[train_idx, "split"] = "train"
    out.loc[val_idx, "split"] = "val"
    _validate(out, source, test_year)
    return out[["patient_id", "split", "label", "study_date"]]


def counts(split_df: pd.DataFrame) -> pd.DataFrame:
    """Per split: ``n``, ``pe`` (positives), ``normal`` and the date range."""
    rows = []
    for name in SPLITS:
        part = split_df[split_df["split"] == name]
        rows.append(
            {
                "split": name,
                "n": len(part),
                "pe": int((part["label"] == 1).sum()),
                "normal": int((part["label"] == 0).sum()),
                "first": part["study_date"].min() if len(part) else "-",
                "last": part["study_date"].max() if len(part) else "-",
            }
        )
    return pd.DataFrame(rows)


def _validate(split_df: pd.DataFrame, source: str, test_year: int) -> None:
    for row in counts(split_df).itertuples():
        where = f"{row.split} split" + (f" (year {test_year})" if row.split == "test" else "")
        if row.n == 0:
            raise InputError(None, source, f"the {where} is empty")
        if row.pe == 0:
            raise InputError(None, source, f"the {where} has no positive (PE) patient among {row.n}")
        if row.normal == 0:
            raise InputError(None, source, f"the {where} has no negative (normal) patient among {row.n}")


def split_sheet(sheet: str | Path, out: str | Path, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """Read the cohort sheet (TSV), split it, write ``out`` (TSV) and print the counts per split."""
    sheet = Path(sheet)

    try:
        df = read_sheet(sheet)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(None, sheet, f"cannot read cohort sheet ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(None, sheet, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    result = temporal_split(df, params, source=str(sheet))
    with atomic_path(out) as tmp:
        result.to_csv(tmp, sep="\t", index=False)
    print(counts(result).to_string(index=False))
    return result


def read_splits(path: str | Path) -> dict[str, list[str]]:
    """``{split: [patient_id, ...]}`` from the splits TSV (``patient_id``, ``split``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(None, path, "splits file not found")
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            if not reader.fieldnames or not {"patient_id", "split"} <= set(reader.fieldnames):
                raise InputError(None, path, "splits TSV needs columns patient_id and split")
            for i, row in enumerate(reader):
                if row["split"] not in out:  # a renamed split would silently lose its patients
                    raise InputError(
                        row["patient_id"],
                        path,
                        f"row {i + 1}: split {row['split']!r} is not train, val or test",
                    )
                out[row["split"]].append(row["patient_id"])
    except UnicodeDecodeError as err:
        raise InputError(None, path, f"not UTF-8 text ({err.reason} at byte {err.start})") from err
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sheet", required=True, help="cohort sheet TSV (patient_id, label, study_date, ...)"
    )
    parser.add_argument("--out", required=True, help="output splits TSV")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        split_sheet(args.sheet, args.out, resolve(args, "split"))
    except InputError as err:
        return report(err)
    return 0
