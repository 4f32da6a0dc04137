"""The ``cpmn`` command: one subcommand per stage, each a thin call into a module.

Every stage module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
lazily so that, for example, ``cpmn evaluate`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cpmn import __version__
from cpmn.errors import InputError, report

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synthetic": ("cpmn.synthetic.cli", "generate the synthetic dual-phase cohort (DICOM, masks, truth)"),
    "screen": ("cpmn.data.screen", "check every cohort-sheet row; write the included and excluded tables"),
    "convert": ("cpmn.data.convert", "DICOM -> NIfTI with dcm2niix, picking the NCT and CTPA series"),
    "register": ("cpmn.data.register", "register CTPA to NCT (antspyx) and warp image and mask"),
    "collect-qc": ("cpmn.data.qc", "collect per-patient QC JSON files into one TSV"),
    "preprocess": ("cpmn.data.preprocess", "resample, HU window, body crop: one .npz per patient"),
    "patches": ("cpmn.data.patches", "balanced bank of patch centres per patient"),
    "split": ("cpmn.data.split", "temporal hold-out test year plus a stratified validation split"),
    "train": ("cpmn.train", "train one variant (single or dual pathway)"),
    "infer": ("cpmn.infer", "sliding-window inference: patient probability, mask and CAM"),
    "ceiling": ("cpmn.synthetic.observer", "the phantom's ceiling: a truth-informed observer's AUC by phase"),
    "fumpe": ("cpmn.fumpe", "the FUMPE 2D experiment: train on CTPA slices, Dice per test patient"),
    "curves": (
        "cpmn.evaluate.curves",
        "training curves of every variant (loss terms, validation AUC and Dice)",
    ),
    "evaluate": ("cpmn.evaluate.cli", "metrics, statistics, Table 1, Table 2 and Fig. 2"),
    "card": ("cpmn.card", "write a model folder's card.json (settings, threshold, training data, version)"),
    "predict": ("cpmn.predict", "one new NCT scan (DICOM or NIfTI) through a model folder"),
    "export-bundle": ("cpmn.bundle", "a model folder as a MONAI bundle (configs/, models/, metadata)"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpmn", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"cpmn {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def _version() -> str:

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        _top_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"cpmn {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except InputError as err:  # e.g. a config key that breaks the schema, raised before a stage's own try
        return report(err)
    except OSError as err:  # an output folder that cannot be made or written, a disk that is full
        if err.filename is None:  # no file to name: let the traceback say where it came from
            raise
        where = f" (-> {err.filename2})" if err.filename2 else ""
        return report(InputError(None, err.filename, f"{err.strerror or err}{where}"))


if __name__ == "__main__":
    sys.exit(main())
