"""Registration recovers a known synthetic misalignment; QC collection; bad input."""

from __future__ import annotations

import json
import math
import os

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

from registration_pair import synthetic_pair  # noqa: E402

from cpmn.data import qc as qc_mod  # noqa: E402
from cpmn.data.register import dice, ncc, register_patient  # noqa: E402
from cpmn.errors import InputError  # noqa: E402


def _write(tmp_path, pair):
    paths = {}
    for key in ("nct", "ctpa", "nct_mask", "ctpa_mask"):
        paths[key] = tmp_path / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(pair[key], pair["affine"]), paths[key])
    return paths


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    pair = synthetic_pair((48, 48, 48), 4.0, shift_mm=(8.0, -6.0, 4.0), clot_radius_mm=(14.0, 12.0), seed=0)
    paths = _write(tmp, pair)
    out = tmp / "D"
    qc = register_patient(
        paths["nct"], paths["ctpa"], paths["ctpa_mask"], out, "SYN1", truth_mask=paths["nct_mask"], threads=1
    )
    return pair, paths, out, qc


def test_metrics_hand_computed():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 4), np.uint8)
    a[:2] = 1  # 32 voxels
    b[1:3] = 1  # 32 voxels, 16 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert math.isnan(dice(a * 0, b * 0))
    x = np.arange(64, dtype=float).reshape(4, 4, 4)
    where = np.ones_like(x, bool)
    assert ncc(x, 3 * x + 7, where) == pytest.approx(1.0)
    assert ncc(x, -x, where) == pytest.approx(-1.0)


def test_recovers_known_warp(registered):
    pair, paths, out, qc = registered
    before = dice(pair["ctpa_mask"], pair["nct_mask"])
    assert before < 0.5  # the misalignment really hurts
    assert qc["dice_truth"] > 0.8
    assert qc["dice_truth"] > before + 0.25
    assert qc["ncc_after"] > qc["ncc_before"] + 0.2
    assert qc["folding_pct"] == 0.0 and qc["jac_min"] > 0
    # outputs on the NCT grid; the mask is binary uint8 and matches the Dice in qc.json
    warped = nib.load(out / "mask_in_nct.nii.gz")
    assert warped.shape == pair["nct"].shape
    assert warped.get_data_dtype() == np.uint8
    np.testing.assert_allclose(warped.affine, pair["affine"], atol=1e-4)
    assert dice(np.asarray(warped.dataobj), pair["nct_mask"]) == pytest.approx(qc["dice_truth"])
    img = nib.load(out / "ctpa_in_nct.nii.gz").get_fdata()
    assert img.shape == pair["nct"].shape
    names = sorted(p.name for p in (out / "transforms").iterdir())
    assert names == ["0GenericAffine.mat", "1InverseWarp.nii.gz", "1Warp.nii.gz", "transforms.json"]
    on_disk = json.loads((out / "qc.json").read_text())
    for key in ("patient_id", "ncc_before", "ncc_after", "jac_min", "folding_pct", "seconds", "dice_truth"):
        assert key in on_disk
    assert on_disk["dice_truth"] == pytest.approx(qc["dice_truth"])


def test_the_deformable_stage_is_needed_for_a_non_rigid_warp(tmp_path):
    """A 6 mm smooth warp on top of the shift and rotation: an affine-only registration cannot undo it
    (measured here: Dice 0.77-0.79, NCC 0.83-0.84 over seeds 0-2) while the default SyN can (Dice 0.84-0.86,
    NCC 0.91). Both thresholds sit between the two, so a SyN stage that did nothing would fail them."""
    pair = synthetic_pair(
        (48, 48, 48), 4.0, shift_mm=(8.0, -6.0, 4.0), warp_mm=6.0, clot_radius_mm=(14.0, 12.0)
    )
    paths = _write(tmp_path, pair)
    got = {}
    for kind in ("Affine", "SyN"):
        got[kind] = register_patient(
            paths["nct"],
            paths["ctpa"],
            paths["ctpa_mask"],
            tmp_path / kind,
            kind,
            {"type_of_transform": kind},
            truth_mask=paths["nct_mask"],
            threads=1,
        )
    assert got["SyN"]["dice_truth"] > 0.83 > got["Affine"]["dice_truth"]
    assert got["SyN"]["ncc_after"] > 0.88 > got["Affine"]["ncc_after"]


def test_registers_on_a_coarser_copy_and_warps_the_fine_grid(tmp_path):
    """A 2.5 mm pair is registered on 4 mm copies (``reg_spacing``); the transforms then warp the 2.5 mm
    images and mask, and still recover the known shift."""
    import ants

    from cpmn.data.register import registration_copy

    pair = synthetic_pair((72, 72, 72), 2.5, shift_mm=(8.0, -6.0, 4.0), clot_radius_mm=(14.0, 12.0), seed=1)
    paths = _write(tmp_path, pair)
    copy = registration_copy(ants.image_read(str(paths["ctpa"])), (-1000.0, 600.0), 4.0)
    assert copy.spacing == pytest.approx((4.0, 4.0, 4.0))
    assert copy.shape == tuple(round(72 * 2.5 / 4.0) for _ in range(3))
    assert copy.numpy().max() <= 600.0 + 1e-3 and copy.numpy().min() >= -1000.0 - 1e-3
    qc = register_patient(
        paths["nct"], paths["ctpa"], paths["ctpa_mask"], tmp_path / "D", "SYN2", truth_mask=paths["nct_mask"]
    )
    assert qc["reg_spacing"] == pytest.approx([4.0, 4.0, 4.0])
    before = dice(pair["ctpa_mask"], pair["nct_mask"])
    assert before < 0.5
    assert qc["dice_truth"] > 0.8 and qc["dice_truth"] > before + 0.25
    warped = nib.load(tmp_path / "D" / "mask_in_nct.nii.gz")
    assert warped.shape == (72, 72, 72)
    np.testing.assert_allclose(warped.header.get_zooms(), (2.5, 2.5, 2.5))


def test_collect_qc(registered, tmp_path, capsys):
    _, _, out, qc = registered
    other = dict(qc, patient_id="AAA", dice_truth=float("nan"), ncc_after=qc["ncc_before"] - 0.1)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "qc.json").write_text(json.dumps(other))
    table = qc_mod.collect_qc([out / "qc.json", tmp_path / "a" / "qc.json"], tmp_path / "reg.tsv")
    assert list(table["patient_id"]) == ["AAA", "SYN1"]  # sorted
    text = (tmp_path / "reg.tsv").read_text().splitlines()
    assert len(text) == 3 and text[0].startswith("patient_id\t")
    printed = capsys.readouterr().out
    assert "NCC improved in 1/2" in printed
    assert f"{qc['dice_truth']:.3f}" in printed  # mean over patients with truth only


def test_scans_apart_in_scanner_coordinates_still_register_with_a_warning(tmp_path, capsys):
    """A CTPA 1 m away along z (another frame of reference): the centre-of-mass start still aligns it;
    NCC before is undefined and said so, NCC after is measured where the warped CTPA covers the body."""
    pair = synthetic_pair((48, 48, 48), 4.0, shift_mm=(8.0, -6.0, 4.0), clot_radius_mm=(14.0, 12.0), seed=0)
    paths = _write(tmp_path, pair)
    far = pair["affine"].copy()
    far[2, 3] += 1000.0
    for key in ("ctpa", "ctpa_mask"):
        nib.save(nib.Nifti1Image(pair[key], far), paths[key])
    qc = register_patient(
        paths["nct"], paths["ctpa"], paths["ctpa_mask"], tmp_path / "D", "FAR", truth_mask=paths["nct_mask"]
    )
    err = capsys.readouterr().err
    assert f"WARNING patient FAR: {paths['ctpa']}: CTPA and NCT do not overlap in scanner coordinates" in err
    assert math.isnan(qc["ncc_before"]) and qc["ncc_after"] > 0.8 and qc["dice_truth"] > 0.8
    assert "NCC improved in 0/0 patients (1 without an NCC before or after)" in qc_mod.summary(
        qc_mod.pd.DataFrame([qc])
    )


def test_bad_mask_grid_is_one_line_error(tmp_path):
    pair = synthetic_pair((24, 24, 24), 8.0, seed=1)
    paths = _write(tmp_path, pair)
    nib.save(nib.Nifti1Image(pair["ctpa_mask"][:20], pair["affine"]), tmp_path / "bad_mask.nii.gz")
    with pytest.raises(InputError, match=r"^patient P7: .*bad_mask.nii.gz: mask grid"):
        register_patient(paths["nct"], paths["ctpa"], tmp_path / "bad_mask.nii.gz", tmp_path / "D", "P7")
    assert not (tmp_path / "D").exists()
    with pytest.raises(InputError, match="does not exist"):
        register_patient(tmp_path / "nope.nii.gz", paths["ctpa"], None, tmp_path / "D", "P7")


def test_defaults_match_config_yaml():
    from pathlib import Path

    from cpmn.config import load_config
    from cpmn.data.register import DEFAULTS

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")["register"]
    assert DEFAULTS == cfg
