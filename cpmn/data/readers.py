"""The reader-study TSV (``reader, patient_id, decision``): read by screening, which checks it against the
cohort sheet, and by the evaluation, which scores the readers against the models (no torch)."""

from __future__ import annotations

import csv
from pathlib import Path

from cpmn.errors import InputError

READER_COLUMNS = ("reader", "patient_id", "decision")


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A tab-separated file's header and rows (``csv.DictReader``); an unreadable or non-UTF-8 file raises
    :class:`InputError` naming it."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except OSError as err:
        raise InputError(None, path, f"cannot read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise InputError(None, path, f"not UTF-8 text ({err.reason} at byte {err.start})") from err
    return header, rows


def load_readers(path: str | Path, patients: set[str] | None = None) -> dict[str, dict[str, int]]:
    """Reader-study TSV ``reader, patient_id, decision (0/1)`` -> {reader: {patient_id: decision}}.

    A bad row raises :class:`InputError` naming the readers file, the data row and its line, and the
    patient in the reason (not as the patient at fault: the readers file is, so no ``cohort.exclude``
    advice follows it). With ``patients``, a patient id outside that set is an error too (screening passes
    the cohort sheet's ids)."""
    path = Path(path)
    header, rows = read_tsv(path)
    missing = [c for c in READER_COLUMNS if c not in header]
    if missing:
        raise InputError(None, path, f"readers file: missing column(s) {', '.join(missing)}")
    out: dict[str, dict[str, int]] = {}
    for i, row in enumerate(rows, start=1):
        pid, reader, dec = ((row[k] or "").strip() for k in ("patient_id", "reader", "decision"))
        where = f"readers file, data row {i} (line {i + 1}), reader {reader}, patient {pid}"
        if dec not in ("0", "1", "0.0", "1.0"):
            raise InputError(None, path, f"{where}: decision must be 0 or 1, got {dec!r}")
        if pid in out.setdefault(reader, {}):
            raise InputError(None, path, f"{where}: duplicate patient")
        if patients is not None and pid not in patients:
            raise InputError(
                None,
                path,
                f"readers file, data row {i} (line {i + 1}): patient {pid!r} is not in the cohort sheet",
            )
        out[reader][pid] = int(float(dec))
    if not out:
        raise InputError(None, path, "no rows")
    return out
