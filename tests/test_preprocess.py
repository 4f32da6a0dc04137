"""Preprocessing: HU window, canonical reorientation, resampling, body crop, the round trip back."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from cpmn.data.preprocess import preprocess_patient, to_original_grid, window
from cpmn.errors import InputError


def _case(tmp_path, spacing=(2.0, 2.0, 3.0), flip_x=True, label_mask=True):
    """A 40x36x24 NCT: air, a body box (40 HU) with a 'lung' (-850 HU), a mask blob; LAS if flip_x."""
    shape = (40, 36, 24)
    nct = np.full(shape, -1000.0, np.float32)
    nct[6:34, 5:31, 3:21] = 40.0
    nct[10:18, 10:26, 6:18] = -850.0
    nct[1, 1, 1] = 200.0  # a stray bright voxel outside the body: not the largest component
    ctpa = nct.copy()
    ctpa[22:26, 14:22, 8:16] = 400.0
    mask = np.zeros(shape, np.uint8)
    if label_mask:
        mask[22:26, 14:20, 8:14] = 1
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-40.0, -30.0, 10.0]
    if flip_x:  # LAS storage: voxel x runs right -> left
        aff[0, 0] = -spacing[0]
        aff[0, 3] = 40.0
    paths = {}
    for key, arr in (("nct", nct), ("ctpa", ctpa), ("mask", mask)):
        paths[key] = tmp_path / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), paths[key])
    return nct, ctpa, mask, aff, paths


def test_window_values():
    hu = np.array([-2000.0, -1000.0, -200.0, 600.0, 3000.0])
    np.testing.assert_allclose(window(hu, (-1000, 600)), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_same_spacing_exact_round_trip(tmp_path):
    nct, ctpa, mask, aff, paths = _case(tmp_path)
    out = tmp_path / "P1.npz"
    params = {
        "spacing": [2.0, 2.0, 3.0],
        "body_margin_mm": 4.0,
        "hu_window": [-1000, 600],
        "nct_hu_window": None,
    }
    preprocess_patient("P1", 1, paths["nct"], paths["ctpa"], paths["mask"], out, params)
    with np.load(out) as z:
        d = {k: z[k] for k in z.files}
    assert d["nct"].dtype == np.float32 and d["mask"].dtype == np.uint8
    assert int(d["label"]) == 1
    np.testing.assert_array_equal(d["orig_shape"], [40, 36, 24])
    np.testing.assert_allclose(d["orig_affine"], aff)
    # body box 6:34, 5:31, 3:21 (+2 voxel margin in x/y, +2 in z as ceil(4/3)); x flipped by canonical RAS
    assert d["nct"].shape == (28 + 4, 26 + 4, 18 + 4)
    assert np.all(np.diag(d["affine"])[:3] > 0)  # canonical RAS
    np.testing.assert_allclose(d["spacing"], [2.0, 2.0, 3.0])
    assert d["nct"].min() >= 0 and d["nct"].max() <= 1
    # a body voxel (40 HU) stores (40 + 1000) / 1600; lung -850 HU stores 0.09375
    assert np.isclose(d["nct"], 1040 / 1600, atol=1e-6).sum() > 1000
    assert np.isclose(d["ctpa"], 1400 / 1600, atol=1e-6).sum() == 4 * 8 * 8  # 400 HU
    assert int(d["mask"].sum()) == int(mask.sum())
    # the world position of the mask is preserved: voxel centroid -> world, before and after
    c_orig = aff[:3, :3] @ np.argwhere(mask).mean(0) + aff[:3, 3]
    c_new = d["affine"][:3, :3] @ np.argwhere(d["mask"]).mean(0) + d["affine"][:3, 3]
    np.testing.assert_allclose(c_new, c_orig, atol=1e-6)
    back = to_original_grid(d["mask"], out)
    assert back.shape == mask.shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)
    prob = to_original_grid(d["ctpa"], d)
    np.testing.assert_allclose(prob[22:26, 14:22, 8:16], 0.875, atol=1e-5)
    assert prob[0, 0, 0] == 0.0  # outside the crop


def test_resampled_round_trip(tmp_path):
    nct, ctpa, mask, aff, paths = _case(tmp_path, spacing=(2.0, 2.0, 3.0))
    big = np.zeros_like(mask)
    big[14:30, 10:26, 6:18] = 1
    nib.save(nib.Nifti1Image(big, aff), paths["mask"])
    out = tmp_path / "P2.npz"
    preprocess_patient("P2", 1, paths["nct"], paths["ctpa"], paths["mask"], out, {"spacing": [2.5, 2.5, 2.5]})
    with np.load(out) as z:
        d = {k: z[k] for k in z.files}
    np.testing.assert_allclose(d["spacing"], 2.5)
    np.testing.assert_array_equal(d["resampled_shape"], [32, 29, 29])  # round(40*2/2.5), round(36*.8), 24*1.2
    # stored mask volume in mm^3 is close to the original's (32 * 16 * 12 mm each side)
    vol_orig = big.sum() * 2 * 2 * 3
    vol_new = d["mask"].sum() * 2.5**3
    assert abs(vol_new - vol_orig) / vol_orig < 0.15
    back = to_original_grid(d["mask"], d)
    dice = 2 * np.logical_and(back, big).sum() / (back.sum() + big.sum())
    assert dice > 0.9


def test_empty_mask_on_pe_patient(tmp_path):
    *_, paths = _case(tmp_path, label_mask=False)
    out = tmp_path / "P3.npz"
    with pytest.raises(
        InputError, match=r"^patient P3: .*mask.nii.gz: label is 1 \(PE\) but the embolus mask is empty"
    ):
        preprocess_patient("P3", 1, paths["nct"], paths["ctpa"], paths["mask"], out)
    assert not out.exists() and list(tmp_path.glob("*.npz")) == []
    preprocess_patient("P3", 0, paths["nct"], paths["ctpa"], paths["mask"], out)  # a normal is fine
    with np.load(out) as z:
        assert int(z["label"]) == 0 and z["mask"].sum() == 0 and "truth_mask" not in z.files


def test_grid_mismatch(tmp_path):
    nct, ctpa, mask, aff, paths = _case(tmp_path)
    nib.save(nib.Nifti1Image(ctpa[:30], aff), paths["ctpa"])
    with pytest.raises(InputError, match="ctpa is not on the NCT grid"):
        preprocess_patient("P4", 1, paths["nct"], paths["ctpa"], paths["mask"], tmp_path / "P4.npz")


def test_defaults_match_config_yaml():
    from pathlib import Path

    from cpmn.config import load_config
    from cpmn.data.preprocess import DEFAULTS

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")["preprocess"]
    assert DEFAULTS == cfg
