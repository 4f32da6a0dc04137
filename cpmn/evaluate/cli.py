"""``cpmn evaluate``: metrics, statistics, Table 1, Table 2 and Fig. 2 from prediction folders.

Example::

    cpmn evaluate --predictions nct=results/predictions/nct cpmn=results/predictions/cpmn \\
        --out-tables results/tables --out-figures results/figures --stats results/stats.json \\
        --readers results/cohort/readers.tsv --config config/config.yaml
"""

from __future__ import annotations

import argparse
import sys

from cpmn.config import add_config_arguments, resolve
from cpmn.errors import InputError, report
from cpmn.evaluate import evaluate_study


def _variant_dir(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected VARIANT=DIR, got {text!r}")
    return name, folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        type=_variant_dir,
        metavar="VARIANT=DIR",
        help="one folder per variant holding val.tsv and test.tsv",
    )
    parser.add_argument(
        "--out-tables", required=True, metavar="DIR", help="folder for table1/table2 (.tsv/.md/.tex)"
    )
    parser.add_argument(
        "--out-figures", required=True, metavar="DIR", help="folder for fig2a_roc and fig2b_case"
    )
    parser.add_argument(
        "--stats", required=True, metavar="JSON", help="stats.json with every metric and p-value"
    )
    parser.add_argument(
        "--readers", default=None, metavar="TSV", help="reader study: reader, patient_id, decision"
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:

    names = [v for v, _ in args.predictions]
    if len(set(names)) != len(names):
        print(f"ERROR --predictions: a variant is given twice ({', '.join(names)})", file=sys.stderr)
        return 1
    try:
        cfg = resolve(args, "evaluate")
        evaluate_study(
            dict(args.predictions),
            args.out_tables,
            args.out_figures,
            args.stats,
            readers=args.readers,
            cfg=cfg,
        )
    except InputError as err:
        return report(err)
    return 0
