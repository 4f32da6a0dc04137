"""The FUMPE experiment: the synthetic FUMPE-shaped set, the reader (v5 and v7.3 masks), training and Dice."""

from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pydicom
import pytest
import scipy.io
import torch
from scipy.ndimage import binary_dilation

from cpmn.data.fumpe import fumpe_patients, read_fumpe_patient, read_mask, read_series
from cpmn.errors import InputError
from cpmn.evaluate.metrics import dice
from cpmn.fumpe import build_network, evaluate_fumpe, segment_volume, train_fumpe, window
from cpmn.synthetic.cohort import generate_patient, resolve_params
from cpmn.synthetic.fumpe import generate_fumpe

SMALL = {"patients": 3, "shape": [64, 64, 40], "spacing": [5.0, 5.0, 5.0]}


@pytest.fixture(scope="module")
def fumpe(tmp_path_factory):
    root = tmp_path_factory.mktemp("fumpe") / "FUMPE"
    assert generate_fumpe(root, SMALL) == ["PAT001", "PAT002", "PAT003"]
    return root


def test_the_synthetic_set_has_fumpes_layout_and_the_synthetic_clots(fumpe):
    """Every patient has a series folder and a v5 .mat mask; read back, the mask is the phantom's CTPA clot
    mask (pixel row = y, column = x, slice = InstanceNumber), and its voxels hold clot HU (20-70 in the
    phantom) inside enhanced blood (250-550): a transposed or flipped mask would sit on other tissue."""
    assert fumpe_patients(fumpe) == ["PAT001", "PAT002", "PAT003"]
    assert len(list((fumpe / "CT_scans" / "PAT001").glob("*.dcm"))) == 40
    hu, mask, voxel = read_fumpe_patient(fumpe, "PAT001")
    assert hu.shape == mask.shape == (64, 64, 40) and voxel == pytest.approx((5.0, 5.0, 5.0))
    truth = generate_patient(
        fumpe, resolve_params({**SMALL, "pe_fraction": 1.0}), 0, write=False, keep_arrays=True
    )
    assert np.array_equal(mask, truth["arrays"]["mask_ctpa"].transpose(1, 0, 2) > 0)
    ring = binary_dilation(mask, iterations=1) & ~mask
    assert mask.sum() > 20
    assert 0 < hu[mask].mean() < 120 and hu[ring].mean() > hu[mask].mean() + 40


def test_a_v73_mask_is_read_with_h5py(tmp_path):
    """MATLAB v7.3 is HDF5 with a 512-byte header and column-major arrays: a (rows, cols, slices) mask is a
    dataset of shape (slices, cols, rows), read back transposed."""
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1, 2, 3] = mask[4, 0, 1] = 1
    path = tmp_path / "PAT009.mat"
    with h5py.File(path, "w", userblock_size=512) as fh:
        fh.create_dataset("Mask", data=mask.T)
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Dec  7 2026 HDF5 schema 1.00 .")
    assert np.array_equal(read_mask(path, "PAT009"), mask > 0)
    v5 = tmp_path / "PAT010.mat"
    scipy.io.savemat(v5, {"Mask": mask, "other": np.zeros(3)})
    assert np.array_equal(read_mask(v5, "PAT010"), mask > 0)  # 'Mask' is chosen among several arrays


def test_bad_fumpe_input_is_one_error_naming_patient_and_file(fumpe, tmp_path):
    hu, _, _ = read_fumpe_patient(fumpe, "PAT002")
    bad = tmp_path / "bad"
    (bad / "GroundTruth").mkdir(parents=True)
    (bad / "CT_scans").symlink_to(fumpe / "CT_scans")
    scipy.io.savemat(bad / "GroundTruth" / "PAT002.mat", {"Mask": np.zeros((64, 64, 39), np.uint8)})
    with pytest.raises(InputError, match=r"patient PAT002: .*PAT002.mat: mask shape \(64, 64, 39\) does not"):
        read_fumpe_patient(bad, "PAT002")
    (bad / "GroundTruth" / "PAT001.mat").write_bytes(b"not a mat file")
    with pytest.raises(InputError, match=r"patient PAT001: .*PAT001.mat: cannot read the MATLAB mask"):
        read_fumpe_patient(bad, "PAT001")
    with pytest.raises(InputError, match="patients in both train and test"):
        train_fumpe(fumpe, tmp_path / "m", {"train": ["PAT001"], "test": ["PAT001"]})
    assert hu.shape == (64, 64, 40)


def test_a_bad_fumpe_slice_is_one_error_naming_patient_and_file(fumpe, tmp_path):
    """The series is checked as `cpmn convert` checks it: a truncated slice and a slice of another modality
    are each one error naming the patient and the file."""
    series = tmp_path / "PAT003"
    shutil.copytree(fumpe / "CT_scans" / "PAT003", series)
    files = sorted(series.glob("*.dcm"))
    assert read_series(series, "PAT003")[0].shape == (64, 64, 40)
    data = files[5].read_bytes()
    files[5].write_bytes(data[: len(data) - 2000])
    with pytest.raises(InputError, match=rf"patient PAT003: .*{files[5].name}: truncated pixel data"):
        read_series(series, "PAT003")
    files[5].write_bytes(data)
    ds = pydicom.dcmread(files[7])
    ds.Modality = "MR"
    ds.save_as(files[7])
    with pytest.raises(InputError, match=rf"patient PAT003: .*{files[7].name}: modality MR, expected CT"):
        read_series(series, "PAT003")


def test_window_by_hand():
    assert window(np.array([-1000.0, -200.0, 150.0, 500.0, 900.0]), (-200, 500)).tolist() == [0, 0, 0.5, 1, 1]


def test_train_and_evaluate_write_the_dice_table(fumpe, tmp_path):
    """A few steps train (finite, logged loss); the table's per-patient Dice is the 3D Dice of the slice-by-
    slice segmentation, and the last row is their mean with a bootstrap CI around it."""
    cfg = {"train": ["PAT001"], "test": ["PAT002", "PAT003"], "crop": [64, 64], "steps": 4, "batch_size": 2}
    cfg["device"] = "cpu"
    s = train_fumpe(fumpe, tmp_path / "model", cfg)
    assert s["steps"] == 4 and np.isfinite(s["last_loss"])
    assert len((tmp_path / "model" / "train_log.tsv").read_text().splitlines()) == 5
    rows = evaluate_fumpe(fumpe, tmp_path / "model" / "model.pt", tmp_path / "fumpe_dice.tsv", bootstrap=200)
    ckpt = torch.load(tmp_path / "model" / "model.pt", weights_only=False)
    net = build_network("efficientnet-b0")
    net.load_state_dict(ckpt["model"])
    net.eval()
    for r in rows[:-1]:
        hu, mask, _ = read_fumpe_patient(fumpe, r["patient_id"])
        pred = segment_volume(net, window(hu, ckpt["cfg"]["hu_window"]))
        assert r["dice"] == pytest.approx(np.nan_to_num(dice(pred, mask)), abs=1e-9)
        assert r["predicted_voxels"] == int(pred.sum()) and r["reference_voxels"] == int(mask.sum())
    mean = rows[-1]
    assert mean["patient_id"] == "mean"
    assert mean["dice"] == pytest.approx(np.mean([r["dice"] for r in rows[:-1]]))
    assert mean["ci_low"] <= mean["dice"] <= mean["ci_high"]
    with open(tmp_path / "fumpe_dice.tsv") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    assert [t["patient_id"] for t in table] == ["PAT002", "PAT003", "mean"]


def test_segment_volume_pads_each_slice_and_crops_back():
    """A 'network' whose embolus logit is the input minus 0.5 segments exactly the voxels above 0.5, on a
    volume whose slices (50 x 37) are not multiples of 32."""

    class Threshold(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.cat([torch.zeros_like(x), x - 0.5], 1)

    img = np.random.default_rng(0).random((50, 37, 11)).astype(np.float32)
    assert np.array_equal(segment_volume(Threshold(), img, batch=4), img > 0.5)
