"""One error type for bad input, so that every stage reports it on one line naming patient and file."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InputError(Exception):
    """Bad input for one patient: ``str(err)`` is ``patient P: <path>: <reason>``."""

    def __init__(self, patient: str | None, path: str | os.PathLike | None, reason: str):
        self.patient = patient or "?"
        self.path = str(path) if path is not None else "-"
        self.reason = reason
        super().__init__(f"patient {self.patient}: {self.path}: {reason}")


def report(err: InputError) -> int:
    """Print the one-line error to stderr and return the exit status for the CLI."""
    print(f"ERROR {err}", file=sys.stderr)
    return 1


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``final`` only if the block succeeds.

    Nothing partial is left behind on failure: the temporary file is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    tmp = final.with_name(f".{final.name.removesuffix(suffix)}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
