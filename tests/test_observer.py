"""The phantom's ceiling observer: the matched filter on hand-made volumes, and the CLI on two patients."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cpmn.synthetic.observer import ceiling_table, observer_score


def _vessel(value=0.5):
    img = np.zeros((10, 10, 10))
    frac = np.zeros((10, 10, 10))
    img[1:7, 1:7, 1:7] = value
    frac[1:7, 1:7, 1:7] = 1.0  # eroded by one voxel: the core is [2:6]^3, 64 voxels
    return img, frac


def test_one_bright_core_voxel_by_hand():
    """+0.3 on the core's corner voxel (2, 2, 2): the best 3^3 neighbourhood holding it is the one centred
    there, with 2^3 = 8 core voxels, so the statistic is 0.3 / sqrt(8); a wall voxel is ignored."""
    img, frac = _vessel()
    img[2, 2, 2] += 0.3
    img[1, 4, 4] += 5.0  # at the vessel wall (not in the eroded core): partial volume, not clot
    assert observer_score(img, frac, +1.0) == pytest.approx(0.3 / math.sqrt(8))
    # CTPA: clot is darker than blood; the same voxel made dark scores the same, a bright one scores ~0
    img2, _ = _vessel()
    img2[2, 2, 2] -= 0.3
    assert observer_score(img2, frac, -1.0) == pytest.approx(0.3 / math.sqrt(8))
    assert observer_score(img2, frac, +1.0) == pytest.approx(0.0)


def test_the_patients_own_blood_is_the_reference():
    """A uniformly brighter blood pool (another patient's blood HU) is not clot: the score stays 0."""
    img, frac = _vessel(0.8)
    assert observer_score(img, frac, +1.0) == pytest.approx(0.0)
    img[3:5, 3:5, 3:5] += 0.1  # a 2^3 clot core: 8 voxels of +0.1 inside one 3^3 window of 27 core voxels
    assert observer_score(img, frac, +1.0) == pytest.approx(0.8 / math.sqrt(27))
    assert observer_score(img, np.zeros_like(frac), +1.0) == -math.inf


def test_ceiling_table_auc_and_delong():
    rows = [
        {"patient_id": f"p{i}", "label": lab, "nct": s, "ctpa": c}
        for i, (lab, s, c) in enumerate([(1, 0.9, 3), (1, 0.4, 2), (0, 0.5, 1), (0, 0.1, -math.inf)])
    ]
    splits = {"p0": "test", "p1": "test", "p2": "test", "p3": "test"}
    table = {(r["phase"], r["split"]): r for r in ceiling_table(rows, splits)}
    assert table["nct", "test"]["auc"] == pytest.approx(0.75)  # 3 of the 4 PE/normal pairs ordered
    assert table["ctpa", "test"]["auc"] == pytest.approx(1.0)  # -inf (no core) ranks lowest
    assert table["nct", "test"]["n"] == 4 and table["nct", "test"]["n_pe"] == 2
    assert math.isnan(table["nct", "val"]["auc"])
