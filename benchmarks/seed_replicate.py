"""Run-to-run variation: retrain variants of a finished study with other training seeds, same data and split.

Issue 24 asks whether CPMN's distance from NCT-only on the phantom benchmark is an effect of the transfer or
the spread that any retraining has. This retrains ``--variant`` with ``train.seed`` = each of ``--seeds``
(everything else as the study's config) and infers the test split with the study's ``infer`` settings
(score ``infer.score``; no Grad-CAM, masks on the preprocessed grid). Per run it writes the test AUC with
its DeLong CI and the paired DeLong p against the study's own run of the same variant
(``predictions/<v>/test.tsv``, trained with the config's ``train.seed``).

    python benchmarks/seed_replicate.py --results results/benchmark --config config/config.yaml \\
        config/benchmark.yaml --variant nct --seeds 1 --out docs/benchmark/phantom/seed_replicates.tsv
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
    for name in args.variant:
        ref = pd.read_csv(res / "predictions" / name / "test.tsv", sep="\t").set_index("patient_id")
        ref_ci = stats.delong_ci(ref["label"].to_numpy(), ref["prob"].to_numpy())
        rows.append(
            {
                "variant": name,
                "train_seed": int(cfg["train"]["seed"]),
                "test_auc": f"{ref_ci.auc:.3f}",
                "ci": f"{ref_ci.ci[0]:.3f}-{ref_ci.ci[1]:.3f}",
                "p_vs_study_run": "-",
                "seconds": "-",
            }
        )
        for seed in args.seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg["train"]["seed"] = seed
            out = work / f"{name}_seed{seed}"
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
            y = ref["label"].to_numpy()
            ci = stats.delong_ci(y, pred["prob"].to_numpy())
            test = stats.delong_test(y, pred["prob"].to_numpy(), ref["prob"].to_numpy())
            rows.append(
                {
                    "variant": name,
                    "train_seed": seed,
                    "test_auc": f"{ci.auc:.3f}",
                    "ci": f"{ci.ci[0]:.3f}-{ci.ci[1]:.3f}",
                    "p_vs_study_run": f"{test.p:.3f}",
                    "seconds": f"{seconds:.0f}",
                }
            )
            print(rows[-1], flush=True)
    with open(args.out, "w", newline="") as fh:
        score = cfg["infer"]["score"]
        fh.write(f"# benchmarks/seed_replicate.py, commit {commit}: test year, score {score}\n")
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
