"""benchmarks/seed_ensemble.py: the seed ensemble (mean rank over runs) and its AUC, by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("seed_ensemble", ROOT / "benchmarks" / "seed_ensemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, ids: list[str], y: list[int], prob: list[float]) -> str:
    pd.DataFrame({"patient_id": ids, "label": y, "prob": prob}).to_csv(path, sep="\t", index=False)
    return str(path)


def test_seed_ensemble_by_hand(tmp_path):
    """Two runs of A on four patients (labels 0, 0, 1, 1). Run 0 scores 0.1, 0.4, 0.35, 0.8 (ranks 1, 3, 2, 4;
    AUC 3/4); run 1 is on another scale, 10, 20, 30, 40 (ranks 1..4, AUC 1). The ensemble is the mean rank
    1, 2.5, 2.5, 4: the pairs (P2, N1), (P2, N2) tie, so its AUC is (1 + 0.5 + 1 + 1) / 4 = 0.875. B's rows
    come in another patient order and are matched by id."""
    mod = _module()
    ids, y = ["P0", "P1", "P2", "P3"], [0, 0, 1, 1]
    a = [
        _write(tmp_path / "a0.tsv", ids, y, [0.1, 0.4, 0.35, 0.8]),
        _write(tmp_path / "a1.tsv", ids, y, [10, 20, 30, 40]),
    ]
    b = [_write(tmp_path / "b0.tsv", ids[::-1], y[::-1], [0.9, 0.7, 0.2, 0.1])]
    assert np.allclose(mod.ensemble([np.array([0.1, 0.4, 0.35, 0.8]), np.arange(4.0)]), [1, 2.5, 2.5, 4])
    rows = {r["row"]: r for r in mod.summarise("A", a, "B", b)}
    assert rows["A run 0"]["auc"] == "0.750" and rows["A run 1"]["auc"] == "1.000"
    assert rows["A mean over 2 runs"]["auc"] == "0.875"
    assert rows["A seed ensemble"]["auc"] == "0.875"
    assert rows["B seed ensemble"]["auc"] == "1.000"  # B, matched by id: P0 0.1, P1 0.2, P2 0.7, P3 0.9
    assert rows["B − A, seed ensembles"]["auc"] == "+0.125"
    with pytest.raises(ValueError, match="not the patients of"):
        mod.summarise("A", [a[0], _write(tmp_path / "a2.tsv", ids[:3], y[:3], [1, 2, 3])], "B", b)
