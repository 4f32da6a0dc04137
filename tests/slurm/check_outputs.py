"""Check the outputs of the tiny workflow (used by the SLURM test and the end-to-end test)."""

import json
import sys
from pathlib import Path

import pandas as pd


def check(results: Path) -> list[str]:
    problems = []
    t1 = pd.read_csv(results / "tables/table1_ablation.tsv", sep="\t")
    if len(t1) < 5:
        problems.append(f"table1 has {len(t1)} rows, expected 5")
    pd.read_csv(results / "tables/table2_comparison.tsv", sep="\t")
    sc = pd.read_csv(results / "tables/score_comparison.tsv", sep="\t")
    if not sc["Score"].str.endswith(" *").any():
        problems.append("score_comparison has no primary-score row")
    stats = json.loads((results / "stats.json").read_text())
    if not stats:
        problems.append("stats.json is empty")
    for fig in ("fig2a_roc.png", "fig2b_case.png"):
        f = results / "figures" / fig
        if not f.exists() or f.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            problems.append(f"{fig} missing or not a PNG")
    splits = pd.read_csv(results / "splits.tsv", sep="\t")
    if set(splits["split"]) != {"train", "val", "test"}:
        problems.append(f"splits: {sorted(set(splits['split']))}")
    reg = pd.read_csv(results / "qc/registration.tsv", sep="\t")
    if len(reg) != len(splits):
        problems.append(f"registration QC has {len(reg)} rows for {len(splits)} patients")
    return problems


if __name__ == "__main__":
    found = check(Path(sys.argv[1]))
    for p in found:
        print("problem:", p)
    sys.exit(1 if found else 0)
