"""Summarise a finished phantom benchmark (``config/benchmark.yaml``) into small files for ``docs/``.

    .venv/bin/snakemake --cores 2 --workflow-profile profiles/default --configfile config/benchmark.yaml
    .venv/bin/python benchmarks/synthetic_benchmark.py --results results/benchmark \
        --out docs/benchmark/synthetic

Copies ``table1_ablation.tsv``, ``score_comparison.tsv``, ``stats.json``, ``ceiling.tsv`` and the training
curves, and writes ``summary.json``:

* ``validation``: per variant, the validation AUC of every score written by inference (``prob`` and each
  ``prob_<score>``): the split on which a score is chosen;
* ``test``: per variant, the test AUC with its DeLong CI and Dice, and the paired DeLong p against NCT-only;
* ``gap_closed``: (AUC_CPMN - AUC_NCT) / (AUC_CTPA - AUC_NCT) on the test split;
* ``job_seconds``: the sum of Snakemake's per-job ``benchmark:`` seconds per rule (CPU-job time; the wall
  time of the run is what the Snakemake log says), and the split's sizes;
* the commit and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

COPIED = {
    "tables/table1_ablation.tsv": "table1_ablation.tsv",
    "tables/score_comparison.tsv": "score_comparison.tsv",
    "tables/ceiling.tsv": "ceiling.tsv",
    "stats.json": "stats.json",
    "figures/training_curves.png": "training_curves.png",
}


def validation_aucs(results: Path) -> dict[str, dict[str, float]]:
    """Per variant, the validation AUC of each score column (``prob``: the primary score)."""
    out = {}
    for tsv in sorted(results.glob("predictions/*/val.tsv")):
        d = pd.read_csv(tsv, sep="\t")
        primary = str(d["score"].iloc[0]) if "score" in d else "prob"
        aucs = {}
        for col in [c for c in d.columns if c == "prob" or c.startswith("prob_")]:
            name = primary if col == "prob" else col.removeprefix("prob_")
            aucs[name] = round(float(roc_auc_score(d["label"], d[col])), 4)
        out[tsv.parent.name] = {"n": int(len(d)), "n_pe": int(d["label"].sum()), **aucs}
    return out


def job_seconds(results: Path) -> dict[str, float]:
    """Sum of the ``s`` column of every ``benchmark:`` file, per rule (the folder or file stem)."""
    sums: dict[str, float] = {}
    for f in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = f.parent.name if f.parent != results / "benchmarks" else f.stem
        sums[rule] = sums.get(rule, 0.0) + float(pd.read_csv(f, sep="\t")["s"].sum())
    return {k: round(v, 1) for k, v in sorted(sums.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results/benchmark")
    ap.add_argument("--out", default="docs/benchmark/synthetic")
    args = ap.parse_args()
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for src, dst in COPIED.items():
        if (results / src).exists():
            shutil.copyfile(results / src, out / dst)
    stats = json.loads((results / "stats.json").read_text())
    test = {}
    for name, v in stats["variants"].items():
        test[name] = {
            "auc": round(v["auc"]["value"], 4),
            "ci_delong": [round(x, 4) for x in v["auc"]["ci_delong"]],
            "dice": round(v["dice"]["mean"], 4) if v.get("dice", {}).get("mean") is not None else None,
            "n_test": v["n_test"],
            "n_pe": v["n_pos"],
        }
    for c in stats.get("comparisons", []):
        if c["a"] == "nct":
            test[c["b"]]["p_vs_nct"] = round(c["delong"]["p"], 4)
    gap = None
    if {"ctpa", "nct", "cpmn"} <= set(test) and test["ctpa"]["auc"] != test["nct"]["auc"]:
        lift = test["cpmn"]["auc"] - test["nct"]["auc"]
        gap = round(lift / (test["ctpa"]["auc"] - test["nct"]["auc"]), 3)
    splits = pd.read_csv(results / "splits.tsv", sep="\t")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = git.stdout.strip()
    summary = {
        "date": dt.date.today().isoformat(),
        "commit": commit,
        "splits": {s: {"n": int(len(g)), "pe": int(g["label"].sum())} for s, g in splits.groupby("split")},
        "validation": validation_aucs(results),
        "test": test,
        "gap_closed": gap,
        "job_seconds": job_seconds(results),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("validation", "test", "gap_closed")}, indent=1))


if __name__ == "__main__":
    main()
