"""Every loss of Eq. 5 against pencil-and-paper numbers on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from cpmn.losses import L_KL, L_alig, L_clas, L_disc, L_seg, L_total
from cpmn.model import PathwayOutput

LN3 = math.log(3.0)


def test_l_clas_is_mean_bce():
    # z = 0, y = 1: -log(1/2) = ln 2; z = ln 3, y = 0: -log(1 - 3/4) = ln 4. Mean = 1.5 ln 2.
    loss = L_clas()(torch.tensor([0.0, LN3]), torch.tensor([1.0, 0.0]))
    assert float(loss) == pytest.approx(1.5 * math.log(2.0), abs=1e-6)


def test_l_seg_is_monai_focal_mean_over_channels_and_voxels():
    # two voxels, both with logits (0, ln 3) -> softmax (1/4, 3/4)
    logits = torch.tensor([0.0, LN3]).view(1, 2, 1, 1, 1).repeat(1, 1, 1, 1, 2)
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    # voxel 1 (true class 1, p_t = 3/4): (1/4)^2 ln(4/3); voxel 2 (true class 0, p_t = 1/4): (3/4)^2 ln 4
    fl = 0.0625 * math.log(4 / 3) + 0.5625 * math.log(4.0)
    # MONAI "mean": over B * C * voxels = 1 * 2 * 2 elements (the non-true channel contributes 0)
    assert float(L_seg()(logits, mask)) == pytest.approx(fl / 4, abs=1e-6)


def test_l_kl_value_and_batch_mean():
    # p1 = [1/2, 1/2] (z1 = 0), p2 = [1/4, 3/4] (z2 = ln 3):
    # KL(p2||p1) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; second sample identical distributions -> 0
    z1 = torch.tensor([0.0, 1.0], requires_grad=True)
    z2 = torch.tensor([LN3, 1.0], requires_grad=True)
    loss = L_KL()(z1, z2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert expected == pytest.approx(0.130812, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(expected / 2, abs=1e-6)
    loss.backward()
    assert z1.grad is None  # p1 is detached
    # d/dz2 of KL(p2||p1) for p1 = 1/2: sigma'(z) * (log p2 - log(1 - p2)) = (3/16) * ln 3, halved by the mean
    assert float(z2.grad[0]) == pytest.approx(3 / 16 * LN3 / 2, abs=1e-6)
    assert float(z2.grad[1]) == pytest.approx(0.0, abs=1e-7)


def _nodes(vectors):
    """(N, C) node vectors along x -> encoder map (1, C, N, 1, 1)."""
    return torch.tensor(vectors, dtype=torch.float32).t().reshape(1, -1, len(vectors), 1, 1)


def test_l_alig_two_nodes():
    # Ω1: a = (1, 0), b = (0, 1) -> cos 0; Ω2: a = (1, 0), b = (1, 1) -> cos 1/sqrt 2.
    # sum over ordered pairs (a,b), (b,a) of (0 - 0.7071)^2 = 1; Z = N * alpha_count = 2 * 2 = 4
    f1, f2 = _nodes([[1, 0], [0, 1]]), _nodes([[1, 0], [1, 1]])
    for alpha in (0, 1, 5):
        assert float(L_alig(alpha=alpha, beta=1)(f1, f2)) == pytest.approx(0.25, abs=1e-6)


def test_l_alig_connection_range():
    # three nodes in a row. Ω1: (1,0), (1,0), (0,1); Ω2: all (1,0).
    # differing affinities: pairs (0,2) and (1,2), 1 each (both orders)
    f1, f2 = _nodes([[1, 0], [1, 0], [0, 1]]), _nodes([[1, 0], [1, 0], [1, 0]])
    # alpha = 0 (all-to-all): 4 / (3 * 3)
    assert float(L_alig(alpha=0, beta=1)(f1, f2)) == pytest.approx(4 / 9, abs=1e-6)
    # alpha = 1: node 0 and node 2 are 2 apart -> no edge; sum 2, alpha_count = min(3, 3) -> Z = 3 * 3
    assert float(L_alig(alpha=1, beta=1)(f1, f2)) == pytest.approx(2 / 9, abs=1e-6)


def test_l_alig_granularity_pools_blocks():
    # (1, 2, 4, 2, 2) maps, beta = 2 -> 2 nodes (x blocks 0-1 and 2-3)
    f1 = torch.zeros(1, 2, 4, 2, 2)
    f1[0, 0, 0] = 2.0  # block A: half the positions (2, 0), half (0, 0) -> mean (1, 0)
    f1[0, 1, 2:] = 1.0  # block B: (0, 1)
    f2 = torch.zeros(1, 2, 4, 2, 2)
    f2[0, 0, :2] = 1.0  # block A: (1, 0)
    f2[0, :, 2:] = 1.0  # block B: (1, 1)
    assert float(L_alig(alpha=0, beta=2)(f1, f2)) == pytest.approx(0.25, abs=1e-6)
    # a batch of two with the second sample identical in both pathways: mean over the batch halves it
    two = L_alig(alpha=0, beta=2)(torch.cat([f1, f2]), torch.cat([f2, f2]))
    assert float(two) == pytest.approx(0.125, abs=1e-6)


def _disc_case():
    """2x2x2 map, 2 channels. Class 1: (1,0), (3,0) -> centre (2,0). Class 0: 4x (0,0), 2x (0,6) -> (0,2)."""
    vecs = [[1, 0], [3, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 6], [0, 6]]
    feat = torch.tensor(vecs, dtype=torch.float32).t().reshape(1, 2, 2, 2, 2)
    mask = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float32).reshape(1, 1, 2, 2, 2)
    # squared distances: 1, 1, 4, 4, 4, 4, 16, 16 -> sum 50; 1/2 * 50 / 8 voxels
    return feat, mask, 0.5 * 50 / 8


def test_l_disc_value():
    feat, mask, expected = _disc_case()
    assert float(L_disc()(feat, mask)) == pytest.approx(expected, abs=1e-6)


def test_l_disc_on_an_embolus_free_batch_is_the_spread_about_the_background_centroid():
    """No embolus voxel (most training patches of normals): one centre, the background centroid.
    Features 1, 3 (one channel, two voxels): centroid 2, loss ½·((1-2)² + (3-2)²)/2 = 0.5; no NaN from the
    empty embolus class."""
    feat = torch.tensor([1.0, 3.0]).reshape(1, 1, 2, 1, 1)
    mask = torch.zeros(1, 1, 2, 1, 1)
    got = L_disc()(feat, mask)
    assert torch.isfinite(got) and float(got) == pytest.approx(0.5)
    # two channels, four voxels: centroid (0.5, 1), squared distances 1.25, 1.25, 1.25, 1.25 -> 0.625
    feat = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 2.0, 2.0]]).reshape(1, 2, 4, 1, 1)
    assert float(L_disc()(feat, torch.zeros(1, 1, 4, 1, 1))) == pytest.approx(0.625)


def test_l_disc_normalized_by_hand_and_scale_free():
    # 4 voxels, 2 channels: background (3, 4), (0, 5); embolus (2, 0), (0, -1)
    feat = torch.tensor([[3.0, 0.0, 2.0, 0.0], [4.0, 5.0, 0.0, -1.0]]).reshape(1, 2, 1, 1, 4)
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0]).reshape(1, 1, 1, 1, 4)
    # unit vectors (0.6, 0.8), (0, 1) -> centre (0.3, 0.9), squared distances 0.1, 0.1;
    # (1, 0), (0, -1) -> centre (0.5, -0.5), squared distances 0.5, 0.5; loss = 0.5 * mean = 0.15
    disc = L_disc(normalize=True)
    assert float(disc(feat, mask)) == pytest.approx(0.15, abs=1e-6)
    assert float(disc(10 * feat, mask)) == pytest.approx(0.15, abs=1e-6)  # shrinking cannot lower it
    plain = float(L_disc()(feat, mask))
    assert float(L_disc()(10 * feat, mask)) == pytest.approx(100 * plain, rel=1e-5)


def test_l_disc_resizes_mask_nearest():
    feat, mask, expected = _disc_case()
    hi = mask.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)  # (1, 1, 4, 4, 4)
    assert float(L_disc()(feat, hi)) == pytest.approx(expected, abs=1e-6)


def test_l_disc_gradient_is_pull_to_detached_centre():
    feat, mask, _ = _disc_case()
    feat.requires_grad_(True)
    L_disc()(feat, mask).backward()
    g = feat.grad.reshape(2, 8).t()  # (voxel, channel) = (x - c) / 8
    assert g[0].tolist() == pytest.approx([-1 / 8, 0.0])
    assert g[6].tolist() == pytest.approx([0.0, 4 / 8])


def _out(seg, cls, enc, dec):
    return PathwayOutput(seg=seg, cls=cls, enc=enc, dec=dec)


def test_l_total_combines_terms_with_weights():
    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 4, 4, 4) > 0.7).float()
    label = torch.tensor([1.0, 0.0])
    o1 = _out(
        torch.randn(2, 2, 4, 4, 4), torch.randn(2), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 5, 4, 4, 4)
    )
    o2 = _out(
        torch.randn(2, 2, 4, 4, 4), torch.randn(2), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 5, 4, 4, 4)
    )
    plain = {"seg_loss": "focal", "ifd_normalize": False}  # what L_seg() and L_disc() compute by default
    loss = L_total(("ctpa", "nct"), lambda1=0.25, lambda2=10.0, lambda3=0.1, seg_weight=0.5, **plain)
    total, terms = loss({"ctpa": o1, "nct": o2}, mask, label)
    clas = L_clas()(o1.cls, label) + L_clas()(o2.cls, label)
    seg = L_seg()(o1.seg, mask) + L_seg()(o2.seg, mask)
    disc = L_disc()(o1.dec, mask) + L_disc()(o2.dec, mask)
    kl = L_KL()(o1.cls, o2.cls)
    alig = L_alig(2, 2)(o1.enc, o2.enc)
    expected = clas + 0.5 * seg + 0.25 * kl + 10.0 * alig + 0.1 * disc
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert terms["L_KL"] == pytest.approx(float(kl), rel=1e-6)
    assert terms["L_alig"] == pytest.approx(float(alig), rel=1e-6)
    assert terms["L_total"] == pytest.approx(float(expected), rel=1e-6)
    # single pathway: only its own terms, no KL / alignment
    single, t1 = L_total(("nct",), 0.0, 0.0, 0.0, **plain)({"nct": o2}, mask, label)
    assert float(single) == pytest.approx(float(L_clas()(o2.cls, label) + L_seg()(o2.seg, mask)), rel=1e-6)
    assert t1["L_KL"] == 0.0 and t1["L_alig"] == 0.0


def test_l_total_term_of_weight_zero_is_logged_but_builds_no_gradient():
    torch.manual_seed(1)
    mask = (torch.rand(2, 1, 4, 4, 4) > 0.7).float()
    label = torch.tensor([1.0, 0.0])
    leaves = [
        torch.randn(2, 2, 4, 4, 4),
        torch.randn(2),
        torch.randn(2, 3, 4, 4, 4),
        torch.randn(2, 5, 4, 4, 4),
    ]
    o = _out(*[t.requires_grad_() for t in leaves])
    plain = {"seg_loss": "focal", "ifd_normalize": False}  # what L_seg() and L_disc() compute by default
    total, terms = L_total(("nct",), 0.0, 0.0, 0.0, **plain)({"nct": o}, mask, label)
    total.backward()
    # L_disc (λ3 = 0) is reported, yet its input received no gradient at all (not even zeros)
    assert terms["L_disc"] == pytest.approx(float(L_disc()(o.dec.detach(), mask)), rel=1e-6)
    assert terms["L_disc"] > 0 and o.dec.grad is None
    ref_seg = o.seg.detach().requires_grad_()
    (L_clas()(o.cls.detach(), label) + L_seg()(ref_seg, mask)).backward()
    assert torch.equal(o.seg.grad, ref_seg.grad)
    # with λ3 > 0 the same call sends L_disc's gradient into the decoder map
    o.dec.grad = None
    L_total(("nct",), 0.0, 0.0, 0.1, **plain)({"nct": o}, mask, label)[0].backward()
    assert o.dec.grad is not None and float(o.dec.grad.abs().sum()) > 0


def test_l_total_rejects_transfer_without_two_pathways():
    with pytest.raises(ValueError, match="both pathways"):
        L_total(("nct",), lambda1=0.25)


def test_l_seg_dice_focal_adds_the_batch_dice_of_the_embolus_channel():
    # the two voxels above: p(embolus) = 3/4 on both, truth (1, 0)
    logits = torch.tensor([0.0, LN3]).view(1, 2, 1, 1, 1).repeat(1, 1, 1, 1, 2)
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    fl = (0.0625 * math.log(4 / 3) + 0.5625 * math.log(4.0)) / 4
    # Dice on the embolus channel: 2 * (3/4 * 1) / (3/4 + 3/4 + 1) = 1.5 / 2.5 = 0.6 -> loss 0.4 (+ eps)
    assert float(L_seg(dice=True)(logits, mask)) == pytest.approx(fl + 0.4, abs=1e-5)
    # batch=True: one Dice over the batch, so a sample with no embolus does not count as a Dice of 0
    empty = torch.zeros(1, 1, 1, 1, 2)
    both = L_seg(dice=True)(logits.repeat(2, 1, 1, 1, 1), torch.cat([mask, empty]))
    # sums over both samples: 2 * 3/4 / (4 * 3/4 + 1) = 0.375 -> loss 0.625; focal: the mean of the two
    fl_empty = 2 * (0.5625 * math.log(4.0)) / 4
    assert float(both) == pytest.approx((fl + fl_empty) / 2 + 0.625, abs=1e-5)


def _l_alig_brute_force(f1, f2, alpha, beta):
    """Eq. 2 by loops: nodes = means of beta^3 blocks (smaller at the edges), every ordered pair within
    Chebyshev distance alpha (alpha 0: all pairs), Z = N * prod(min(2 alpha + 1, n_axis)) (alpha 0: N^2);
    mean over the batch."""
    out = []
    for b in range(f1.shape[0]):
        grid = [-(-s // beta) for s in f1.shape[2:]]
        nodes1, nodes2, coords = [], [], []
        for i in range(grid[0]):
            for j in range(grid[1]):
                for k in range(grid[2]):
                    sl = (b, slice(None), *[slice(c * beta, (c + 1) * beta) for c in (i, j, k)])
                    nodes1.append(f1[sl].reshape(f1.shape[1], -1).mean(1))
                    nodes2.append(f2[sl].reshape(f2.shape[1], -1).mean(1))
                    coords.append((i, j, k))
        total = 0.0
        for a in range(len(coords)):
            for c in range(len(coords)):
                cheb = max(abs(p - q) for p, q in zip(coords[a], coords[c], strict=True))
                if alpha == 0 or cheb <= alpha:  # alpha 0: all-to-all
                    s1 = float(torch.nn.functional.cosine_similarity(nodes1[a], nodes1[c], dim=0))
                    s2 = float(torch.nn.functional.cosine_similarity(nodes2[a], nodes2[c], dim=0))
                    total += (s1 - s2) ** 2
        count = 1
        for g in grid:
            count *= min(2 * alpha + 1, g) if alpha else g
        out.append(total / (len(coords) * count))
    return sum(out) / len(out)


@pytest.mark.parametrize(("alpha", "beta"), [(1, 1), (1, 2), (2, 1), (0, 2)])
def test_l_alig_matches_pairwise_loops_on_a_3d_grid(alpha, beta):
    """A (2, 3, 5, 4, 3) map: a 3-D node grid whose neighbourhood is smaller than N (alpha 1 on 5 x 4 x 3),
    edge blocks smaller than beta^3, all axes flattened in one order."""
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(2, 3, 5, 4, 3, generator=g)
    f2 = torch.randn(2, 3, 5, 4, 3, generator=g)
    got = float(L_alig(alpha=alpha, beta=beta)(f1, f2))
    assert got == pytest.approx(_l_alig_brute_force(f1, f2, alpha, beta), rel=1e-5)


def test_l_alig_normaliser_by_hand():
    """Four nodes in a row (beta 1), alpha 1: Z = 4 nodes x 3 neighbours = 12. Node features are unit vectors
    at 0 and 90 degrees alternately in Omega1 and all equal in Omega2: neighbouring pairs differ by 1 in
    affinity (0 vs 1), 6 ordered neighbouring pairs (self pairs 0), so L_alig = 6 / 12."""
    e1 = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]).reshape(1, 2, 4, 1, 1)
    e2 = torch.ones(1, 2, 4, 1, 1)
    assert float(L_alig(alpha=1, beta=1)(e1, e2)) == pytest.approx(6 / 12)
