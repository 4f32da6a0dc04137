"""``cpmn curves``: the training curves of every variant in one figure, from the ``train_log.tsv`` files.

One panel per loss term (Eq. 5's ``L_clas``, ``L_seg``, ``L_KL``, ``L_alig``, ``L_disc``, DML's
``L_mutual``, ``L_total``; per-epoch means over the steps) and two for validation (patient AUC with the
score that inference reports, mean Dice over the validation PE patients), epochs on the x axis, one line per
variant. A term a variant does not use (its λ is 0, so it logs 0) is left out of that panel.

    cpmn curves --logs nct=results/models/nct/train_log.tsv cpmn=... --out results/figures/training_curves.png
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Mapping
from pathlib import Path

from cpmn.errors import InputError, atomic_path, report

PANELS = ("L_clas", "L_seg", "L_KL", "L_alig", "L_disc", "L_mutual", "L_total", "val_auc", "val_dice")
TITLES = {"val_auc": "validation AUC", "val_dice": "validation Dice (PE patients)"}


def read_log(path: str | Path, variant: str) -> dict[str, list[float]]:
    """``{column: [value per epoch]}`` of one ``train_log.tsv`` (empty cells and NaN -> NaN)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(None, path, f"variant {variant}: cannot read the training log ({err})") from err
    if not rows or "epoch" not in rows[0]:
        raise InputError(None, path, f"variant {variant}: training log has no epoch rows")
    out: dict[str, list[float]] = {}
    for key in ("epoch", *PANELS):
        vals = []
        for r in rows:
            try:
                vals.append(float(r.get(key) or "nan"))
            except ValueError as err:
                raise InputError(
                    None, path, f"variant {variant}: {key} {r.get(key)!r} is not a number"
                ) from err
        out[key] = vals
    return out


def plot_curves(logs: Mapping[str, Mapping[str, list[float]]], out: str | Path) -> Path:
    """Write the 3 × 3 panel figure (PNG) of :data:`PANELS` for every variant in ``logs``."""
    # matplotlib: heavy, and the Agg backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(12, 9), constrained_layout=True)
    for ax, key in zip(axes.flat, PANELS, strict=True):
        for k, (variant, log) in enumerate(logs.items()):
            ys = log[key]
            if key.startswith("L_") and key not in ("L_clas", "L_seg", "L_total"):
                if all(math.isnan(v) or v == 0 for v in ys):
                    continue  # the variant does not use this term
            ax.plot(log["epoch"], ys, marker="o", ms=3, label=variant, color=f"C{k % 10}")  # one colour each
        ax.set_title(TITLES.get(key, key))
        ax.set_xlabel("epoch")
        if key.startswith("val_"):
            ax.set_ylim(0, 1)
            if key == "val_auc":
                ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        elif key in ("L_clas", "L_seg", "L_total"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper")
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--logs", nargs="+", required=True, metavar="VARIANT=TSV", help="train_log.tsv per variant"
    )
    parser.add_argument("--out", required=True, help="output PNG")


def run(args: argparse.Namespace) -> int:
    try:
        logs = {}
        for item in args.logs:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise InputError(None, item, "expected VARIANT=TSV")
            logs[name] = read_log(path, name)
        plot_curves(logs, args.out)
    except InputError as err:
        return report(err)
    return 0
