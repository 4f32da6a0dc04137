"""`train.channels_last`: the network and the patches in channels_last_3d train the same network."""

from __future__ import annotations

import copy

import pytest
import torch

from cpmn.config import schema_defaults
from cpmn.train import train_step
from cpmn.variants import build_variant


def _batch(size=(32, 32, 32), n=2):
    g = torch.Generator().manual_seed(1)
    b = {k: torch.rand(n, 1, *size, generator=g) for k in ("ctpa", "nct")}
    mask = torch.zeros(n, 1, *size)
    mask[0, :, 12:20, 12:20, 13:19] = 1
    return {**b, "mask": mask, "label": torch.tensor([1.0, 0.0])}


@pytest.mark.parametrize("variant", ["nct", "cpmn"])
def test_channels_last_trains_the_same_network(variant):
    """Three Adam steps from the same weights on the same batch: every loss term agrees with the contiguous
    run (relative 1e-5 at the first step, 1e-3 after), and the first step's gradient of every weight tensor
    to 2% of its norm (measured: at most 0.7%, in the first stages; not traced further, and the same with the
    classifier's average pooling instead of max). A reshape or view that assumed the contiguous layout (the
    IFA affinities, the IFD centres) would give differences of order one."""
    cfg = {
        "model": schema_defaults("model"),
        "variants": {variant: {"pathways": ["nct"] if variant == "nct" else ["ctpa", "nct"], "lambda1": 0.0}},
    }
    cfg["variants"]["cpmn"] = {"pathways": ["ctpa", "nct"], "lambda1": 0.25, "lambda2": 10.0, "lambda3": 0.1}
    torch.manual_seed(0)
    model_a, loss_a = build_variant(variant, cfg)
    model_b, loss_b = copy.deepcopy(model_a), copy.deepcopy(loss_a)
    model_b = model_b.to(memory_format=torch.channels_last_3d)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-3)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-3)
    b = _batch()
    b_last = {
        k: v.contiguous(memory_format=torch.channels_last_3d) if v.dim() == 5 else v for k, v in b.items()
    }
    assert b_last["nct"].is_contiguous(memory_format=torch.channels_last_3d)
    cpu = torch.device("cpu")
    for step in range(3):
        _, ta = train_step(model_a, loss_a, opt_a, b, cpu, None)
        _, tb = train_step(model_b, loss_b, opt_b, b_last, cpu, None)
        # the first step's losses differ only by the order of float sums; Adam then amplifies that a little
        for k in ta:
            assert tb[k] == pytest.approx(ta[k], rel=1e-5 if step == 0 else 1e-3, abs=1e-6), (step, k)
        if step == 0:  # the first gradients, tensor by tensor (train_step leaves them in .grad)
            named_b = dict(model_b.named_parameters())
            for name, pa in model_a.named_parameters():
                ga, gb = pa.grad, named_b[name].grad
                assert (ga is None) == (gb is None), name
                if ga is not None and ga.norm() > 0:
                    assert float((ga - gb).norm() / ga.norm()) < 2e-2, name
    assert ta["L_seg"] > 0 and (variant == "nct" or ta["L_alig"] > 0)
