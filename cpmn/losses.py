"""The losses of Eq. 5, one module each, named as in the paper.

``L_total = L_clas + L_seg + λ1 L_KL + λ2 L_alig + λ3 L_disc``; the paper's λ1 = 0.25, λ2 = 10, λ3 = 0.1
are the ``cpmn`` variant's (``variants.cpmn`` in config/config.yaml), and :class:`L_total`'s own are 0.

Pathway 1 (Ω1) sees CTPA, pathway 2 (Ω2) sees NCT (CTPA registered to NCT, so both share the mask).
The two transfer losses L_KL and L_alig treat Ω1 as the teacher: its tensors are detached, so their
gradient flows only into Ω2. Every loss is computed in float32 (inputs are cast), so that it is safe
under bf16 autocast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from cpmn.config import schema_defaults
from cpmn.model import PathwayOutput

#: ``model.seg_loss`` and ``model.ifd_normalize`` when :class:`L_total` is built without them (the schema's)
_MODEL = schema_defaults("model")

TERMS = ("L_clas", "L_seg", "L_KL", "L_alig", "L_disc", "L_mutual", "L_total")


class L_clas(nn.Module):
    """Patch classification loss: binary cross-entropy with logits.

    ``logit`` ``(B,)``, ``label`` ``(B,)`` in {0, 1}; reduction: mean over the batch.
    """

    def forward(self, logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logit.float(), label.float(), reduction="mean")


class L_seg(nn.Module):
    """Segmentation loss: MONAI ``FocalLoss`` (γ = 2) on the softmax of the 2-class logits, plus, with
    ``dice=True``, MONAI ``DiceLoss`` on the embolus channel.

    ``logits`` ``(B, 2, X, Y, Z)``, ``mask`` ``(B, 1, X, Y, Z)`` with values in {0, 1} (one-hot inside,
    ``to_onehot_y=True``, ``use_softmax=True``).

    Focal reduction (MONAI ``mean``): the mean over batch, both class channels and voxels of
    ``-(1 - p_c)^γ y_c log p_c``, i.e. half the voxel mean of ``-(1 - p_t)^γ log p_t`` with ``p_t`` the
    softmax probability of the true class. Emboli fill well under 1 % of a patch, so this mean is ~1e-3
    and, on a short schedule, gives the encoder almost no gradient towards the emboli.

    Dice (``batch=True``, background excluded): ``1 - (2 Σ p y + ε) / (Σ p + Σ y + ε)`` with the sums over
    the whole batch and every voxel of the embolus channel (``ε = 1e-5``), so that a batch with no embolus
    voxel still has a defined loss (near 0 when nothing is predicted). It weighs the embolus voxels as
    much as the whole background, which is what makes a small-structure segmentation learn quickly
    (nnU-Net's Dice + cross-entropy). ``L_seg = focal + dice``.
    """

    def __init__(self, gamma: float = 2.0, dice: bool = False):
        super().__init__()
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma, reduction="mean")
        self.dice = (
            DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True) if dice else None
        )

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits, mask = logits.float(), mask.float()
        loss = self.focal(logits, mask)
        if self.dice is not None:
            loss = loss + (_ddp_batch_dice(logits, mask) if _ddp_world() > 1 else self.dice(logits, mask))
        return loss


def _ddp_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _ddp_batch_dice(logits: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The batch Dice loss of :class:`L_seg` over the *global* batch of a DDP run (every rank's samples).

    ``Σ p y``, ``Σ p`` and ``Σ y`` of the embolus channel are summed over the ranks with a differentiable
    all-reduce (as nnU-Net does for its batch Dice), so the loss, and after DDP's gradient averaging the
    gradient, equal one process with the whole batch. ``logits`` ``(b, 2, X, Y, Z)``, ``mask``
    ``(b, 1, X, Y, Z)``; returns a scalar.
    """
    from torch.distributed.nn.functional import all_reduce  # only under torchrun

    p = torch.softmax(logits, dim=1)[:, 1]
    y = mask[:, 0]
    sums = all_reduce(torch.stack([(p * y).sum(), p.sum(), y.sum()]))
    return 1.0 - (2.0 * sums[0] + eps) / (sums[1] + sums[2] + eps)


def _log_two_class(logit: torch.Tensor) -> torch.Tensor:
    """``(B,)`` logit -> ``(B, 2)`` log-probabilities ``[log(1 - σ(z)), log σ(z)]`` (stable)."""
    return torch.stack([F.logsigmoid(-logit), F.logsigmoid(logit)], dim=1)


class L_KL(nn.Module):
    """Eq. 1: D_KL(p2 ‖ p1) between the two pathways' patch-classifier distributions.

    ``p = [1 - σ(z), σ(z)]`` for each pathway's logit ``z`` ``(B,)``;
    ``D_KL(p2 ‖ p1) = Σ_k p2_k (log p2_k - log p1_k)`` summed over the two classes, then averaged over the
    batch. ``p1`` (Ω1, CTPA) is detached: the gradient flows only into Ω2 (NCT).
    """

    def forward(self, logit1: torch.Tensor, logit2: torch.Tensor) -> torch.Tensor:
        log_p1 = _log_two_class(logit1.detach().float())
        log_p2 = _log_two_class(logit2.float())
        return (log_p2.exp() * (log_p2 - log_p1)).sum(dim=1).mean()


class L_mutual(nn.Module):
    """Deep mutual learning (DML, Zhang et al., CVPR 2018, Eqs. 2-3): each pathway learns from the other.

    ``D_KL(p2 ‖ p1)`` with ``p2`` detached trains Ω1, and ``D_KL(p1 ‖ p2)`` with ``p1`` detached trains Ω2,
    where ``D_KL(q ‖ p) = Σ_k q_k (log q_k - log p_k)`` over the two classes of ``p = [1 - σ(z), σ(z)]``;
    as in the reference implementation, each network's KL treats the other's prediction as a fixed target.
    ``logit1``, ``logit2`` ``(B,)``; returns the sum of the two KLs, each averaged over the batch. Unlike
    L_KL (Eq. 1, one way, Ω1 the teacher), the gradient reaches both pathways.
    """

    @staticmethod
    def _kl(target_logit: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        log_q = _log_two_class(target_logit.detach().float())
        log_p = _log_two_class(logit.float())
        return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()

    def forward(self, logit1: torch.Tensor, logit2: torch.Tensor) -> torch.Tensor:
        return self._kl(logit2, logit1) + self._kl(logit1, logit2)


class L_alig(nn.Module):
    """Eq. 2 (IFA): align the affinity graphs of the two pathways' encoder maps.

    Nodes: the encoder map ``(B, C, x, y, z)`` is average-pooled in blocks of ``β`` positions per axis
    (``avg_pool3d``, kernel = stride = β, ``ceil_mode`` so that a remainder forms a smaller block), giving
    ``N = W'·H'·D'`` node feature vectors of length C. Edges: node i connects to node j when their Chebyshev
    distance in node units is ≤ α (α = 0: all-to-all, as in structured knowledge distillation, Liu et al.,
    CVPR 2019). ``a_ij`` is the cosine similarity of the node features. Loss per sample:
    ``Σ_{i, j ∈ R_α(i)} (a_ij^Ω1 - a_ij^Ω2)^2 / Z`` with ``Z = W'·H'·D'·α_count`` — the number of nodes times
    the neighbourhood size, ``α_count = Π_axes min(2α + 1, n_axis)`` (the cube of side 2α + 1, self included,
    clipped to the node grid; α = 0 gives ``α_count = N`` and the ``1 / N²`` of structured KD). The pairs
    (i, i) contribute 0 (a_ii = 1 in both). Reduction: mean over the batch. Ω1 is detached.

    Defaults (``model.ifa_level: 2, ifa_alpha: 2, ifa_beta: 2``): IFA acts on encoder level 2 (stride 8:
    64 channels in ``plain-cnn``, 40 in EfficientNet-B0), the stride of the feature map structured KD distils
    and the deepest level at which the demo patch (32³) still gives a graph (4×4×4 positions → 2×2×2 = 8
    nodes); at the paper's 224×224×96 it gives 28×28×12 → 14×14×6 = 1176 nodes. β = 2 as in structured KD
    (node = mean of 2³ positions, a 16-voxel block: 8 cm at the demo's 5 mm). α = 2 links each node to its
    5×5×5 neighbourhood: local context, which keeps the graph sparse at the paper's scale (125 of 1176
    neighbours) where all-to-all would mostly compare unrelated anatomy (the demo's 2×2×2 graph is then
    all-to-all).
    """

    def __init__(self, alpha: int = 2, beta: int = 2):
        super().__init__()
        if alpha < 0 or beta < 1:
            raise ValueError(f"need alpha >= 0 and beta >= 1, got alpha={alpha}, beta={beta}")
        self.alpha = int(alpha)
        self.beta = int(beta)
        self._masks: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    def neighbourhood(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, int]:
        """Edge mask ``(N, N)`` bool of the node grid and ``α_count`` (see the class docstring)."""
        n = math.prod(grid)
        if self.alpha == 0:
            return torch.ones(n, n, dtype=torch.bool, device=device), n
        key = (grid, str(device))
        if key not in self._masks:
            coords = torch.stack(
                torch.meshgrid(*[torch.arange(g, device=device) for g in grid], indexing="ij"), dim=-1
            ).reshape(n, 3)
            cheb = (coords[:, None, :] - coords[None, :, :]).abs().amax(dim=-1)
            self._masks[key] = cheb <= self.alpha
        count = math.prod(min(2 * self.alpha + 1, g) for g in grid)
        return self._masks[key], count

    def affinity(self, feat: torch.Tensor) -> torch.Tensor:
        """Encoder map ``(B, C, x, y, z)`` -> node affinities ``(B, N, N)`` (cosine similarity)."""
        nodes = F.avg_pool3d(feat.float(), kernel_size=self.beta, stride=self.beta, ceil_mode=True)
        v = F.normalize(nodes.flatten(2), dim=1, eps=1e-8)  # (B, C, N)
        return v.transpose(1, 2) @ v

    def forward(self, enc1: torch.Tensor, enc2: torch.Tensor) -> torch.Tensor:
        if enc1.shape != enc2.shape:
            raise ValueError(f"encoder maps differ in shape: {tuple(enc1.shape)} vs {tuple(enc2.shape)}")
        a1 = self.affinity(enc1.detach())
        a2 = self.affinity(enc2)
        grid = tuple(-(-s // self.beta) for s in enc1.shape[2:])
        mask, count = self.neighbourhood(grid, enc1.device)
        z = math.prod(grid) * count
        sq = ((a1 - a2) ** 2) * mask  # (B, N, N)
        return (sq.flatten(1).sum(1) / z).mean()


class L_disc(nn.Module):
    """Eqs. 3-4 (IFD): dense centre loss on the decoder feature map of one pathway.

    ``feat`` ``(B, C, X', Y', Z')``, ``mask`` ``(B, 1, X, Y, Z)`` in {0, 1}; the mask is resized to the
    feature map with nearest-neighbour interpolation. Class centres ``c_k`` (Eq. 4) are the centroids of
    the feature vectors of all voxels of class k in the current batch, recomputed every iteration. As in
    the centre-loss paper (Wen et al., ECCV 2016), the centres are per-iteration estimates, not
    differentiable paths: they are detached, so the loss pulls each feature towards its class centre
    (with exact batch centroids the gradient through the centres would vanish anyway, as
    Σ_v (x_v - c) = 0 within a class; detaching makes that explicit and keeps the graph small).
    Loss (Eq. 3): ``½ ‖x_v - c_{y_v}‖²`` averaged over all voxels v of the batch. A class absent from
    the batch has no centre and no voxel to pull.

    ``normalize=True`` first scales every feature vector to unit length (``x_v / ‖x_v‖``, the centres are
    then centroids of unit vectors), so the loss (at most 2) cannot be lowered by shrinking the features,
    which is the trivial minimum of the plain form: with it the segmentation of a short CPU run collapsed to
    all background (see docs/method-choices.md).
    """

    def __init__(self, normalize: bool = False):
        super().__init__()
        self.normalize = bool(normalize)

    def forward(self, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feat = feat.float()
        if mask.shape[2:] != feat.shape[2:]:
            mask = F.interpolate(mask.float(), size=feat.shape[2:], mode="nearest")
        x = feat.permute(0, 2, 3, 4, 1).reshape(-1, feat.shape[1])  # (V, C), V = B·X'·Y'·Z'
        if self.normalize:
            x = F.normalize(x, dim=1, eps=1e-6)
        y = (mask[:, 0] > 0.5).flatten().to(x.dtype)  # (V,) 1 = embolus
        with torch.no_grad():  # the centres c_0, c_1 (Eq. 4): class sums over class counts
            n1 = y.sum()
            s1 = y @ x  # (C,)
            c1 = s1 / n1.clamp_min(1)
            c0 = (x.sum(dim=0) - s1) / (y.numel() - n1).clamp_min(1)
        diff = x - c0 - y[:, None] * (c1 - c0)  # x_v - c_{y_v}
        return 0.5 * (diff**2).sum(dim=1).mean()


class L_total(nn.Module):
    """Eq. 5 for one variant: ``L_clas + w_seg·L_seg + λ1 L_KL + λ2 L_alig + λ3 L_disc (+ w_mut·L_mutual)``.

    ``outputs`` maps phase (``"ctpa"``, ``"nct"``) to that pathway's :class:`~cpmn.model.PathwayOutput`.
    With two pathways, L_clas, L_seg and L_disc are the sums of both pathways' terms (both are trained on
    the same patch labels and mask); L_KL and L_alig need both pathways and train only Ω2. ``seg_weight``
    (default 1) lets a classification-only baseline switch segmentation off. The λ default to 0, as a
    variant's entry in the config does (the paper's 0.25 / 10 / 0.1 are the ``cpmn`` variant's).
    ``mutual_kl`` (``w_mut``, default 0) weighs :class:`L_mutual`, the DML baseline's two-way KL.
    ``mask`` ``(B, 1, X, Y, Z)``, ``label`` ``(B,)``. Returns the total and a dict of every term
    (detached floats, keys :data:`TERMS`).
    Every term is computed and logged even when its weight is 0 (L_KL and L_alig only with two pathways),
    so that the logs of, say, ``mls`` and ``mls_ifa`` show the same quantities. A term of weight 0 is
    computed under ``torch.no_grad()``: it adds nothing to the gradient, and its backward pass (about a
    quarter of a CPU step for L_disc on the decoder's full-resolution map) is not run.
    """

    def __init__(
        self,
        phases: tuple[str, ...],
        lambda1: float = 0.0,
        lambda2: float = 0.0,
        lambda3: float = 0.0,
        seg_weight: float = 1.0,
        mutual_kl: float = 0.0,
        ifa_alpha: int = 2,
        ifa_beta: int = 2,
        seg_loss: str = _MODEL["seg_loss"],
        ifd_normalize: bool = _MODEL["ifd_normalize"],
    ):
        super().__init__()
        self.phases = tuple(phases)
        dual = set(self.phases) == {"ctpa", "nct"}
        if (lambda1 > 0 or lambda2 > 0 or mutual_kl > 0) and not dual:
            raise ValueError("lambda1, lambda2, mutual_kl (L_KL, L_alig, L_mutual) need both pathways")
        self.lambda1, self.lambda2, self.lambda3 = float(lambda1), float(lambda2), float(lambda3)
        self.seg_weight = float(seg_weight)
        self.mutual_kl = float(mutual_kl)
        self.dual = dual
        self.clas = L_clas()
        if seg_loss not in ("dice_focal", "focal"):
            raise ValueError(f"unknown seg_loss {seg_loss!r}; expected dice_focal or focal")
        self.seg = L_seg(dice=seg_loss == "dice_focal")
        self.kl = L_KL()
        self.alig = L_alig(ifa_alpha, ifa_beta)
        self.disc = L_disc(normalize=ifd_normalize)
        self.mutual = L_mutual()

    def forward(
        self, outputs: Mapping[str, PathwayOutput], mask: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        zero = mask.new_zeros((), dtype=torch.float32)
        t = {k: zero for k in TERMS[:-1]}
        grad = torch.is_grad_enabled()
        weights = {
            "L_seg": self.seg_weight,
            "L_KL": self.lambda1,
            "L_alig": self.lambda2,
            "L_disc": self.lambda3,
            "L_mutual": self.mutual_kl,
        }

        def term(name: str, fn: nn.Module, *args: torch.Tensor) -> torch.Tensor:
            with torch.set_grad_enabled(grad and weights.get(name, 1.0) != 0):
                return fn(*args)

        for ph in self.phases:
            o = outputs[ph]
            t["L_clas"] = t["L_clas"] + term("L_clas", self.clas, o.cls, label)
            if o.seg is not None:  # None: the pathway ran without its decoder (a classification-only variant)
                t["L_seg"] = t["L_seg"] + term("L_seg", self.seg, o.seg, mask)
                t["L_disc"] = t["L_disc"] + term("L_disc", self.disc, o.dec, mask)
            elif self.seg_weight or self.lambda3:
                raise ValueError("L_seg and L_disc need the decoder's outputs; the pathway ran without them")
        if self.dual:
            t["L_KL"] = term("L_KL", self.kl, outputs["ctpa"].cls, outputs["nct"].cls)
            t["L_alig"] = term("L_alig", self.alig, outputs["ctpa"].enc, outputs["nct"].enc)
            t["L_mutual"] = term("L_mutual", self.mutual, outputs["ctpa"].cls, outputs["nct"].cls)
        total = (
            t["L_clas"]
            + self.seg_weight * t["L_seg"]
            + self.lambda1 * t["L_KL"]
            + self.lambda2 * t["L_alig"]
            + self.lambda3 * t["L_disc"]
            + self.mutual_kl * t["L_mutual"]
        )
        terms = {k: float(v.detach()) for k, v in t.items()}
        terms["L_total"] = float(total.detach())
        return total, terms
