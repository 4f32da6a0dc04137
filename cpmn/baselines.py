"""The Table 2 baselines' networks: nnU-Net's U-Net and MONAI's SwinUNETR, each with the pathway's classifier.

Both have :class:`~cpmn.model.Pathway`'s interface, so the same trainer, inference, Grad-CAM and evaluation
run them: ``forward(x)`` with ``x`` ``(B, 1, X, Y, Z)`` returns a :class:`~cpmn.model.PathwayOutput`
(``seg`` ``(B, 2, X, Y, Z)``, ``cls`` ``(B,)``, ``enc`` the encoder map at stride ``2^(ifa_level+1)``, ``dec``
the decoder's last feature map before the segmentation layer), ``classify(x)`` runs the encoder and the
classifier only, and the classifier's input passes the ``cls_input`` module that Grad-CAM hooks.

- :class:`NNUNetPathway` ("nnU-Net-Joint"): ``PlainConvUNet`` from nnU-Net's own
  ``dynamic-network-architectures`` package, configured by :func:`nnunet_plan` as nnU-Net v2's
  ``ExperimentPlanner`` configures its ``3d_fullres`` network for a patch size and spacing.
- :class:`SwinUNETRPathway` ("SwinUNETR-Joint"): MONAI's ``SwinUNETR`` (no maintained 3D nnFormer or
  Mask2Former can be installed; see docs/method-choices.md).

The classifier (:class:`~cpmn.model.ClassifierHead`, the same head as the pathway's) reads the encoder map
whose stride is the pathway's classifier stride ``2^(cls_level+1)`` (stride 8 at the CPU default, 32 in the
paper), or the deepest map where the network has no map that coarse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from monai.networks.nets import SwinUNETR
from torch import nn

from cpmn.model import GROUPS, ClassifierHead, PathwayOutput

#: nnU-Net v2's planner constants for a 3d_fullres U-Net (ExperimentPlanner: UNet_base_num_features,
#: UNet_max_features_3d, UNet_featuremap_min_edge_length, 2 convolutions per stage in encoder and decoder)
NNUNET_BASE_FEATURES = 32
NNUNET_MAX_FEATURES = 320
NNUNET_MIN_FEATURE_MAP = 4
NNUNET_CONVS_PER_STAGE = 2


def nnunet_plan(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    min_feature_map_size: int = NNUNET_MIN_FEATURE_MAP,
    max_numpool: int = 999,
) -> dict[str, list]:
    """nnU-Net v2's network topology for a patch and spacing (``get_pool_and_conv_props``).

    Each round pools (stride 2) every axis that is still at least ``2·min_feature_map_size`` long and whose
    current spacing is within a factor 2 of the finest; an axis's kernel becomes 3 once its spacing is within
    a factor 2 of the finest (1 before: an anisotropic axis is first convolved in-plane only). The
    bottleneck always has 3³ kernels. Features double per stage from 32 up to 320.

    Returns ``{"strides": [[1, 1, 1], [2, 2, 2], ...], "kernel_sizes": [...], "features": [...]}`` with
    one entry per stage. Ported from nnunetv2's ``network_topology.py`` (Isensee et al., Nat. Methods 2021):
    nnunetv2 itself cannot be installed beside this lock (it pins its own data-loading stack).
    """
    dim = len(patch_size)
    if len(spacing) != dim:
        raise ValueError(f"patch size {list(patch_size)} and spacing {list(spacing)} differ in length")
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(s) for s in patch_size]
    strides = [[1] * dim]
    kernels: list[list[int]] = []
    num_pool = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if cur_size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        finest = min(cur_spacing[i] for i in valid)
        valid = [i for i in valid if cur_spacing[i] / finest < 2 and num_pool[i] < max_numpool]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * min_feature_map_size:
            break
        if not valid:
            break
        for d in range(dim):
            if kernel[d] != 3 and cur_spacing[d] / min(cur_spacing) < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            num_pool[v] += 1
            cur_spacing[v] *= 2
            cur_size[v] = math.ceil(cur_size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    features = [min(NNUNET_BASE_FEATURES * 2**i, NNUNET_MAX_FEATURES) for i in range(len(strides))]
    return {"strides": strides, "kernel_sizes": kernels, "features": features}


def _stage_for_stride(strides: Sequence[int], target: int) -> int:
    """Index of the map whose (in-plane) stride is ``target``, or of the coarsest map finer than it."""
    ok = [i for i, s in enumerate(strides) if s <= target]
    return max(ok, key=lambda i: strides[i]) if ok else 0


class NNUNetPathway(nn.Module):
    """nnU-Net's ``PlainConvUNet`` (2 classes, no deep supervision) plus the pathway's classifier.

    Args:
        patch_size: the training patch ``(X, Y, Z)``, which with ``spacing`` (mm) fixes the topology
            (:func:`nnunet_plan`).
        ifa_level, cls_level: as in :class:`~cpmn.model.Pathway`: the maps at strides ``2^(level+1)``.
        cls_pool, cls_hidden: the classifier's pooling and hidden width.

    nnU-Net's conv blocks: ``Conv3d(bias) -> InstanceNorm3d(eps 1e-5, affine) -> LeakyReLU(0.01)``, two per
    stage; He initialisation (``InitWeights_He(1e-2)``). Deep supervision is off: every row of the tables
    is trained with the same L_seg on the full-resolution output.
    """

    cam_layer = "cls_input"

    def __init__(
        self,
        patch_size: Sequence[int],
        spacing: Sequence[float],
        ifa_level: int = 2,
        cls_level: int = -1,
        cls_pool: str = "avg",
        cls_hidden: int = 128,
    ):
        super().__init__()
        self.plan = nnunet_plan(patch_size, spacing)
        n = len(self.plan["strides"])
        self.unet = PlainConvUNet(
            input_channels=1,
            n_stages=n,
            features_per_stage=self.plan["features"],
            conv_op=nn.Conv3d,
            kernel_sizes=self.plan["kernel_sizes"],
            strides=self.plan["strides"],
            n_conv_per_stage=NNUNET_CONVS_PER_STAGE,
            num_classes=2,
            n_conv_per_stage_decoder=NNUNET_CONVS_PER_STAGE,
            conv_bias=True,
            norm_op=nn.InstanceNorm3d,
            norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU,
            nonlin_kwargs={"inplace": True},
            deep_supervision=False,
        )
        self.unet.apply(InitWeights_He(1e-2))
        # cumulative in-plane stride of each stage's output (stage 0: 1)
        self.strides = [math.prod(s[0] for s in self.plan["strides"][: i + 1]) for i in range(n)]
        self.ifa_stage = _stage_for_stride(self.strides, 2 ** (ifa_level % 5 + 1))
        self.cls_stage = _stage_for_stride(self.strides, 2 ** (cls_level % 5 + 1))
        self.cls_input = nn.Identity()
        self.classifier = ClassifierHead(self.plan["features"][self.cls_stage], cls_hidden, cls_pool)

    def forward(self, x: torch.Tensor) -> PathwayOutput:
        """``x`` ``(B, 1, X, Y, Z)`` (each size divisible by the plan's total stride) -> PathwayOutput."""
        skips = self.unet.encoder(x)
        dec = self.unet.decoder
        low = skips[-1]
        for s in range(len(dec.stages)):
            low = dec.stages[s](torch.cat((dec.transpconvs[s](low), skips[-(s + 2)]), 1))
        seg = dec.seg_layers[-1](low)
        cls = self.classifier(self.cls_input(skips[self.cls_stage]))
        return PathwayOutput(seg=seg, cls=cls, enc=skips[self.ifa_stage], dec=low)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` -> ``(B,)`` logit: the encoder and the classifier only (equal to ``forward(x).cls``)."""
        return self.classifier(self.cls_input(self.unet.encoder(x)[self.cls_stage]))


class SwinUNETRPathway(nn.Module):
    """MONAI's ``SwinUNETR`` (2 classes, 3D) plus the pathway's classifier.

    The maps by stride: 1 ``encoder1`` (F), 2 ``encoder2`` (F), 4 ``encoder3`` (2F), 8 ``encoder4`` (4F),
    16 the Swin stage 3 output (8F), 32 ``encoder10`` (16F, the bottleneck), with ``F = feature_size``.
    The decoder's last map (F channels, stride 1) is ``dec``. Each patch size must be divisible by 32.

    ``norm`` is the pathway's ``model.norm`` in SwinUNETR's conv blocks: ``"group"`` (GroupNorm of 8
    groups) or ``"batch"``; SwinUNETR's own default, instance norm, is undefined in training on the 1³
    bottleneck of a 32³ patch.
    """

    cam_layer = "cls_input"
    STRIDES = (1, 2, 4, 8, 16, 32)

    def __init__(
        self,
        feature_size: int = 24,
        norm: str = "group",
        ifa_level: int = 2,
        cls_level: int = -1,
        cls_pool: str = "avg",
        cls_hidden: int = 128,
    ):
        super().__init__()
        norm_name = ("group", {"num_groups": GROUPS}) if norm == "group" else norm
        self.net = SwinUNETR(
            in_channels=1, out_channels=2, feature_size=feature_size, norm_name=norm_name, spatial_dims=3
        )
        f = feature_size
        self.channels = (f, f, 2 * f, 4 * f, 8 * f, 16 * f)
        self.ifa_stage = _stage_for_stride(self.STRIDES, 2 ** (ifa_level % 5 + 1))
        self.cls_stage = _stage_for_stride(self.STRIDES, 2 ** (cls_level % 5 + 1))
        self.cls_input = nn.Identity()
        self.classifier = ClassifierHead(self.channels[self.cls_stage], cls_hidden, cls_pool)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six maps at strides 1..32 (see the class docstring)."""
        n = self.net
        h = n.swinViT(x, n.normalize)
        return [n.encoder1(x), n.encoder2(h[0]), n.encoder3(h[1]), n.encoder4(h[2]), h[3], n.encoder10(h[4])]

    def forward(self, x: torch.Tensor) -> PathwayOutput:
        """``x`` ``(B, 1, X, Y, Z)`` -> PathwayOutput."""
        n = self.net
        e = self._encode(x)
        d = n.decoder5(e[5], e[4])
        d = n.decoder4(d, e[3])
        d = n.decoder3(d, e[2])
        d = n.decoder2(d, e[1])
        dec = n.decoder1(d, e[0])
        cls = self.classifier(self.cls_input(e[self.cls_stage]))
        return PathwayOutput(seg=n.out(dec), cls=cls, enc=e[self.ifa_stage], dec=dec)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` -> ``(B,)`` logit (equal to ``forward(x).cls``)."""
        return self.classifier(self.cls_input(self._encode(x)[self.cls_stage]))
