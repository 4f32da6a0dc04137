"""Two variants over several training seeds: per-seed test AUC, their mean, and the seed ensemble.

Issue 24: with one training run per row, CPMN's distance from NCT-only on the phantom benchmark is as large as
the spread of retraining either (docs/measurements.md §0.1). Given each variant's per-patient test predictions
from several training seeds (the study's ``predictions/<v>/test.tsv`` and the reruns of
``benchmarks/seed_replicate.py``), this writes

- the test AUC (DeLong 95% CI) of every run, and per seed the paired difference B − A;
- the mean and SD of each variant's AUC over its seeds;
- the **seed ensemble** of each variant: every run's scores turned into ranks (so that runs whose score scales
  differ weigh the same), averaged per patient; its AUC with the DeLong CI, and the paired DeLong p of B's
  ensemble against A's. The ensemble is the variant's expected ranking over training seeds, so this test
  holds the training-seed noise down rather than ignoring it;
- with ``--truth`` (the phantom's ``synthetic/truth`` folder), each run's mean test Dice over the PE
  patients against ``truth/<id>/mask_nct.nii.gz`` (the predicted masks are the ``mask`` column, relative to
  the TSV's folder), and per seed the paired Wilcoxon signed-rank p of B's per-patient Dice against A's.

    R=results/benchmark
    python benchmarks/seed_ensemble.py --a nct $R/predictions/nct/test.tsv $R/replicates/nct_seed1/test.tsv \\
        --b cpmn $R/predictions/cpmn/test.tsv $R/replicates/cpmn_seed1/test.tsv --out seed_ensemble.tsv
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata, wilcoxon

from cpmn import stats
from cpmn.evaluate.metrics import dice, load_mask


def read_runs(files: list[str]) -> tuple[np.ndarray, list[np.ndarray], pd.Index]:
    """The runs' test predictions on their common patients: labels, one score array per run, patient ids."""
    frames = [pd.read_csv(f, sep="\t").set_index("patient_id") for f in files]
    ids = frames[0].index
    for f, df in zip(files, frames, strict=True):
        if set(df.index) != set(ids):
            raise ValueError(f"{f}: not the patients of {files[0]}")
    y = frames[0].loc[ids, "label"].to_numpy()
    return y, [df.loc[ids, "prob"].to_numpy(float) for df in frames], ids


def ensemble(scores: list[np.ndarray]) -> np.ndarray:
    """Per patient, the mean over runs of the run's rank of that patient (ties share their mean rank)."""
    return np.mean([rankdata(s) for s in scores], axis=0)


def run_dice(file: str, truth: Path) -> dict[str, float]:
    """Per PE patient of one run's predictions, the Dice of its mask against the phantom's NCT truth."""
    df = pd.read_csv(file, sep="\t")
    out = {}
    for pid, mask in zip(df.loc[df.label == 1, "patient_id"], df.loc[df.label == 1, "mask"], strict=True):
        pred = load_mask(Path(file).parent / mask, pid)
        out[pid] = dice(pred, load_mask(truth / pid / "mask_nct.nii.gz", pid))
    return out


def summarise(
    a: str, a_files: list[str], b: str, b_files: list[str], truth: Path | None = None
) -> list[dict[str, str]]:
    ya, sa, ids = read_runs(a_files)
    yb, sb, ids_b = read_runs(b_files)
    order = pd.Series(range(len(ids_b)), index=ids_b).loc[ids].to_numpy()
    yb, sb = yb[order], [s[order] for s in sb]
    if not np.array_equal(ya, yb):
        raise ValueError("the two variants' label columns differ")
    rows = []
    aucs: dict[str, list[float]] = {a: [], b: []}
    dices: dict[str, list[float]] = {a: [], b: []}
    # each run's per-patient Dice, read once (the masks are NIfTI files)
    per_patient = {f: run_dice(f, truth) for f in (*a_files, *b_files)} if truth else {}
    for name, runs, files in ((a, sa, a_files), (b, sb, b_files)):
        for i, (s, f) in enumerate(zip(runs, files, strict=True)):
            ci = stats.delong_ci(ya, s)
            aucs[name].append(ci.auc)
            d = np.mean(list(per_patient[f].values())) if truth else float("nan")
            dices[name].append(d)
            rows.append(
                {
                    "row": f"{name} run {i}",
                    "auc": f"{ci.auc:.3f}",
                    "ci": f"{ci.ci[0]:.3f}-{ci.ci[1]:.3f}",
                    "p": "-",
                    "dice": f"{d:.3f}",
                    "source": f,
                }
            )
    for i, (x, z) in enumerate(zip(sa, sb, strict=False)):
        t = stats.delong_test(ya, z, x)
        rows.append(
            {
                "row": f"{b} − {a}, run {i}",
                "auc": f"{t.diff:+.3f}",
                "ci": "-",
                "p": f"{t.p:.3f}",
                "source": "paired DeLong",
            }
        )
        if truth:
            da, db = per_patient[a_files[i]], per_patient[b_files[i]]
            diff = np.array([db[k] - da[k] for k in sorted(da)])
            rows.append(
                {
                    "row": f"{b} − {a}, run {i}, Dice",
                    "auc": "-",
                    "ci": "-",
                    "p": f"{wilcoxon(diff).pvalue:.3f}",
                    "dice": f"{diff.mean():+.3f}",
                    "source": "paired Wilcoxon signed-rank",
                }
            )
    for name in (a, b):
        v = np.array(aucs[name])
        rows.append(
            {
                "row": f"{name} mean over {len(v)} runs",
                "auc": f"{v.mean():.3f}",
                "ci": f"SD {v.std(ddof=1):.3f}" if len(v) > 1 else "-",
                "p": "-",
                "dice": f"{np.mean(dices[name]):.3f}",
                "source": "-",
            }
        )
    ea, eb = ensemble(sa), ensemble(sb)
    for name, e in ((a, ea), (b, eb)):
        ci = stats.delong_ci(ya, e)
        rows.append(
            {
                "row": f"{name} seed ensemble",
                "auc": f"{ci.auc:.3f}",
                "ci": f"{ci.ci[0]:.3f}-{ci.ci[1]:.3f}",
                "p": "-",
                "source": "mean rank over runs",
            }
        )
    t = stats.delong_test(ya, eb, ea)
    rows.append(
        {
            "row": f"{b} − {a}, seed ensembles",
            "auc": f"{t.diff:+.3f}",
            "ci": "-",
            "p": f"{t.p:.3f}",
            "source": "paired DeLong",
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--a", nargs="+", required=True, metavar=("NAME", "TSV"), help="reference: name, then runs"
    )
    ap.add_argument(
        "--b", nargs="+", required=True, metavar=("NAME", "TSV"), help="compared: name, then runs"
    )
    ap.add_argument("--truth", type=Path, default=None, help="the phantom's synthetic/truth folder (Dice)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = summarise(args.a[0], args.a[1:], args.b[0], args.b[1:], args.truth)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    df = pd.DataFrame(rows).fillna("-")
    with open(Path(args.out), "w") as fh:
        fh.write(
            f"# benchmarks/seed_ensemble.py, commit {commit.strip()}: test year, one row per run or summary\n"
        )
        df.to_csv(fh, sep="\t", index=False)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
