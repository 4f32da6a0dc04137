"""Inference: sliding-window mask on the original NCT grid, centre-patch probability, Grad-CAM."""

import os

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from cpmn.data.preprocess import preprocess_patient
from cpmn.errors import InputError
from cpmn.infer import ClassifierLogit, cam_target_layer, infer_split
from cpmn.scoring import centre_patch_score, patient_score, seg_volume_score, segment, window_scores
from cpmn.variants import build_model, variant_entry

P = (32, 32, 32)


def _synthetic_nifti(path, shape=(40, 36, 30), seed=0, clot=True):
    """A small body: soft tissue ellipsoid at 40 HU in air, with a 'vessel' and a clot."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    body = (x / 0.9) ** 2 + (y / 0.8) ** 2 < 1
    hu[body] = 40 + rng.normal(0, 10, body.sum())
    mask = ((x - 0.2) ** 2 + y**2 + z**2 < 0.05).astype(np.uint8) * int(clot)
    affine = np.diag([-4.0, -4.0, 5.0, 1.0])  # LPS-like flips, as dcm2niix often writes
    affine[:3, 3] = [80, 70, -60]
    nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), path / "nct.nii.gz")
    nib.save(nib.Nifti1Image((hu + 300.0 * mask).astype(np.float32), affine), path / "ctpa.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), path / "mask.nii.gz")
    return affine, shape


@pytest.fixture()
def study(tmp_path):
    nifti = tmp_path / "nifti"
    pre = tmp_path / "pre"
    pre.mkdir()
    rows = []
    for k, pid in enumerate(["A1", "B2"]):
        d = nifti / pid
        d.mkdir(parents=True)
        affine, shape = _synthetic_nifti(d, seed=k, clot=k == 0)
        preprocess_patient(
            pid,
            1 - k,
            d / "nct.nii.gz",
            d / "ctpa.nii.gz",
            d / "mask.nii.gz",
            pre / f"{pid}.npz",
            params={"spacing": [4.0, 4.0, 5.0]},
            truth_mask=d / "mask.nii.gz",
        )
        rows.append({"patient_id": pid, "split": "test"})
    splits = tmp_path / "splits.tsv"
    pd.DataFrame(rows).to_csv(splits, sep="\t", index=False)
    cfg = {"variants": {"nct": {"pathways": ["nct"]}}, "model": {"ifa_level": 2}}
    entry = variant_entry("nct", cfg)
    torch.manual_seed(0)
    model = build_model(entry, cfg["model"])
    ckpt = tmp_path / "model.pt"
    torch.save({"variant": entry, "model_cfg": {"ifa_level": 2}, "model": model.state_dict()}, ckpt)
    return {
        "tmp": tmp_path,
        "splits": splits,
        "pre": pre,
        "nifti": nifti,
        "ckpt": ckpt,
        "affine": affine,
        "shape": shape,
        "model": model,
    }


def _infer_test(study, out, params, **kwargs):
    """``infer_split`` of the study fixture's test split with patch P."""
    return infer_split(
        study["ckpt"], study["splits"], "test", study["pre"], out, patch_size=P, params=params, **kwargs
    )


def test_infer_writes_contract_and_masks_on_original_grid(study):
    out = study["tmp"] / "pred" / "nct" / "test.tsv"
    df = _infer_test(
        study,
        out,
        {"cam_positives_only": False, "score": "centre"},
        nifti_dir=study["nifti"],
        ref_template=str(study["nifti"] / "{patient}" / "mask.nii.gz"),
    )
    back = pd.read_csv(out, sep="\t", dtype={"patient_id": str})
    assert list(back.columns[:4]) == ["patient_id", "split", "label", "prob"]
    assert back["label"].tolist() == [1, 0]
    pathway = study["model"].pathway("nct").eval()
    for _, row in back.iterrows():
        npz = np.load(study["pre"] / f"{row.patient_id}.npz")
        # the probability is the classifier on the centre patch
        assert row.prob == pytest.approx(centre_patch_score(pathway, npz["nct"], P, "cpu"), abs=1e-5)
        mask = nib.load(out.parent / row["mask"])
        assert mask.shape == study["shape"]
        np.testing.assert_allclose(mask.affine, study["affine"], atol=1e-5)
        cam = nib.load(out.parent / row["cam"]).get_fdata()
        assert cam.shape == study["shape"] and 0.0 <= cam.min() and cam.max() <= 1.0 + 1e-6
        png = plt.imread(out.parent / row["cam_png"])
        assert row["cam_png"] == f"test/{row.patient_id}_cam.png" and png.shape[0] > 300 and png.ndim == 3
        assert (out.parent / row["image"]).resolve() == (
            study["nifti"] / row.patient_id / "nct.nii.gz"
        ).resolve()
        assert (out.parent / row["ref_mask"]).exists()
    assert len(df) == 2


def test_sliding_window_mask_equals_direct_forward_when_volume_is_one_window(study, tmp_path):
    """With a volume exactly P, the sliding window is one forward pass: the mask is its arg-max."""
    pathway = study["model"].pathway("nct").eval()
    vol = torch.rand(1, 1, *P)
    from monai.inferers import sliding_window_inference

    from cpmn.scoring import SegmentationLogits

    with torch.no_grad():
        sw = sliding_window_inference(vol, P, 1, SegmentationLogits(pathway), overlap=0.25, mode="gaussian")
        direct = pathway(vol).seg
    torch.testing.assert_close(sw, direct, atol=1e-5, rtol=1e-4)
    # cpmn's own segment(): the arg-max of that one forward pass, voxel for voxel
    ours = segment(pathway, vol, P, {"sw_batch_size": 1, "overlap": 0.25})
    want = direct.argmax(1)[0].to(torch.uint8)
    margin = (direct[0, 1] - direct[0, 0]).abs() > 1e-4  # voxels not on the decision boundary
    assert torch.equal(ours[margin], want[margin])


def test_max_score_is_at_least_every_window(study):
    pathway = study["model"].pathway("nct").eval()
    vol = torch.rand(1, 1, 64, 32, 32)
    best = window_scores(pathway, vol, P, overlap=0.0)
    with torch.no_grad():
        left = float(torch.sigmoid(pathway(vol[..., :32, :, :]).cls))
        right = float(torch.sigmoid(pathway(vol[..., 32:, :, :]).cls))
    assert best == pytest.approx(max(left, right), abs=1e-6)


PAPER_MODEL = {"backbone": "efficientnet-b0", "cls_level": 4, "norm": "batch", "cls_pool": "avg"}


@pytest.mark.parametrize(
    ("model_cfg", "shape"),
    [
        ({}, (1, 64, 4, 4, 4)),  # the default plain-cnn, cls_level 2: 64 channels at stride 8
        (PAPER_MODEL, (1, 320, 1, 1, 1)),  # the paper's: deepest EfficientNet-B0 map, stride 32
    ],
)
def test_cam_target_is_the_classifier_input(model_cfg, shape):
    entry = variant_entry("nct", {"variants": {"nct": {"pathways": ["nct"]}}, "model": model_cfg})
    head = ClassifierLogit(build_model(entry, model_cfg).pathway("nct")).eval()
    name = cam_target_layer(head)
    seen = {}
    layer = dict(head.named_modules())[name]
    layer.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    head(torch.rand(1, 1, *P))
    assert seen["shape"] == shape


def test_cam_for_positives_only_by_default(study):
    out = study["tmp"] / "pred2" / "test.tsv"
    df = _infer_test(study, out, None)
    assert df.set_index("patient_id")["cam"].notna().to_dict() == {"A1": True, "B2": False}
    assert df["mask"].notna().all()


def test_seg_volume_score_by_hand():
    mask = torch.zeros(10, 10, 10, dtype=torch.uint8)
    mask[:4, :5, :2] = 1  # 40 voxels of 2 x 2.5 x 4 mm = 20 mm^3 each: 0.8 mL
    assert seg_volume_score(mask, (2.0, 2.5, 4.0), half_ml=0.8) == pytest.approx(0.5)
    assert seg_volume_score(mask, (2.0, 2.5, 4.0), half_ml=0.2) == pytest.approx(0.8 / 1.0)
    assert seg_volume_score(torch.zeros_like(mask), (1.0, 1.0, 1.0), half_ml=1.0) == 0.0


def test_seg_volume_prob_is_the_predicted_mask_volume(study):
    """infer.score: seg_volume writes V / (V + half) of the very mask it writes (on the preprocessed grid)."""
    out = study["tmp"] / "pred_seg" / "nct" / "test.tsv"
    half = 0.5
    _infer_test(study, out, {"score": "seg_volume", "seg_volume_half_ml": half, "cam_splits": []})
    back = pd.read_csv(out, sep="\t", dtype={"patient_id": str})
    pathway = study["model"].pathway("nct").eval()
    for _, row in back.iterrows():
        npz = np.load(study["pre"] / f"{row.patient_id}.npz")
        vol = torch.from_numpy(npz["nct"].astype(np.float32))[None, None]
        mask = segment(pathway, vol, P, {"sw_batch_size": 2, "overlap": 0.25})
        v_ml = float(mask.sum()) * float(np.prod(npz["spacing"])) / 1000.0
        assert row.prob == pytest.approx(v_ml / (v_ml + half), abs=1e-5)
        # the written mask (on the original grid) is that mask resampled: it is empty exactly when V is 0
        written = nib.load(out.parent / row["mask"]).get_fdata()
        assert (written.sum() == 0) == (v_ml == 0)


def test_unknown_score_is_rejected(study):
    pathway = study["model"].pathway("nct")
    with pytest.raises(ValueError, match="infer.score"):
        patient_score(pathway, np.zeros((32, 32, 32), np.float32), (1, 1, 1), P, {"score": "median"})


def test_a_variant_sets_its_own_score_and_seg_free_variants_need_one():
    from cpmn.variants import variant_score

    cfg = {"variants": {"cls": {"pathways": ["nct"], "seg_weight": 0.0}}}
    bare = variant_entry("cls", cfg)
    with pytest.raises(ValueError, match="seg_weight 0"):
        variant_score(bare, {"score": "seg_volume"})
    own = variant_entry("cls", {"variants": {"cls": {**cfg["variants"]["cls"], "score": "centre"}}})
    assert variant_score(own, {"score": "seg_volume", "overlap": 0.25}) == {
        "score": "centre",
        "overlap": 0.25,
    }
    seg = variant_entry("nct", {"variants": {"nct": {"pathways": ["nct"]}}})
    assert variant_score(seg, {"score": "seg_volume"})["score"] == "seg_volume"


def test_compare_scores_writes_each_score_of_the_same_model(study):
    """infer.score seg_volume with compare_scores [centre, max]: prob is the volume score, prob_centre the
    classifier on the centre patch and prob_max the classifier's maximum over the windows."""
    out = study["tmp"] / "pred_cmp" / "nct" / "test.tsv"
    params = {"score": "seg_volume", "seg_volume_half_ml": 0.5, "compare_scores": ["centre", "max"]}
    _infer_test(study, out, {**params, "cam_splits": []})
    back = pd.read_csv(out, sep="\t", dtype={"patient_id": str})
    assert list(back.columns[:7]) == [
        "patient_id",
        "split",
        "label",
        "prob",
        "score",
        "prob_centre",
        "prob_max",
    ]
    assert set(back["score"]) == {"seg_volume"}
    pathway = study["model"].pathway("nct").eval()
    for _, row in back.iterrows():
        npz = np.load(study["pre"] / f"{row.patient_id}.npz")
        vol = torch.from_numpy(npz["nct"].astype(np.float32))[None, None]
        mask = segment(pathway, vol, P, {"sw_batch_size": 2, "overlap": 0.25})
        assert row.prob == pytest.approx(seg_volume_score(mask, npz["spacing"], 0.5), abs=1e-5)
        assert row.prob_centre == pytest.approx(centre_patch_score(pathway, npz["nct"], P, "cpu"), abs=1e-5)
        assert row.prob_max == pytest.approx(window_scores(pathway, vol, P, 0.25), abs=1e-5)


def test_compare_scores_drops_the_primary_and_seg_volume_without_segmentation():
    from cpmn.scoring import compare_scores

    seg = {"seg_weight": 1.0}
    assert compare_scores({"score": "centre", "compare_scores": ["centre", "seg_volume", "max"]}, seg) == [
        "seg_volume",
        "max",
    ]
    assert compare_scores({"score": "centre", "compare_scores": ["seg_volume"]}, {"seg_weight": 0.0}) == []
    with pytest.raises(ValueError, match="compare_scores entry 'median'"):
        compare_scores({"score": "centre", "compare_scores": ["median"]}, seg)


class _ThresholdPathway(torch.nn.Module):
    """A stand-in pathway with a known answer: embolus logit ``x - t`` (so the arg-max mask is ``x > t``)
    and classifier logit = the mean of the patch (the centre score is sigmoid(mean of the centre patch))."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def classify(self, x):
        return x.mean(dim=(1, 2, 3, 4))

    def forward(self, x):
        from cpmn.model import PathwayOutput

        seg = torch.cat([torch.zeros_like(x), x - self.t], dim=1)
        return PathwayOutput(seg=seg, cls=self.classify(x), enc=x, dec=x)


@pytest.mark.parametrize("shape", [(70, 45, 33), (20, 40, 10)])
def test_sliding_window_mask_stitches_windows_exactly(shape):
    """Several overlapping windows (70 x 45 x 33, not a multiple of P) and a volume smaller than P (padded):
    Gaussian blending of per-voxel logits x - t leaves x - t, so the mask must be exactly x > t."""
    g = torch.Generator().manual_seed(1)
    vol = torch.rand(1, 1, *shape, generator=g)
    t = 0.5
    vol[(vol - t).abs() < 1e-3] = 0.9  # no voxel within rounding of the threshold
    mask = segment(_ThresholdPathway(t), vol, P, {"sw_batch_size": 2, "overlap": 0.25})
    assert mask.shape == shape
    assert torch.equal(mask, (vol[0, 0] > t).to(torch.uint8))


class _RampPathway(torch.nn.Module):
    """A pathway whose output depends on where a voxel sits in its window: embolus logit ``x + r(i)`` with
    ``r(i) = (i - 15.5) / 16`` along the window's first axis (``i`` = 0..31), background logit 0."""

    def forward(self, x):
        from cpmn.model import PathwayOutput

        r = (torch.arange(x.shape[2], dtype=x.dtype) - (x.shape[2] - 1) / 2) / 16
        fg = x + r[None, None, :, None, None]
        return PathwayOutput(
            seg=torch.cat([torch.zeros_like(x), fg], 1), cls=x.mean((1, 2, 3, 4)), enc=x, dec=x
        )


def _blended_ramp_by_hand(n: int, p: int, overlap: float, gaussian: bool) -> np.ndarray:
    """The blended ``r`` at every position of an ``(n, p, p)`` volume, written out from MONAI's documented
    rule: windows every ``int(p (1 - overlap))`` voxels, the last one flush with the end; weights the
    product over the three axes of ``exp(-d² / (2 (p/8)²))`` about each window's centre, clamped below at
    1e-3 (or 1 everywhere); each voxel is the weighted mean of the windows covering it."""
    step = int(p * (1 - overlap))
    starts = list(range(0, n - p, step)) + [n - p]
    d = np.arange(p) - (p - 1) / 2
    g1 = np.exp(-(d**2) / (2 * (p / 8) ** 2)) if gaussian else np.ones(p)
    w = np.maximum(g1[:, None, None] * g1[None, :, None] * g1[None, None, :], 1e-3 if gaussian else 0)
    r = (np.arange(p) - (p - 1) / 2) / 16
    num, den = np.zeros((n, p, p)), np.zeros((n, p, p))
    for s in starts:
        num[s : s + p] += w * r[:, None, None]
        den[s : s + p] += w
    return num / den


def test_sliding_window_blends_a_position_dependent_output_with_gaussian_weights():
    """80 x 32 x 32 with P = 32 and overlap 0.25: three windows along x (0, 24, 48). The volume is set to
    ``-b + 0.01 s`` with ``b`` the hand-blended ramp and ``s`` a random sign, so the mask is exactly
    ``s > 0`` if and only if the windows, their overlap and the Gaussian weights are MONAI's documented
    ones. Equal weights (or another overlap) move ``b`` by more than 0.01 in the overlaps."""
    n, p = 80, 32
    b = _blended_ramp_by_hand(n, p, 0.25, gaussian=True)
    flat = _blended_ramp_by_hand(n, p, 0.25, gaussian=False)
    other = _blended_ramp_by_hand(n, p, 0.5, gaussian=True)
    assert (np.abs(flat - b) > 0.02).sum() > 5000 and (np.abs(other - b) > 0.02).sum() > 5000
    sign = np.random.default_rng(0).choice([-1.0, 1.0], size=(n, p, p))
    vol = torch.from_numpy((-b + 0.01 * sign).astype(np.float32))[None, None]
    mask = segment(_RampPathway(), vol, (p, p, p), {"sw_batch_size": 2, "overlap": 0.25})
    assert np.array_equal(mask.numpy(), (sign > 0).astype(np.uint8))


def _centre_patch_by_hand(vol: np.ndarray, patch) -> np.ndarray:
    """The centre window of size ``patch``: crop from ``(n - p) // 2`` where the volume is larger, zero
    padding of ``(p - n) // 2`` before where it is smaller (MONAI's centre crop / symmetric pad)."""
    out = np.zeros(patch, np.float32)
    src, dst = [], []
    for n, p in zip(vol.shape, patch, strict=True):
        if n >= p:
            s = (n - p) // 2 if (n - p) % 2 == 0 else n // 2 - p // 2
            src.append(slice(s, s + p))
            dst.append(slice(0, p))
        else:
            b = (p - n) // 2
            src.append(slice(0, n))
            dst.append(slice(b, b + n))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def test_infer_values_against_a_known_pathway(study, monkeypatch):
    """With the threshold stand-in (t = 0.24 on the NCT's [-50, 150] HU window: HU > -2) the written mask,
    on the original NCT grid, is the body of the NIfTI voxel for voxel; prob (seg_volume) is V / (V + half)
    of its volume; prob_centre is sigmoid(mean of the centre patch) of the stored volume."""
    import cpmn.infer

    stub = _ThresholdPathway(0.24)
    entry = variant_entry("nct", {"variants": {"nct": {"pathways": ["nct"]}}})
    monkeypatch.setattr(cpmn.infer, "load_for_inference", lambda path, device="cpu": (stub, "nct", entry))
    out = study["tmp"] / "pred_stub" / "nct" / "test.tsv"
    half = 1.5
    params = {
        "score": "seg_volume",
        "seg_volume_half_ml": half,
        "compare_scores": ["centre"],
        "cam_splits": [],
    }
    back = _infer_test(study, out, params)
    for _, row in back.iterrows():
        hu = nib.load(study["nifti"] / row.patient_id / "nct.nii.gz").get_fdata()
        truth = hu > -50.0 + 0.24 * 200.0
        written = nib.load(out.parent / row["mask"]).get_fdata() > 0
        assert written.sum() == truth.sum() > 1000
        assert np.array_equal(written, truth)
        v_ml = truth.sum() * 4.0 * 4.0 * 5.0 / 1000.0  # 4 x 4 x 5 mm voxels
        assert row.prob == pytest.approx(v_ml / (v_ml + half), rel=1e-5)
        stored = np.load(study["pre"] / f"{row.patient_id}.npz")["nct"]
        centre = _centre_patch_by_hand(stored, P)
        assert row.prob_centre == pytest.approx(1 / (1 + np.exp(-centre.mean())), abs=1e-6)


def _cli_infer(study, out, splits=None, model=None):
    from cpmn.cli import main

    return main(
        [
            "infer",
            "--model",
            str(model or study["ckpt"]),
            "--splits",
            str(splits or study["splits"]),
            "--split",
            "test",
            "--preprocessed-dir",
            str(study["pre"]),
            "--out",
            str(out),
        ]
    )


@pytest.mark.parametrize("fault", ["missing", "no_phase", "truncated"])
def test_bad_preprocessed_file_is_one_error_line_naming_patient_and_file(study, capsys, fault):
    import re

    path = study["pre"] / "B2.npz"
    if fault == "missing":
        path.unlink()
    elif fault == "no_phase":
        z = dict(np.load(path))
        del z["nct"]
        np.savez(path, **z)
    else:
        path.write_bytes(path.read_bytes()[:200])
    out = study["tmp"] / "bad" / "test.tsv"
    assert _cli_infer(study, out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.match(rf"^ERROR patient B2: {re.escape(str(path))}: ", err[0])
    reason = {"missing": "not found", "no_phase": r"missing arrays \['nct'\]", "truncated": "cannot read"}[
        fault
    ]
    assert re.search(reason, err[0])
    # nothing left behind: neither the table nor patient A1's mask and CAM written before B2 failed
    assert not out.exists() and not list(out.parent.rglob("*"))


def test_unreadable_model_and_empty_split_are_one_error_line(study, capsys):
    bad = study["tmp"] / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    out = study["tmp"] / "bad2" / "test.tsv"
    assert _cli_infer(study, out, model=bad) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ERROR patient ?: {bad}: cannot load the trained model")
    empty = study["tmp"] / "empty_splits.tsv"
    pd.DataFrame([{"patient_id": "A1", "split": "train"}]).to_csv(empty, sep="\t", index=False)
    assert _cli_infer(study, out, splits=empty) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ERROR patient ?: {empty}: split 'test' has no patients"]
    assert not out.exists()


def test_cam_is_zero_outside_the_stored_grid_and_not_everywhere_inside(study):
    """The CAM written on the original NCT grid: voxels whose centre falls outside the preprocessed (cropped)
    grid, located through the two affines, are 0; inside, the map is not all 0."""
    mcfg = {"backbone": "plain-cnn", "ifa_level": 2, "cls_level": 2, "cls_pool": "max", "norm": "group"}
    entry = variant_entry("nct", {"variants": {"nct": {"pathways": ["nct"]}}, "model": mcfg})
    torch.manual_seed(1)
    ckpt = study["tmp"] / "plain.pt"
    torch.save({"variant": entry, "model_cfg": mcfg, "model": build_model(entry, mcfg).state_dict()}, ckpt)
    out = study["tmp"] / "pred_cam" / "test.tsv"
    df = infer_split(ckpt, study["splits"], "test", study["pre"], out, {"cam_positives_only": False}, P)
    for row in df.itertuples():
        cam = nib.load(out.parent / row.cam)
        npz = np.load(study["pre"] / f"{row.patient_id}.npz")
        ijk = np.indices(cam.shape).reshape(3, -1)
        world = cam.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
        stored = (np.linalg.inv(npz["affine"]) @ world)[:3]
        n = np.asarray(npz["nct"].shape)[:, None]
        outside = ((stored < -0.5) | (stored > n - 0.5)).any(0).reshape(cam.shape)
        values = cam.get_fdata()
        assert outside.any() and (~outside).any()
        assert np.all(values[outside] == 0)
        assert values[~outside].max() > 0


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("{pid}/mask.nii.gz", r"--ref-template: bad placeholder \(KeyError\('pid'\)\)"),
        ("A1/mask.nii.gz", r"--ref-template must contain \{patient\}"),  # every patient the same file
    ],
)
def test_a_bad_ref_template_is_refused_before_any_patient(study, template, reason):
    out = study["tmp"] / "rt" / "test.tsv"
    with pytest.raises(InputError, match=reason):
        _infer_test(study, out, {}, ref_template=str(study["nifti"] / template))
    assert not out.parent.exists()


def test_a_missing_image_under_nifti_dir_names_the_patient(study):
    out = study["tmp"] / "nd" / "test.tsv"
    with pytest.raises(InputError, match=r"patient A1: .*nope/A1/nct.nii.gz: NCT NIfTI not found"):
        _infer_test(study, out, {}, nifti_dir=study["tmp"] / "nope")
    assert not out.exists() and not list(out.parent.rglob("*"))


def test_the_split_folder_is_replaced_only_when_infer_wrote_it(study):
    out = study["tmp"] / "own" / "test.tsv"
    masks = out.parent / "test"
    masks.mkdir(parents=True)
    (masks / "Z9_mask.nii.gz").write_bytes(b"from an earlier run")
    (out.parent / ".test.tmpabcd").mkdir()  # staging left by a killed run
    _infer_test(study, out, {})
    assert sorted(f.name for f in masks.iterdir()) == [
        "A1_cam.nii.gz",
        "A1_cam.png",
        "A1_mask.nii.gz",
        "B2_mask.nii.gz",
    ]
    assert sorted(f.name for f in out.parent.iterdir()) == ["test", "test.tsv"]
    umask = os.umask(0)
    os.umask(umask)
    assert masks.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    # a folder of the same name holding anything else is left alone
    (masks / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"test: holds files infer did not write \(notes.txt\); refusing"):
        _infer_test(study, out, {})
    assert (masks / "notes.txt").read_text() == "mine"


def test_grad_cam_of_one_window_equals_the_map_by_hand():
    """Grad-CAM (Selvaraju et al.) by hand on the plain-cnn pathway, one window: the channel weights are the
    spatial mean of d logit / d A at the classifier's input map A, the map is ReLU(sum_c w_c A_c), upsampled
    trilinearly to the window and min-max scaled to [0, 1]. cpmn's sliding-window CAM of a volume that is
    exactly one window must equal it."""
    from cpmn.infer import grad_cam

    mcfg = {"backbone": "plain-cnn", "ifa_level": 2, "cls_level": 2, "cls_pool": "max", "norm": "group"}
    entry = variant_entry("nct", {"variants": {"nct": {"pathways": ["nct"]}}, "model": mcfg})
    torch.manual_seed(3)
    pathway = build_model(entry, mcfg).pathway("nct").eval()
    rng = np.random.default_rng(0)
    vol = rng.random(P).astype(np.float32)
    vol[10:16, 12:18, 14:20] += 1.0  # a bright block, so the map is not flat

    store = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        store["A"] = output

    handle = pathway.cls_input.register_forward_hook(keep)
    try:
        logit = pathway.classify(torch.from_numpy(vol)[None, None])
        logit.sum().backward()
    finally:
        handle.remove()
    A, G = store["A"].detach(), store["A"].grad
    w = G.mean(dim=(2, 3, 4), keepdim=True)
    m = torch.relu((w * A).sum(1, keepdim=True))
    m = torch.nn.functional.interpolate(m, size=P, mode="trilinear", align_corners=False)[0, 0].numpy()
    by_hand = (m - m.min()) / (m.max() - m.min())
    pathway.zero_grad()

    cam = grad_cam(pathway, vol, P, {"overlap": 0.25})
    assert cam.shape == P and by_hand.std() > 0.05
    np.testing.assert_allclose(cam, by_hand, atol=1e-4)
    # a wrong sign of the weights (the map of the other class) would differ
    assert np.abs(cam - (1 - by_hand)).max() > 0.5


def test_a_variant_without_segmentation_writes_no_masks_but_its_cams(study):
    """seg_weight 0 (DML, a classifier): its decoder is untrained, so no mask is written and the tables
    print "–" for its Dice rather than the Dice of an untrained head; the Grad-CAMs (of the classifier)
    are still written."""
    cfg = {"variants": {"cls": {"pathways": ["nct"], "seg_weight": 0.0, "score": "centre"}}, "model": {}}
    entry = variant_entry("cls", cfg)
    torch.manual_seed(0)
    model = build_model(entry, {})
    ckpt = study["tmp"] / "cls.pt"
    torch.save({"variant": entry, "model_cfg": {}, "model": model.state_dict()}, ckpt)
    out = study["tmp"] / "pred_cls" / "cls" / "test.tsv"
    infer_split(
        ckpt,
        study["splits"],
        "test",
        study["pre"],
        out,
        {"cam_positives_only": False},
        P,
        nifti_dir=study["nifti"],
    )
    back = pd.read_csv(out, sep="\t", dtype={"patient_id": str})
    assert back["mask"].isna().all() and back["cam"].notna().all()
    assert not list(out.parent.glob("test/*mask*"))
