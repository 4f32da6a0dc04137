"""The networks of Fig. 1: one pathway (MONAI FlexibleUNet + auxiliary classifier) and the dual pathway.

Tensor axis order is ``(B, C, X, Y, Z)`` throughout (nibabel voxel order for the spatial axes).

A pathway wraps MONAI's :class:`~monai.networks.nets.FlexibleUNet` rather than re-implementing a U-Net: it
runs the FlexibleUNet's own ``encoder``, ``decoder`` and ``segmentation_head`` submodules in turn so that
the intermediate maps the knowledge-transfer losses need are returned alongside the outputs. For
``efficientnet-b0`` the encoder gives 5 maps with 16/24/40/112/320 channels at strides 2, 4, 8, 16, 32;
the decoder's last map has 16 channels at stride 1 (input resolution).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn

#: decoder channels of MONAI FlexibleUNet's default decoder (the last one is the ``dec`` map's channels)
DECODER_CHANNELS = (256, 128, 64, 32, 16)


class PathwayOutput(NamedTuple):
    """What one pathway returns for an input ``x`` of shape ``(B, 1, X, Y, Z)``.

    seg: ``(B, 2, X, Y, Z)`` segmentation logits (background, embolus).
    cls: ``(B,)`` classification logit of the auxiliary classifier (probability = sigmoid).
    enc: ``(B, C_l, X/2^(l+1), Y/2^(l+1), Z/2^(l+1))`` encoder map at level ``l = ifa_level`` (IFA's input;
        spatial sizes round up for odd sizes).
    dec: ``(B, 16, X, Y, Z)`` decoder feature map before the segmentation head (IFD's input).
    """

    seg: torch.Tensor
    cls: torch.Tensor
    enc: torch.Tensor
    dec: torch.Tensor


def encoder_channels(backbone: str) -> tuple[int, ...]:
    """Channels of the encoder's output maps for a FlexibleUNet backbone, e.g. (16, 24, 40, 112, 320)."""
    if backbone not in FLEXUNET_BACKBONE.register_dict:
        raise ValueError(
            f"unknown backbone {backbone!r}; FlexibleUNet knows {sorted(FLEXUNET_BACKBONE.register_dict)}"
        )
    return tuple(FLEXUNET_BACKBONE.register_dict[backbone]["feature_channel"])


#: normalisation layers a pathway can use
NORMS = ("batch", "group")
#: GroupNorm groups (every EfficientNet and decoder channel count is a multiple of 8)
GROUPS = 8


def replace_batchnorm_with_groupnorm(module: nn.Module, groups: int = GROUPS) -> None:
    """Swap every ``BatchNorm`` inside ``module`` for ``GroupNorm(gcd(groups, C), C)`` (affine), in place.

    Why: with batch 2 of a 32^3 patch the deepest (stride-32) map is 1x1x1, so BatchNorm there normalises
    over just 2 numbers per channel, and its train-mode output carries only the sign of the difference
    between the two samples, while eval mode uses running statistics; the classifier then learns on
    features it never sees at test time. GroupNorm normalises each sample over its own channels and
    positions: no batch dependence and no train/eval difference (the usual choice for 3D medical
    segmentation with small batches).
    """
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            c = child.num_features
            setattr(module, name, nn.GroupNorm(math.gcd(groups, c), c, eps=child.eps, affine=True))
        else:
            replace_batchnorm_with_groupnorm(child, groups)


class ClassifierHead(nn.Module):
    """Auxiliary classifier on the deepest encoder map: global average pool -> FC -> ReLU -> FC.

    Input ``(B, C, x, y, z)``; output ``(B,)`` logit.
    """

    def __init__(self, in_channels: int, hidden: int = 128):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = self.pool(feat).flatten(1)  # (B, C)
        return self.fc2(self.act(self.fc1(x))).squeeze(1)  # (B,)


class Pathway(nn.Module):
    """One pathway (Ω): FlexibleUNet(in=1, out=2, 3D, no pretrained weights) plus the auxiliary classifier.

    Args:
        backbone: FlexibleUNet backbone name (``efficientnet-b0`` in the paper).
        ifa_level: 0-based index of the encoder map returned as ``enc`` (for IFA).
        cls_hidden: width of the classifier's hidden FC layer.
        bn_momentum: momentum of every BatchNorm's running statistics. MONAI's EfficientNet uses 0.01 (the
            TensorFlow 0.99 decay), which needs thousands of steps before the running statistics match the
            activations; with fewer (a short CPU schedule of ~50 steps) eval-mode features collapse to a
            constant and every patient gets the same score. 0.1 (PyTorch's default) converges within ~50
            steps.
        norm: ``"batch"`` keeps FlexibleUNet's BatchNorm; ``"group"`` replaces every BatchNorm with a
            GroupNorm of :data:`GROUPS` groups (see :func:`replace_batchnorm_with_groupnorm`).
    """

    def __init__(
        self,
        backbone: str = "efficientnet-b0",
        ifa_level: int = 2,
        cls_hidden: int = 128,
        bn_momentum: float | None = 0.1,
        norm: str = "batch",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        chans = encoder_channels(backbone)
        if not 0 <= ifa_level < len(chans):
            raise ValueError(f"ifa_level {ifa_level} out of range for {backbone} ({len(chans)} encoder maps)")
        self.backbone = backbone
        self.ifa_level = ifa_level
        self.unet = FlexibleUNet(
            in_channels=1, out_channels=2, backbone=backbone, spatial_dims=3, pretrained=False
        )
        # The deepest encoder map (stride 32) as a named module: Grad-CAM hooks the classifier input here.
        self.deepest = nn.Identity()
        self.classifier = ClassifierHead(chans[-1], cls_hidden)
        self.norm = norm
        if norm == "group":
            replace_batchnorm_with_groupnorm(self)
        elif bn_momentum is not None:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = float(bn_momentum)

    #: the Grad-CAM target layer (see cpmn.infer)
    cam_layer = "deepest"

    def forward(self, x: torch.Tensor) -> PathwayOutput:
        """``x`` ``(B, 1, X, Y, Z)`` -> :class:`PathwayOutput` (shapes in its docstring)."""
        feats = self.unet.encoder(x)  # list of 5 maps, strides 2..32
        dec = self.unet.decoder(feats, self.unet.skip_connect)  # (B, 16, X, Y, Z)
        seg = self.unet.segmentation_head(dec)  # (B, 2, X, Y, Z)
        cls = self.classifier(self.deepest(feats[-1]))  # (B,)
        return PathwayOutput(seg=seg, cls=cls, enc=feats[self.ifa_level], dec=dec)


class DualOutput(NamedTuple):
    """Outputs of the two pathways: ``ctpa`` from Ω1, ``nct`` from Ω2 (each a :class:`PathwayOutput`)."""

    ctpa: PathwayOutput
    nct: PathwayOutput


class DualPathway(nn.Module):
    """Ω1 (``omega1``) on CTPA and Ω2 (``omega2``) on NCT: the same architecture with separate weights."""

    def __init__(
        self,
        backbone: str = "efficientnet-b0",
        ifa_level: int = 2,
        cls_hidden: int = 128,
        bn_momentum: float | None = 0.1,
        norm: str = "batch",
    ):
        super().__init__()
        self.omega1 = Pathway(backbone, ifa_level, cls_hidden, bn_momentum, norm)
        self.omega2 = Pathway(backbone, ifa_level, cls_hidden, bn_momentum, norm)

    def forward(self, ctpa: torch.Tensor, nct: torch.Tensor) -> DualOutput:
        """``ctpa``, ``nct`` ``(B, 1, X, Y, Z)`` (CTPA already registered to NCT) -> :class:`DualOutput`."""
        return DualOutput(ctpa=self.omega1(ctpa), nct=self.omega2(nct))
