"""``cpmn synthetic --out DIR --patients N --seed S [--config FILE] [--params JSON]``: the cohort."""

from __future__ import annotations

import argparse
import time

from cpmn.config import add_config_arguments, resolve
from cpmn.errors import InputError, report
from cpmn.synthetic.cohort import generate_cohort
from cpmn.synthetic.fumpe import generate_fumpe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="cohort folder (cohort.tsv, dicom/, masks/, truth/ ...)")
    parser.add_argument(
        "--patients", type=int, default=None, help="number of patients (overrides the config)"
    )
    parser.add_argument("--seed", type=int, default=None, help="cohort seed (overrides the config)")
    parser.add_argument("--no-montage", action="store_true", help="skip montage.png")
    parser.add_argument("--quiet", action="store_true", help="no per-patient progress lines")
    parser.add_argument("--jobs", type=int, default=1, help="patients generated in parallel (processes)")
    parser.add_argument(
        "--layout",
        choices=("cohort", "fumpe"),
        default="cohort",
        help="cohort: the dual-phase study | fumpe: FUMPE's layout (CT_scans/, GroundTruth/*.mat), PE only",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:

    params = resolve(args, "synthetic")
    if args.patients is not None:
        params["patients"] = args.patients
    if args.seed is not None:
        params["seed"] = args.seed
    if args.no_montage:
        params["montage"] = False
    t0 = time.perf_counter()
    if args.layout == "fumpe":
        try:
            ids = generate_fumpe(args.out, params, progress=not args.quiet)
        except InputError as err:
            return report(err)
        print(f"FUMPE-shaped set: {len(ids)} patients in {args.out} ({time.perf_counter() - t0:.0f} s)")
        return 0
    try:
        sheet = generate_cohort(args.out, params, progress=not args.quiet, jobs=args.jobs)
    except InputError as err:
        return report(err)
    n = len(sheet)
    dt = time.perf_counter() - t0
    print(
        f"wrote {n} patients ({int(sheet.label.sum())} PE) to {args.out} in {dt:.1f} s "
        f"({sheet.seconds.mean():.2f} s per patient)"
    )
    return 0
