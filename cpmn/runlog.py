"""What the workflow says around a run: the sheet's columns first; exclusions and failures at the end.

The Snakefile's ``onsuccess`` / ``onerror`` handlers and ``workflow/rules/common.smk`` call these; they use
the standard library only, so the Snakemake process can import them without the package's dependencies.

- :func:`sheet_column_error`: a cohort sheet that cannot be read or lacks a column of
  ``workflow/schemas/cohort.schema.yaml``'s ``required`` (checked before any job, with a hint when the
  header is comma- or semicolon-separated).
- :func:`exclusion_lines`: the screening's exclusions (``results/qc/excluded.tsv``) repeated at the end.
- :func:`failed_patients` and :func:`failure_lines`: after a failed run, the patients that passed screening
  but failed a later stage, read from the Snakemake log and the failed jobs' logs, and the
  ``cohort.exclude`` that lets the rest of the cohort go on.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

#: how the Snakemake log opens a failed job's block
FAILED_JOB = "Error in rule "
#: the line a cpmn stage prints for a bad input (:func:`cpmn.errors.report`)
ERROR_LINE = re.compile(r"ERROR patient (\S+): ")


def _header(path: str | os.PathLike) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.readline().rstrip("\r\n")


def sheet_column_error(sheet: str | os.PathLike, required: Sequence[str]) -> str | None:
    """``None`` when the tab-separated ``sheet`` has every ``required`` column, else the one-line reason
    (``cohort sheet S: lacks column(s) ...`` or ``cohort sheet S: cannot read it (...)``)."""
    try:
        header = _header(sheet)
    except (OSError, UnicodeError) as err:
        return f"cohort sheet {sheet}: cannot read it ({type(err).__name__}: {err})"
    columns = [c.strip() for c in header.split("\t")]
    missing = [c for c in required if c not in columns]
    if not missing:
        return None
    hint = next(
        (
            f" (the sheet is read as tab-separated, TSV; this header is {name}-separated: save it as TSV)"
            for sep, name in ((",", "comma"), (";", "semicolon"))
            if "\t" not in header and sep in header
        ),
        "",
    )
    return f"cohort sheet {sheet}: lacks column(s) {', '.join(missing)}{hint}"


def exclusion_lines(excluded_tsv: str | os.PathLike) -> list[str]:
    """One ``EXCLUDED patient P: FILE: reason`` line per row of the screening's ``excluded.tsv`` and a
    count; ``[]`` when the file does not exist (screening has not run) or is empty."""
    path = Path(excluded_tsv)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    lines = [f"EXCLUDED patient {r['patient_id'] or '?'}: {r['file']}: {r['reason']}" for r in rows]
    if rows:
        ids = len({r["patient_id"] for r in rows})
        lines.append(f"{len(rows)} row(s) excluded by screening ({ids} patient id(s)): see {path}")
    return lines


def _job_logs(line: str) -> list[str]:
    """The job log paths of a failed job block's ``log: a, b (check log file(s) for error details)``."""
    return line.strip()[len("log: ") :].split(" (check log")[0].split(", ")


def failed_patients(snakemake_logs: Iterable[str | os.PathLike] | None) -> dict[str, str]:
    """``{patient: error line}`` of the jobs that failed with a cpmn error line.

    Each failed job's block in the Snakemake log (``Error in rule ...``, then indented fields) names the
    job's log; the first ``ERROR patient P: FILE: reason`` line there names the patient. ``?`` stands for
    an error of the cohort as a whole (the split, for one). Unreadable logs are skipped.
    """
    failed: dict[str, str] = {}
    for main in snakemake_logs or []:
        try:
            text = Path(main).read_text(errors="replace")
        except OSError:
            continue
        in_block = False
        for line in text.splitlines():
            if line.startswith(FAILED_JOB):
                in_block = True
            elif in_block and line.strip().startswith("log: "):
                in_block = False
                for job_log in _job_logs(line):
                    try:
                        lines = Path(job_log).read_text(errors="replace").splitlines()
                    except OSError:
                        continue
                    for err in lines:
                        m = ERROR_LINE.match(err)
                        if m:
                            failed.setdefault(m.group(1), err)
            elif in_block and not line.startswith(" "):
                in_block = False
    return failed


def failure_lines(
    snakemake_logs: Iterable[str | os.PathLike] | None, exclude: Sequence[str] = ()
) -> list[str]:
    """After a failed run: ``FAILED: reason`` for errors of the cohort or the study as a whole,
    ``FAILED after screening: patient P: FILE: reason`` per patient, and the ``cohort.exclude`` (the
    config's ``exclude`` plus these patients) that leaves them out so that the rest of the cohort goes on."""
    failed = failed_patients(snakemake_logs)
    lines = []
    for pid in ("?", "None"):  # no patient to leave out: the cohort (or a file of the study) is at fault
        if pid in failed:
            lines.append(f"FAILED: {failed.pop(pid).split(': ', 1)[1]}")
    lines += [f"FAILED after screening: {err[len('ERROR ') :]}" for err in failed.values()]
    if failed:
        ids = ", ".join(dict.fromkeys([*map(str, exclude or []), *failed]))
        lines.append(
            f"{len(failed)} patient(s) failed after screening. Fix the input, or leave them out: set"
            f" cohort.exclude: [{ids}] in the config and run again; the jobs already done are kept."
        )
    return lines
