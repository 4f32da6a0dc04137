"""The networks of Fig. 1: one pathway (MONAI FlexibleUNet + auxiliary classifier) and the dual pathway.

Tensor axis order is ``(B, C, X, Y, Z)`` throughout (nibabel voxel order for the spatial axes).

A pathway wraps MONAI's :class:`~monai.networks.nets.FlexibleUNet` rather than re-implementing a U-Net: it
runs the FlexibleUNet's own ``encoder``, ``decoder`` and ``segmentation_head`` submodules in turn so that
the intermediate maps the knowledge-transfer losses need are returned alongside the outputs. For
``efficientnet-b0`` the encoder gives 5 maps with 16/24/40/112/320 channels at strides 2, 4, 8, 16, 32;
the decoder's last map has 16 channels at stride 1 (input resolution).

The CPU default uses ``plain-cnn`` (:class:`PlainEncoder`, registered into MONAI's ``FLEXUNET_BACKBONE``):
5 plain conv-GroupNorm-ReLU-maxpool stages with 16/32/64/64/128 channels at strides 2..32, about 4x cheaper
per step than EfficientNet-B0 at 32^3, with a narrower decoder (``decoder_channels``) and the classifier on
the stride-8 map with global max pooling (``cls_level``, ``cls_pool``). ``config/paper.yaml`` sets the
paper's EfficientNet-B0, the default decoder and the classifier on the deepest map with average pooling.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn

#: decoder channels of MONAI FlexibleUNet's default decoder (the last one is the ``dec`` map's channels)
DECODER_CHANNELS = (256, 128, 64, 32, 16)
#: GroupNorm groups (every EfficientNet, plain-cnn and decoder channel count is a multiple of 8)
GROUPS = 8
#: classifier pooling choices
CLS_POOLS = ("avg", "max")


class PlainEncoder(nn.Module, BaseEncoder):
    """A plain 3D CNN encoder for FlexibleUNet (backbone name ``plain-cnn``), for CPU-scale training.

    Five stages, each ``Conv3d(3x3x3) -> GroupNorm(8) -> ReLU -> MaxPool3d(2)``, with 16/32/64/64/128
    channels. Input ``(B, C_in, X, Y, Z)`` (each size a multiple of 32); output: the list of the 5 stage
    maps, ``(B, C_l, X/2^(l+1), Y/2^(l+1), Z/2^(l+1))`` for ``l = 0..4``.

    Why it exists: from scratch, at a CPU budget of a few hundred steps of batch 2-4 on 32^3 patches, the
    EfficientNet-B0 pathway's classifier stayed at chance (L_clas 0.68-0.71); a 4-layer plain CNN learnt
    the same patches. ``pretrained`` is accepted for the FlexibleUNet interface; there are no weights.
    """

    channels = (16, 32, 64, 64, 128)

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, pretrained: bool = False):
        super().__init__()
        if spatial_dims != 3:
            raise ValueError("plain-cnn is 3D only")
        if pretrained:
            raise ValueError("plain-cnn has no pretrained weights")
        stages, c = [], in_channels
        for o in self.channels:
            stages.append(
                nn.Sequential(
                    nn.Conv3d(c, o, 3, padding=1),
                    nn.GroupNorm(math.gcd(GROUPS, o), o),
                    nn.ReLU(inplace=True),
                    nn.MaxPool3d(2),
                )
            )
            c = o
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"spatial_dims": 3, "in_channels": 1, "pretrained": False}]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [cls.channels]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [len(cls.channels)]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return ["plain-cnn"]


if "plain-cnn" not in FLEXUNET_BACKBONE.register_dict:
    FLEXUNET_BACKBONE.register_class(PlainEncoder)


class PathwayOutput(NamedTuple):
    """What one pathway returns for an input ``x`` of shape ``(B, 1, X, Y, Z)``.

    seg: ``(B, 2, X, Y, Z)`` segmentation logits (background, embolus); None with ``decode=False``.
    cls: ``(B,)`` classification logit of the auxiliary classifier (probability = sigmoid).
    enc: ``(B, C_l, X/2^(l+1), Y/2^(l+1), Z/2^(l+1))`` encoder map at level ``l = ifa_level`` (IFA's input;
        spatial sizes round up for odd sizes).
    dec: ``(B, C_dec, X, Y, Z)`` decoder feature map before the segmentation head (IFD's input);
        ``C_dec`` is the last of ``decoder_channels`` (16); None from ``forward(x, decode=False)``.
    """

    seg: torch.Tensor | None
    cls: torch.Tensor
    enc: torch.Tensor
    dec: torch.Tensor | None


def encoder_channels(backbone: str) -> tuple[int, ...]:
    """Channels of the encoder's output maps for a FlexibleUNet backbone, e.g. (16, 24, 40, 112, 320)."""
    if backbone not in FLEXUNET_BACKBONE.register_dict:
        raise ValueError(
            f"unknown backbone {backbone!r}; FlexibleUNet knows {sorted(FLEXUNET_BACKBONE.register_dict)}"
        )
    return tuple(FLEXUNET_BACKBONE.register_dict[backbone]["feature_channel"])


#: normalisation layers a pathway can use
NORMS = ("batch", "group")


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
    """Auxiliary classifier on an encoder map: global pool (average or max) -> FC -> ReLU -> FC.

    Input ``(B, C, x, y, z)``; output ``(B,)`` logit. ``pool="avg"`` is the paper's head; ``"max"`` keeps a
    small embolus's response from being averaged away over the whole map.
    """

    def __init__(self, in_channels: int, hidden: int = 128, pool: str = "avg"):
        super().__init__()
        if pool not in CLS_POOLS:
            raise ValueError(f"unknown classifier pool {pool!r}; expected one of {CLS_POOLS}")
        self.pool = nn.AdaptiveAvgPool3d(1) if pool == "avg" else nn.AdaptiveMaxPool3d(1)
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
        decoder_channels: FlexibleUNet's ``decoder_channels`` (5 values, deepest first; the last is the
            channel count of ``dec``).
        cls_level: 0-based encoder map the classifier reads (``-1`` or 4: the deepest, as in the paper).
        cls_pool: the classifier's global pooling, ``"avg"`` (paper) or ``"max"``.
    """

    def __init__(
        self,
        backbone: str = "efficientnet-b0",
        ifa_level: int = 2,
        cls_hidden: int = 128,
        bn_momentum: float | None = 0.1,
        norm: str = "batch",
        decoder_channels: tuple[int, ...] = DECODER_CHANNELS,
        cls_level: int = -1,
        cls_pool: str = "avg",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        chans = encoder_channels(backbone)
        if not 0 <= ifa_level < len(chans):
            raise ValueError(f"ifa_level {ifa_level} out of range for {backbone} ({len(chans)} encoder maps)")
        if not -len(chans) <= cls_level < len(chans):
            raise ValueError(f"cls_level {cls_level} out of range for {backbone} ({len(chans)} encoder maps)")
        if len(decoder_channels) != len(chans):
            raise ValueError(f"decoder_channels needs {len(chans)} values, got {list(decoder_channels)}")
        self.backbone = backbone
        self.ifa_level = ifa_level
        self.cls_level = cls_level % len(chans)
        self.unet = FlexibleUNet(
            in_channels=1,
            out_channels=2,
            backbone=backbone,
            spatial_dims=3,
            pretrained=False,
            decoder_channels=tuple(int(c) for c in decoder_channels),
        )
        # The classifier's input map as a named module: Grad-CAM hooks it (see cpmn.infer).
        self.cls_input = nn.Identity()
        self.classifier = ClassifierHead(chans[self.cls_level], cls_hidden, cls_pool)
        self.norm = norm
        if norm == "group":
            replace_batchnorm_with_groupnorm(self)
        elif bn_momentum is not None:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = float(bn_momentum)

    #: the Grad-CAM target layer (see cpmn.infer)
    cam_layer = "cls_input"

    def forward(self, x: torch.Tensor, decode: bool = True) -> PathwayOutput:
        """``x`` ``(B, 1, X, Y, Z)`` -> :class:`PathwayOutput` (shapes in its docstring). ``decode=False``
        skips the decoder and the segmentation head (``seg`` and ``dec`` None): a classification-only
        variant (DML) trains no decoder, and on the CPU the decoder is most of a forward pass."""
        feats = self.unet.encoder(x)  # list of 5 maps, strides 2..32
        if not decode:
            return PathwayOutput(seg=None, cls=self._classify(feats), enc=feats[self.ifa_level], dec=None)
        dec = self.unet.decoder(feats, self.unet.skip_connect)  # (B, C_dec, X, Y, Z)
        seg = self.unet.segmentation_head(dec)  # (B, 2, X, Y, Z)
        return PathwayOutput(seg=seg, cls=self._classify(feats), enc=feats[self.ifa_level], dec=dec)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, 1, X, Y, Z)`` -> ``(B,)`` classifier logit, equal to ``forward(x).cls``.

        Runs the encoder and the classifier only: the centre-patch score and Grad-CAM need no decoder, which
        at the CPU default is most of a forward pass's cost.
        """
        return self._classify(self.unet.encoder(x))

    def _classify(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The encoder maps (strides 2..32) -> ``(B,)`` logit of the classifier on map ``cls_level``."""
        return self.classifier(self.cls_input(feats[self.cls_level]))


class DualOutput(NamedTuple):
    """Outputs of the two pathways: ``ctpa`` from Ω1, ``nct`` from Ω2 (each a :class:`PathwayOutput`)."""

    ctpa: PathwayOutput
    nct: PathwayOutput


class DualPathway(nn.Module):
    """Ω1 (``omega1``) on CTPA and Ω2 (``omega2``) on NCT: the same architecture with separate weights."""

    def __init__(self, backbone: str = "efficientnet-b0", ifa_level: int = 2, **kwargs):
        """``kwargs`` go to both :class:`Pathway` s (``cls_hidden``, ``bn_momentum``, ``norm``, ...)."""
        super().__init__()
        self.omega1 = Pathway(backbone, ifa_level, **kwargs)
        self.omega2 = Pathway(backbone, ifa_level, **kwargs)

    def forward(self, ctpa: torch.Tensor, nct: torch.Tensor, decode: bool = True) -> DualOutput:
        """``ctpa``, ``nct`` ``(B, 1, X, Y, Z)`` (CTPA already registered to NCT) -> :class:`DualOutput`
        (``decode``: as in :meth:`Pathway.forward`)."""
        return DualOutput(ctpa=self.omega1(ctpa, decode), nct=self.omega2(nct, decode))
