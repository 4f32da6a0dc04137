"""Table 2's baselines: nnU-Net's planned topology, the two joint networks' outputs, DML's two-way KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from cpmn import infer, scoring
from cpmn.baselines import NNUNetPathway, SwinUNETRPathway, nnunet_plan
from cpmn.bundle import network_def
from cpmn.losses import L_mutual
from cpmn.model import PathwayOutput
from cpmn.variants import build_variant, variant_entry

P = (32, 32, 32)


def test_nnunet_plan_of_the_demo_patch():
    """32^3 at 5 mm isotropic: every axis pools while it is >= 8 voxels (min feature map 4):
    32 -> 16 -> 8 -> 4, so 4 stages of 3^3 convolutions with 32, 64, 128, 256 features."""
    plan = nnunet_plan(P, (5.0, 5.0, 5.0))
    assert plan["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert plan["kernel_sizes"] == [[3, 3, 3]] * 4
    assert plan["features"] == [32, 64, 128, 256]


def test_nnunet_plan_of_the_paper_patch_is_anisotropic_first():
    """224 x 224 x 96 at 1.5 x 1.5 x 3 mm, traced by hand through nnU-Net's rules: z (3 mm, twice the finest)
    neither pools nor gets a 3-kernel in round 1; from then on the spacing is 3 mm on every axis and all
    pool: 112x112x96 -> 56x56x48 -> 28x28x24 -> 14x14x12 -> 7x7x6, where no axis is >= 8 any more. The
    features double from 32 and stop at 320."""
    plan = nnunet_plan((224, 224, 96), (1.5, 1.5, 3.0))
    assert plan["strides"] == [[1, 1, 1], [2, 2, 1]] + [[2, 2, 2]] * 4
    assert plan["kernel_sizes"] == [[3, 3, 1]] + [[3, 3, 3]] * 5
    assert plan["features"] == [32, 64, 128, 256, 320, 320]
    with pytest.raises(ValueError, match="differ in length"):
        nnunet_plan((224, 224, 96), (1.5, 1.5))


@pytest.mark.parametrize(
    ("make", "enc_channels", "dec_channels"),
    [
        (lambda: NNUNetPathway(P, (5.0, 5.0, 5.0), ifa_level=2, cls_level=2, cls_pool="max"), 256, 32),
        (lambda: SwinUNETRPathway(24, "group", ifa_level=2, cls_level=2, cls_pool="max"), 96, 24),
    ],
    ids=["nnunet", "swinunetr"],
)
def test_joint_networks_give_the_pathway_outputs(make, enc_channels, dec_channels):
    """Shapes of every output at the demo patch; the classifier and IFA read the stride-8 map (cls_level 2);
    classify() (encoder + classifier only, used by the centre score and Grad-CAM) equals forward().cls."""
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(2, 1, *P)
    with torch.no_grad():
        out = net(x)
        logit = net.classify(x)
    assert isinstance(out, PathwayOutput)
    assert out.seg.shape == (2, 2, *P)
    assert out.cls.shape == (2,)
    assert out.enc.shape == (2, enc_channels, 4, 4, 4)
    assert out.dec.shape == (2, dec_channels, *P)
    assert torch.allclose(logit, out.cls, atol=1e-5)
    assert net.cam_layer == "cls_input" and hasattr(net, "cls_input")


def test_l_mutual_by_hand():
    """z1 = 0, z2 = ln 3: p1 = (1/2, 1/2), p2 = (1/4, 3/4).
    D_KL(p2 || p1) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; D_KL(p1 || p2) = 1/2 ln 2 + 1/2 ln(2/3) = 0.143841.
    The gradient of D_KL(q || p(z)) in z is sigma(z) - q_1: 1/2 - 3/4 for z1 and 3/4 - 1/2 for z2 (each
    network learns towards the other's fixed prediction)."""
    z1 = torch.tensor([0.0], requires_grad=True)
    z2 = torch.tensor([math.log(3.0)], requires_grad=True)
    loss = L_mutual()(z1, z2)
    kl21 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl12 = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert loss.item() == pytest.approx(kl21 + kl12, abs=1e-6)
    loss.backward()
    assert z1.grad.item() == pytest.approx(-0.25, abs=1e-6)
    assert z2.grad.item() == pytest.approx(0.25, abs=1e-6)


def _batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 1, *P)
    mask[0, 0, 12:18, 12:18, 12:18] = 1
    return {
        "ctpa": torch.randn(2, 1, *P, generator=g),
        "nct": torch.randn(2, 1, *P, generator=g),
        "mask": mask,
        "label": torch.tensor([1.0, 0.0]),
    }


def test_dml_trains_both_pathways_from_each_other_and_no_segmentation():
    """DML (mutual_kl 1, seg_weight 0): L_total = L_clas + L_mutual, Ω1 gets a gradient from the KL too
    (unlike the one-way L_KL), and no decoder or segmentation head gets any gradient."""
    cfg = {"variants": {"dml": {"pathways": ["ctpa", "nct"], "seg_weight": 0.0, "mutual_kl": 1.0}}}
    batch = _batch()
    grads = {}
    for w in (1.0, 0.0):
        cfg["variants"]["dml"]["mutual_kl"] = w
        torch.manual_seed(0)
        model, loss_fn = build_variant("dml", cfg)
        out = model(batch)
        assert not model.decode and out["ctpa"].seg is None and out["nct"].dec is None  # no decoder runs
        total, t = loss_fn(out, batch["mask"], batch["label"])
        if w:
            assert t["L_mutual"] > 0
            assert t["L_total"] == pytest.approx(t["L_clas"] + t["L_mutual"], rel=1e-6)
        total.backward()
        grads[w] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        assert not any(".decoder." in k or "segmentation_head" in k for k in grads[w])
    for omega in ("net.omega1.", "net.omega2."):
        keys = [k for k in grads[1.0] if k.startswith(omega + "unet.encoder")]
        assert keys and any(not torch.allclose(grads[1.0][k], grads[0.0][k]) for k in keys), omega


def test_joint_variant_entries_and_their_bundle_network():
    """A baseline variant records what rebuilds it (architecture, and nnU-Net's patch and spacing); the
    bundle's network_def rebuilds the same network with MONAI's ConfigParser, and the weights load."""
    cfg = {
        "variants": {"nn": {"pathways": ["nct"], "architecture": "nnunet"}},
        "patches": {"size": [32, 32, 32]},
        "preprocess": {"spacing": [5.0, 5.0, 5.0]},
    }
    entry = variant_entry("nn", cfg)
    assert entry["architecture"] == "nnunet"
    assert entry["patch_size"] == [32, 32, 32] and entry["spacing"] == [5.0, 5.0, 5.0]
    model, _ = build_variant("nn", cfg)
    pathway = model.pathway("nct")
    parser = ConfigParser({"imports": ["$import cpmn.baselines"], "net": network_def({}, entry)})
    rebuilt = parser.get_parsed_content("net")
    assert isinstance(rebuilt, NNUNetPathway)
    rebuilt.load_state_dict(pathway.state_dict())
    with pytest.raises(ValueError, match="single-pathway"):
        variant_entry("x", {"variants": {"x": {"pathways": ["ctpa", "nct"], "architecture": "swinunetr"}}})
    with pytest.raises(ValueError, match="need"):
        build_variant("x", {"variants": {"x": {"pathways": ["nct"], "mutual_kl": 1.0}}})


@pytest.mark.parametrize("arch", ["nnunet", "swinunetr"])
def test_joint_networks_go_through_inference_and_grad_cam(arch):
    """Every patient score, the sliding-window mask and Grad-CAM run on a baseline pathway over a volume
    larger than one patch: the centre score is the classifier's probability on the centre patch, the mask
    and the CAM have the volume's shape, and the CAM lies in [0, 1] with a clear peak (min-max per window,
    blended)."""

    cfg = {
        "variants": {"b": {"pathways": ["nct"], "architecture": arch}},
        "patches": {"size": [32, 32, 32]},
        "preprocess": {"spacing": [5.0, 5.0, 5.0]},
    }
    torch.manual_seed(0)
    model, _ = build_variant("b", cfg)
    pathway = model.pathway("nct").eval()
    vol = np.random.default_rng(0).random((40, 36, 32)).astype(np.float32)
    params = {**scoring.DEFAULTS, "overlap": 0.25}
    centre, _ = scoring.patient_score(pathway, vol, None, P, {**params, "score": "centre"})
    with torch.no_grad():
        logit = pathway.classify(torch.from_numpy(vol[4:36, 2:34, 0:32].copy())[None, None])
    assert centre == pytest.approx(torch.sigmoid(logit).item(), abs=1e-5)
    prob, mask = scoring.patient_score(pathway, vol, (5.0, 5.0, 5.0), P, {**params, "score": "seg_volume"})
    assert 0 <= prob <= 1 and tuple(mask.shape) == vol.shape
    cam = infer.grad_cam(pathway, vol, P, params)
    assert cam.shape == vol.shape and cam.min() >= 0 and 0.5 < cam.max() <= 1 + 1e-6
