"""The pathway wraps MONAI's FlexibleUNet; the transfer losses train only Ω2 (gradients of the real net)."""

from __future__ import annotations

import pytest
import torch

from cpmn.losses import L_KL, L_alig, L_clas
from cpmn.model import DualPathway, Pathway, encoder_channels, replace_batchnorm_with_groupnorm


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.rand(1, 1, 32, 32, 32)


def test_encoder_channels_of_efficientnet_b0():
    assert encoder_channels("efficientnet-b0") == (16, 24, 40, 112, 320)


def test_pathway_shapes_and_equals_monai_forward(x):
    torch.manual_seed(0)
    net = Pathway("efficientnet-b0", ifa_level=2).eval()
    with torch.no_grad():
        out = net(x)
        reference = net.unet(x)  # MONAI's own FlexibleUNet.forward
    assert out.seg.shape == (1, 2, 32, 32, 32)
    assert out.cls.shape == (1,)
    assert out.enc.shape == (1, 40, 4, 4, 4)  # level 2: 40 channels at stride 8
    assert out.dec.shape == (1, 16, 32, 32, 32)
    assert torch.allclose(out.seg, reference)
    deep = Pathway("efficientnet-b0", ifa_level=4).eval()
    with torch.no_grad():
        assert deep(x).enc.shape == (1, 320, 1, 1, 1)


def test_plain_cnn_pathway_shapes_and_classifier_on_its_level(x):
    torch.manual_seed(0)
    assert encoder_channels("plain-cnn") == (16, 32, 64, 64, 128)
    net = Pathway(
        "plain-cnn",
        ifa_level=2,
        norm="group",
        decoder_channels=(64, 32, 32, 16, 16),
        cls_level=3,
        cls_pool="max",
    ).eval()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    seen = {}
    net.cls_input.register_forward_hook(lambda m, i, o: seen.update(feat=o))
    with torch.no_grad():
        out = net(x)
        assert torch.allclose(out.seg, net.unet(x), atol=1e-6)  # MONAI's own FlexibleUNet.forward
    assert out.seg.shape == (1, 2, 32, 32, 32)
    assert out.enc.shape == (1, 64, 4, 4, 4)  # level 2: 64 channels at stride 8
    assert out.dec.shape == (1, 16, 32, 32, 32)
    assert seen["feat"].shape == (1, 64, 2, 2, 2)  # level 3: 64 channels at stride 16
    # the head is global max pool -> FC -> ReLU -> FC on that map, computed here by hand
    h = net.classifier
    pooled = seen["feat"].amax(dim=(2, 3, 4))
    by_hand = h.fc2(torch.relu(h.fc1(pooled))).squeeze(1)
    assert torch.allclose(out.cls, by_hand, atol=1e-6)
    assert not torch.allclose(pooled, seen["feat"].mean(dim=(2, 3, 4)))  # max and average differ here
    # classify(): the same logit without the decoder, and Grad-CAM's hook still sees the level-3 map
    seen.clear()
    with torch.no_grad():
        assert torch.allclose(net.classify(x), out.cls, atol=1e-6)
    assert seen["feat"].shape == (1, 64, 2, 2, 2)


def test_pathway_rejects_bad_head_settings():
    with pytest.raises(ValueError, match="cls_level 5"):
        Pathway("plain-cnn", cls_level=5)
    with pytest.raises(ValueError, match="pool"):
        Pathway("plain-cnn", cls_pool="median")
    with pytest.raises(ValueError, match="decoder_channels needs 5"):
        Pathway("plain-cnn", decoder_channels=(32, 16))


def test_dual_pathway_has_separate_weights():
    torch.manual_seed(0)
    dual = DualPathway()
    p1 = dict(dual.omega1.named_parameters())
    p2 = dict(dual.omega2.named_parameters())
    assert p1.keys() == p2.keys()
    stem = "unet.encoder._conv_stem.weight"
    assert p1[stem].data_ptr() != p2[stem].data_ptr()
    assert not torch.equal(p1[stem], p2[stem])


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def _nonzero(g):
    return g is not None and bool(g.abs().sum() > 0)


@pytest.mark.parametrize("which", ["kl", "alig"])
def test_transfer_losses_train_only_omega2(x, which):
    torch.manual_seed(0)
    dual = DualPathway(ifa_level=2).eval()  # eval: batch-norm running stats for a batch of one
    out = dual(x, torch.rand_like(x))
    loss = L_KL()(out.ctpa.cls, out.nct.cls) if which == "kl" else L_alig(2, 2)(out.ctpa.enc, out.nct.enc)
    assert float(loss.detach()) > 0
    loss.backward()
    g1, g2 = _grads(dual.omega1), _grads(dual.omega2)
    assert all(g is None or not g.abs().any() for g in g1.values())
    assert _nonzero(g2["unet.encoder._conv_stem.weight"])
    if which == "kl":
        assert _nonzero(g2["classifier.fc2.weight"])
    assert sum(_nonzero(g) for g in g2.values()) > 20


def test_classification_loss_does_train_omega1(x):
    # the counterpart that shows the test above could fail: a loss on Ω1's output reaches Ω1
    torch.manual_seed(0)
    dual = DualPathway().eval()
    out = dual(x, x)
    L_clas()(out.ctpa.cls, torch.ones(1)).backward()
    assert _nonzero(dual.omega1.unet.encoder._conv_stem.weight.grad)
    assert dual.omega2.unet.encoder._conv_stem.weight.grad is None


def test_bn_momentum_keeps_eval_features_input_dependent_after_a_short_schedule():
    """With MONAI's EfficientNet momentum (0.01) ~30 train-mode passes leave the running statistics at their
    initial values and eval-mode features collapse to a constant (every patient the same score); the
    default 0.1 tracks the activations."""
    rel = {}
    for mom in (0.01, 0.1):
        torch.manual_seed(0)
        p = Pathway(bn_momentum=mom)
        assert all(m.momentum == mom for m in p.modules() if isinstance(m, torch.nn.BatchNorm3d))
        p.train()
        with torch.no_grad():
            for _ in range(30):
                p(torch.rand(2, 1, 32, 32, 32))
        p.eval()
        with torch.no_grad():
            a = p(torch.rand(1, 1, 32, 32, 32)).enc
            b = p(0.2 * torch.rand(1, 1, 32, 32, 32)).enc
        rel[mom] = float((a - b).abs().mean() / a.abs().mean())
    assert rel[0.01] < 1e-3
    assert rel[0.1] > 1e-2


def test_group_norm_replaces_every_batchnorm_and_has_no_batch_dependence():
    """norm="group": every BatchNorm becomes a GroupNorm, so a sample's train-mode output does not depend on
    the other samples of the batch (BatchNorm with batch 2 on a 1x1x1 map outputs +-1 whatever the input)."""
    p = Pathway(norm="group")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in p.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in p.modules()) > 40
    torch.manual_seed(0)
    x = torch.randn(2, 8, 1, 1, 1)
    bn = torch.nn.Sequential(torch.nn.BatchNorm3d(8)).train()
    gn = torch.nn.Sequential(torch.nn.BatchNorm3d(8)).train()
    replace_batchnorm_with_groupnorm(gn, groups=4)
    assert isinstance(gn[0], torch.nn.GroupNorm) and gn[0].num_groups == 4
    with torch.no_grad():
        assert torch.allclose(bn(x).abs(), torch.ones_like(x), atol=1e-2)  # BN: only the sign survives
        alone, both = gn(x[:1]), gn(x)
    assert torch.allclose(alone, both[:1], atol=1e-6)
    # GroupNorm by hand: each group of 2 channels of one sample normalised to mean 0, variance 1
    g = x[0].view(4, 2)
    ref = (g - g.mean(1, keepdim=True)) / torch.sqrt(g.var(1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(alone.view(4, 2), ref, atol=1e-4)
    with pytest.raises(ValueError, match="unknown norm"):
        Pathway(norm="layer")
