"""Patch bank: configured positive rate, positive patches really contain emboli, negatives do not."""

from __future__ import annotations

import numpy as np
import pytest

from cpmn.data.patches import contains_embolus, extract_patch_bank, patient_seed

SIZE = (16, 16, 8)


def _npz(label=1):
    """A 60x50x30 volume, body = box [5:55, 5:45, 2:28] at 0.65 (40 HU); two clots for PE patients."""
    nct = np.zeros((60, 50, 30), np.float32)
    nct[5:55, 5:45, 2:28] = 0.65
    mask = np.zeros(nct.shape, np.uint8)
    if label:
        mask[20:23, 20:22, 10:12] = 1  # clot A: 12 voxels
        mask[40, 30, 20] = 1  # clot B: a single voxel
    return {
        "nct": nct,
        "mask": mask,
        "label": np.int64(label),
        "hu_window": np.array([-1000.0, 600.0]),
        "body_threshold_hu": np.float64(-500.0),
    }


def _patch_has_embolus(mask, c, size):
    """Explicit slicing with zero padding: the reference the bank is checked against."""
    size = np.asarray(size)
    start = np.asarray(c) - size // 2
    stop = start + size
    lo = np.maximum(start, 0)
    hi = np.minimum(stop, mask.shape)
    return bool(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].any())


def test_contains_embolus_matches_slicing():
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 25, 12), np.uint8)
    mask[7, 9, 3] = 1
    mask[20:22, 15, 8] = 1
    table = contains_embolus(mask, (6, 5, 4))
    for c in rng.integers(0, [30, 25, 12], size=(300, 3)):
        assert table[tuple(c)] == _patch_has_embolus(mask, c, (6, 5, 4))
    # the patch [c-3, c+3) in x holds x = 7 for c in 5..10 exactly
    assert [bool(table[x, 9, 3]) for x in range(3, 12)] == [
        False,
        False,
        True,
        True,
        True,
        True,
        True,
        True,
        False,
    ]


def test_pe_bank_balanced_and_truthful():
    d = _npz(1)
    params = {"size": SIZE, "per_patient": 20, "pos_fraction": 0.25, "centre_pos_fraction": 0.0}
    bank = extract_patch_bank(d, params, seed=3)
    c, pos = bank["centres"], bank["positive"]
    assert c.shape == (20, 3) and c.dtype == np.int64 and pos.dtype == bool
    np.testing.assert_array_equal(bank["size"], SIZE)
    assert pos.sum() == 5  # 20 * 0.25
    for centre, p in zip(c, pos, strict=True):
        assert _patch_has_embolus(d["mask"], centre, SIZE) == p
    on_clot = d["mask"][tuple(c[pos].T)]
    assert on_clot.all()  # positive centres sit on embolus voxels
    assert (c[pos] == [40, 30, 20]).all(axis=1).any()  # both clots get centres (round-robin)
    assert (c[pos][:, 0] < 30).any()
    body = d["nct"] > 0.3125
    assert body[tuple(c[~pos].T)].all()  # negatives inside the body
    assert len({tuple(x) for x in c[~pos]}) == 15  # drawn without replacement


def test_normal_bank_all_negative_and_deterministic():
    d = _npz(0)
    params = {"size": SIZE, "per_patient": 12, "pos_fraction": 0.5}
    a = extract_patch_bank(d, params, seed=patient_seed("N1"))
    b = extract_patch_bank(d, params, seed=patient_seed("N1"))
    other = extract_patch_bank(d, params, seed=patient_seed("N2"))
    assert not a["positive"].any() and len(a["centres"]) == 12
    np.testing.assert_array_equal(a["centres"], b["centres"])
    assert not np.array_equal(a["centres"], other["centres"])
    assert patient_seed("N1") == patient_seed("N1", 0) != patient_seed("N1", 1)


@pytest.mark.parametrize("frac, expected", [(0.5, 12), (1.0, 24), (0.0, 0)])
def test_default_size_positive_rate(frac, expected):
    d = _npz(1)
    bank = extract_patch_bank(d, {"size": [64, 64, 32], "per_patient": 24, "pos_fraction": frac}, seed=1)
    # 64x64x32 patches in a 60x50x30 volume: embolus-free positions exist only outside the body (z >= 28,
    # x <= 7), so the fallback draws negatives anywhere in the volume and the rate still holds
    assert bank["positive"].sum() == expected
    for centre, p in zip(bank["centres"], bank["positive"], strict=True):
        assert _patch_has_embolus(d["mask"], centre, (64, 64, 32)) == p


def test_defaults_match_config_yaml():
    from pathlib import Path

    from cpmn.config import load_config
    from cpmn.data.patches import DEFAULTS

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")["patches"]
    assert DEFAULTS == cfg


def test_hard_negatives_come_from_the_volume_centre_and_the_blood_pool():
    d = _npz(label=0)
    ctpa = d["nct"].copy()
    ctpa[5:15, 5:15, 2:28] = (300.0 + 1000.0) / 1600.0  # a 300 HU contrast-filled "vessel", off-centre
    d["ctpa"] = ctpa
    params = {
        "size": SIZE,
        "per_patient": 20,
        "pos_fraction": 0.5,
        "centre_fraction": 0.5,
        "vessel_fraction": 0.5,
    }
    c = extract_patch_bank(d, params, seed=4)["centres"]
    # within P/4 = (4, 4, 2) of the centre (30, 25, 15)
    central = (np.abs(c - [30, 25, 15]) <= [4, 4, 2]).all(axis=1)
    in_vessel = ctpa[tuple(c.T)] > (150.0 + 1000.0) / 1600.0
    assert central.sum() == 10 and in_vessel.sum() == 5  # half of 20, then half of the other 10
    plain = extract_patch_bank(d, {**params, "centre_fraction": 0.0, "vessel_fraction": 0.0}, seed=4)
    c = plain["centres"]
    assert (np.abs(c - [30, 25, 15]) <= [4, 4, 2]).all(axis=1).sum() < 5
    assert (ctpa[tuple(c.T)] > 0.7).sum() < 5
    # on a PE patient with an embolus at the centre no negative patch holds an embolus
    pe = _npz(label=1)
    pe["ctpa"] = ctpa
    pe["mask"][29:31, 24:26, 14:16] = 1
    bank = extract_patch_bank(pe, params, seed=4)
    for centre, p in zip(bank["centres"], bank["positive"], strict=True):
        assert _patch_has_embolus(pe["mask"], centre, SIZE) == p
    assert bank["positive"].sum() == 10


def test_centre_positives_come_from_the_centre_patch_region_and_hold_an_embolus():
    pe = _npz(label=1)
    pe["mask"][:] = 0
    pe["mask"][22:24, 22:24, 13:15] = 1  # just outside the P/4 box round the centre (30, 25, 15)
    pe["mask"][50:52, 40:42, 2:4] = 1  # far off-centre
    params = {"size": SIZE, "per_patient": 20, "pos_fraction": 0.5, "centre_pos_fraction": 0.6}
    bank = extract_patch_bank(pe, params, seed=3)
    c, pos = bank["centres"], bank["positive"]
    assert pos.sum() >= 10
    for centre, p in zip(c, pos, strict=True):
        assert _patch_has_embolus(pe["mask"], centre, SIZE) == p
    central = (np.abs(c - [30, 25, 15]) <= [4, 4, 2]).all(axis=1)
    on_clot = pe["mask"][tuple(c.T)] > 0
    # 6 of the 10 positives are P/4-box positions whose patch holds an embolus, 4 lie on clot voxels
    assert (central & pos & ~on_clot).sum() == 6
    assert on_clot.sum() == 4
    off = extract_patch_bank(pe, {**params, "centre_pos_fraction": 0.0}, seed=3)
    assert (pe["mask"][tuple(off["centres"].T)] > 0).sum() == 10
