"""The paper's scale on CPU (issue 25): config/paper.yaml with config/paper-smoke.yaml, end to end.

Six phantom patients at a clinical 0.75 x 0.75 x 1.25 mm grid, the paper's 1.5 x 1.5 x 3 mm grid and 224 x 224
x 96 patches, EfficientNet-B0 with BatchNorm, two training steps per variant. It takes about half an hour and
11 GB on 2 cores (docs/measurements.md §5), more than CI can spare, so it has its own marker:
``make paper-smoke-test`` (``pytest -m paper_smoke``). ``make paper-smoke`` runs the same workflow into
results/paper-smoke for a look at its outputs.
"""

import sys

import nibabel as nib
import pandas as pd
import pytest
import yaml
from test_workflow import ROOT, snakemake

pytestmark = pytest.mark.paper_smoke


def test_the_paper_config_runs_end_to_end_at_its_scale(tmp_path):
    results = tmp_path / "results"
    args = [
        "--workflow-profile",
        "profiles/default",
        "--configfile",
        "config/paper.yaml",
        "config/paper-smoke.yaml",
    ]
    # at most 22 GB of jobs at once: SwinUNETR-Joint's training alone peaks at 18.9 GB (measurements.md §5)
    r = snakemake(
        "--cores",
        "2",
        "--resources",
        "mem_mb=22000",
        *args,
        "--config",
        f"results={results}",
        timeout=4 * 3600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    sys.path.insert(0, str(ROOT / "tests/slurm"))
    from check_outputs import check

    assert check(results) == []
    cfg = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    variants = set(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["variants"]) | set(
        cfg["variants"]
    )
    for v in variants:  # every row trained its two steps and left its run time and peak memory
        assert (results / "benchmarks" / "train" / f"{v}.tsv").is_file(), v
        log = pd.read_csv(results / "models" / v / "train_log.tsv", sep="\t")
        assert len(log) == 1 and log["L_total"].notna().all(), v
    # the full-size masks and CAMs are back on each test patient's original 0.75 mm NCT grid
    pred = pd.read_csv(results / "predictions" / "cpmn" / "test.tsv", sep="\t", dtype={"patient_id": str})
    for row in pred.itertuples():
        image = nib.load(results / "predictions" / "cpmn" / row.image)
        assert image.shape == (448, 448, 240)
        if isinstance(row.mask, str):
            assert nib.load(results / "predictions" / "cpmn" / row.mask).shape == image.shape
