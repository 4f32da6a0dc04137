"""Retrain variants of a finished study with other training seeds or scaled transfer weights (same data).

Issue 24 asks whether CPMN's distance from NCT-only on the phantom benchmark is an effect of the transfer or
the spread that any retraining has, and whether other transfer weights than the paper's do better on
validation, and whether a longer schedule changes the answer. This retrains ``--variant`` with ``train.seed``
= each of ``--seeds``, its ``lambda1..3`` multiplied by each of ``--lambda-scale`` and ``train.epochs`` =
``--epochs`` if given (everything else as the study's config), and infers the test split with the study's
``infer`` settings (score ``infer.score``; no Grad-CAM, masks on the preprocessed grid).
Per run it writes the validation AUC and Dice of the chosen checkpoint (the choice is made on these), the
test AUC with its DeLong CI, and the paired DeLong p against the study's own run of the same variant
(``predictions/<v>/test.tsv``, trained with the config's ``train.seed`` and λ) and of ``--against``.

    python benchmarks/seed_replicate.py --results results/benchmark --config config/config.yaml \\
        config/benchmark.yaml --variant nct --seeds 1 --out docs/benchmark/synthetic/seed_replicates.tsv
    python benchmarks/seed_replicate.py --results results/benchmark --config config/config.yaml \\
        config/benchmark.yaml --variant cpmn --seeds 0 --lambda-scale 3 10 --against nct --out lambda.tsv
"""

from __future__ import annotations

import argparse
import copy
import csv
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from cpmn import stats
from cpmn.config import load_config
from cpmn.infer import infer_split
from cpmn.train import train_variant


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--config", nargs="+", default=["config/config.yaml"])
    ap.add_argument("--variant", nargs="+", default=["nct"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    ap.add_argument("--lambda-scale", nargs="+", type=float, default=[1.0], help="multiplies lambda1..3")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the study's)")
    ap.add_argument("--against", default=None, help="a second reference variant for the paired p (e.g. nct)")
    ap.add_argument("--work", default=None, help="where the replicates train (default: RESULTS/replicates)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = Path(args.results)
    work = Path(args.work) if args.work else res / "replicates"
    cfg = load_config(*args.config)
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    rows = []
    against = args.against
    other = None
    if against:
        other = pd.read_csv(res / "predictions" / against / "test.tsv", sep="\t").set_index("patient_id")
    for name in args.variant:
        ref = pd.read_csv(res / "predictions" / name / "test.tsv", sep="\t").set_index("patient_id")
        y = ref["label"].to_numpy()
        ref_ci = stats.delong_ci(y, ref["prob"].to_numpy())
        entry = cfg["variants"][name]
        val = _chosen_epoch(res / "models" / name / "train_log.tsv")
        rows.append(
            {
                "variant": name,
                "train_seed": int(cfg["train"]["seed"]),
                "epochs": int(cfg["train"]["epochs"]),
                "lambda_scale": "1",
                "lambdas": _lambdas(entry),
                "val_auc": val["val_auc"],
                "val_dice": val["val_dice"],
                "test_auc": f"{ref_ci.auc:.3f}",
                "ci": f"{ref_ci.ci[0]:.3f}-{ref_ci.ci[1]:.3f}",
                "p_vs_study_run": "-",
                "p_vs_against": _p(y, ref, other),
                "seconds": "-",
            }
        )
        for seed, scale in [(s, x) for s in args.seeds for x in args.lambda_scale]:
            run_cfg = copy.deepcopy(cfg)
            run_cfg["train"]["seed"] = seed
            if args.epochs:
                run_cfg["train"]["epochs"] = args.epochs
            run_entry = run_cfg["variants"][name]
            for k in ("lambda1", "lambda2", "lambda3"):
                run_entry[k] = float(run_entry.get(k, 0.0)) * scale
            out = work / (f"{name}_seed{seed}" if scale == 1.0 else f"{name}_seed{seed}_x{scale:g}")
            if args.epochs:
                out = out.with_name(f"{out.name}_e{args.epochs}")
            t0 = time.perf_counter()
            train_variant(name, res / "splits.tsv", res / "preprocessed", res / "patches", out, run_cfg)
            params = {**run_cfg["infer"], "cam_splits": [], "compare_scores": []}
            pred = infer_split(
                out / "model.pt",
                res / "splits.tsv",
                "test",
                res / "preprocessed",
                out / "test.tsv",
                params,
                patch_size=tuple(run_cfg["patches"]["size"]),
            ).set_index("patient_id")
            seconds = time.perf_counter() - t0
            pred = pred.loc[ref.index]
            ci = stats.delong_ci(y, pred["prob"].to_numpy())
            test = stats.delong_test(y, pred["prob"].to_numpy(), ref["prob"].to_numpy())
            val = _chosen_epoch(out / "train_log.tsv")
            rows.append(
                {
                    "variant": name,
                    "train_seed": seed,
                    "epochs": int(run_cfg["train"]["epochs"]),
                    "lambda_scale": f"{scale:g}",
                    "lambdas": _lambdas(run_entry),
                    "val_auc": val["val_auc"],
                    "val_dice": val["val_dice"],
                    "test_auc": f"{ci.auc:.3f}",
                    "ci": f"{ci.ci[0]:.3f}-{ci.ci[1]:.3f}",
                    "p_vs_study_run": f"{test.p:.3f}",
                    "p_vs_against": _p(y, pred, other),
                    "seconds": f"{seconds:.0f}",
                }
            )
            print(rows[-1], flush=True)
    with open(args.out, "w", newline="") as fh:
        score = cfg["infer"]["score"]
        ref_name = f"; p_vs_against: paired DeLong against {against}" if against else ""
        fh.write(f"# benchmarks/seed_replicate.py, commit {commit}: test year, score {score}{ref_name}\n")
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return 0


def _chosen_epoch(log: Path) -> dict[str, str]:
    """Validation AUC and Dice of the epoch that training kept (the last with the best validation AUC)."""
    df = pd.read_csv(log, sep="\t")
    best = df[df["val_auc"] == df["val_auc"].max()].iloc[-1]
    return {"val_auc": f"{best['val_auc']:.3f}", "val_dice": f"{best['val_dice']:.3f}"}


def _lambdas(entry: dict) -> str:
    return "/".join(f"{float(entry.get(k, 0.0)):g}" for k in ("lambda1", "lambda2", "lambda3"))


def _p(y, pred: pd.DataFrame, other: pd.DataFrame | None) -> str:
    if other is None:
        return "-"
    o = other.loc[pred.index]
    return f"{stats.delong_test(y, pred['prob'].to_numpy(), o['prob'].to_numpy()).p:.3f}"


if __name__ == "__main__":
    sys.exit(main())
