"""A variant is a config entry, not a code path: it names its pathways, loss weights and backbone.

``variants:`` in config/config.yaml holds one entry per table row, e.g.::

    cpmn: {pathways: [ctpa, nct], lambda1: 0.25, lambda2: 10.0, lambda3: 0.1}
    nct_cls: {pathways: [nct], seg_weight: 0.0}        # a Table 2 baseline: NCT classification only

Keys: ``pathways`` ([ctpa], [nct] or [ctpa, nct]), ``lambda1``/``lambda2``/``lambda3`` (Eq. 5, default 0),
``seg_weight`` (weight of L_seg, default 1), ``mutual_kl`` (DML's two-way KL, default 0), ``architecture``
(``flexunet``, the paper's; ``nnunet`` or ``swinunetr``, the Table 2 baselines of cpmn/baselines.py) and
``backbone`` (default ``model.backbone``; flexunet only).
:func:`build_variant` turns an entry into a model and its loss; :func:`load_for_inference` reads back the
pathway that inference uses: Ω2 on NCT for dual variants, the single pathway and its phase otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpmn.baselines import NNUNetPathway, SwinUNETRPathway
from cpmn.config import schema_defaults, variant_defaults
from cpmn.losses import L_total
from cpmn.model import DualPathway, Pathway, PathwayOutput

#: the ``model:`` section's defaults, from the config schema (their one source)
MODEL_DEFAULTS: dict[str, Any] = schema_defaults("model")
#: the defaults of one ``variants:`` entry, from the config schema
VARIANT_DEFAULTS: dict[str, Any] = variant_defaults()
#: the patch size and grid spacing that nnU-Net's planner reads when the config gives none
PATCH_SIZE = schema_defaults("patches")["size"]
SPACING = schema_defaults("preprocess")["spacing"]
PHASES = ("ctpa", "nct")
ARCHITECTURES = ("flexunet", "nnunet", "swinunetr")


def variant_entry(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The normalised entry of variant ``name`` from the config's ``variants`` section (defaults filled)."""
    variants = cfg.get("variants") or {}
    if name not in variants:
        raise KeyError(f"unknown variant {name!r}; config defines {sorted(variants)}")
    raw = {**VARIANT_DEFAULTS, **variants[name]}
    model_cfg = {**MODEL_DEFAULTS, **(cfg.get("model") or {})}
    pathways = list(raw.get("pathways") or [])
    if not pathways or any(p not in PHASES for p in pathways) or len(set(pathways)) != len(pathways):
        raise ValueError(f"variant {name}: pathways must be [ctpa], [nct] or [ctpa, nct], got {pathways}")
    arch = str(raw["architecture"])
    if arch not in ARCHITECTURES:
        raise ValueError(f"variant {name}: unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    if arch != "flexunet" and len(pathways) != 1:
        raise ValueError(f"variant {name}: architecture {arch} is a single-pathway baseline")
    entry = {
        "pathways": sorted(pathways, key=PHASES.index),
        "lambda1": float(raw["lambda1"]),
        "lambda2": float(raw["lambda2"]),
        "lambda3": float(raw["lambda3"]),
        "seg_weight": float(raw["seg_weight"]),
        "backbone": str(raw.get("backbone", model_cfg["backbone"])),
        "score": str(raw["score"]) if raw.get("score") else None,
    }
    if float(raw["mutual_kl"]) > 0:
        entry["mutual_kl"] = float(raw["mutual_kl"])
    if arch != "flexunet":
        entry["architecture"] = arch
    if arch == "nnunet":  # nnU-Net's planner sets the topology from the patch and the grid's spacing
        entry["patch_size"] = [int(v) for v in (cfg.get("patches") or {}).get("size", PATCH_SIZE)]
        entry["spacing"] = [float(v) for v in (cfg.get("preprocess") or {}).get("spacing", SPACING)]
    return entry


def trains_segmentation(entry: Mapping[str, Any]) -> bool:
    """Whether a variant trains its segmentation head (``seg_weight`` > 0), i.e. can be scored by its mask."""
    return float(entry.get("seg_weight", VARIANT_DEFAULTS["seg_weight"])) > 0.0


def variant_score(entry: Mapping[str, Any], infer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``infer_cfg`` with the variant's own ``score`` (if it sets one) in place of ``infer.score``.

    A variant without segmentation (``seg_weight: 0``) cannot be scored by its mask volume: that fails here
    with the variant's name rather than giving every patient a score from an untrained head.
    """
    out = dict(infer_cfg)
    if entry.get("score"):
        out["score"] = entry["score"]
    if out.get("score") == "seg_volume" and not trains_segmentation(entry):
        raise ValueError(
            "a variant with seg_weight 0 trains no segmentation, so infer.score seg_volume cannot score it;"
            " give the variant its own score (e.g. score: centre)"
        )
    return out


def inference_phase(entry: Mapping[str, Any]) -> str:
    """The phase the variant is evaluated on: NCT whenever it has an NCT pathway, else CTPA."""
    return "nct" if "nct" in entry["pathways"] else entry["pathways"][0]


class VariantModel(nn.Module):
    """The network of one variant: a single :class:`Pathway` or a :class:`DualPathway` (Ω1 CTPA, Ω2 NCT).

    ``forward(batch)`` takes the batch dict (``ctpa`` and/or ``nct`` ``(B, 1, X, Y, Z)``) and returns
    ``{phase: PathwayOutput}`` for the variant's phases.
    """

    def __init__(
        self,
        phases: list[str],
        backbone: str,
        ifa_level: int,
        bn_momentum: float | None = 0.1,
        norm: str = "batch",
        net: nn.Module | None = None,
        decode: bool = True,
        **pathway_kwargs: Any,
    ):
        """``pathway_kwargs`` go to :class:`Pathway` (``decoder_channels``, ``cls_level``, ``cls_pool``);
        ``net`` (one phase only) is a ready single pathway of another architecture (cpmn/baselines.py);
        ``decode=False`` (a variant that trains neither L_seg nor L_disc) skips the decoders in training."""
        super().__init__()
        self.phases = tuple(phases)
        self.decode = bool(decode)
        kw = dict(bn_momentum=bn_momentum, norm=norm, **pathway_kwargs)
        if net is not None:
            if len(self.phases) != 1:
                raise ValueError("a ready network is a single pathway: give one phase")
            self.net = net
        elif len(self.phases) == 2:
            self.net = DualPathway(backbone, ifa_level, **kw)
        else:
            self.net = Pathway(backbone, ifa_level, **kw)

    def pathway(self, phase: str) -> Pathway:
        """The :class:`Pathway` that sees ``phase``."""
        if phase not in self.phases:
            raise KeyError(f"this variant has no {phase} pathway (phases {self.phases})")
        if isinstance(self.net, DualPathway):
            return self.net.omega1 if phase == "ctpa" else self.net.omega2
        return self.net

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, PathwayOutput]:
        if isinstance(self.net, DualPathway):
            out = self.net(batch["ctpa"], batch["nct"], self.decode)
            return {"ctpa": out.ctpa, "nct": out.nct}
        if not self.decode and isinstance(self.net, Pathway):
            return {self.phases[0]: self.net(batch[self.phases[0]], decode=False)}
        return {self.phases[0]: self.net(batch[self.phases[0]])}


def baseline_spec(
    entry: Mapping[str, Any], model_cfg: Mapping[str, Any]
) -> tuple[type[nn.Module], dict] | None:
    """``(class, kwargs)`` of a Table 2 baseline's network (cpmn/baselines.py), None for the paper's
    FlexibleUNet pathway; what :func:`build_model` builds and a bundle's ``network_def`` names."""
    m = {**MODEL_DEFAULTS, **model_cfg}
    head = {
        "ifa_level": int(m["ifa_level"]),
        "cls_level": int(m["cls_level"]),
        "cls_pool": str(m["cls_pool"]),
    }
    arch = entry.get("architecture", VARIANT_DEFAULTS["architecture"])
    if arch == "nnunet":
        size = [int(v) for v in entry["patch_size"]]
        return NNUNetPathway, {"patch_size": size, "spacing": [float(v) for v in entry["spacing"]], **head}
    if arch == "swinunetr":
        return SwinUNETRPathway, {"feature_size": int(m["swin_feature_size"]), "norm": str(m["norm"]), **head}
    return None


def build_model(entry: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> VariantModel:
    """The :class:`VariantModel` of a normalised variant entry and the ``model:`` section."""
    m = {**MODEL_DEFAULTS, **model_cfg}
    spec = baseline_spec(entry, m)
    net = spec[0](**spec[1]) if spec else None
    return VariantModel(
        list(entry["pathways"]),
        entry["backbone"],
        int(m["ifa_level"]),
        float(m["bn_momentum"]),
        str(m["norm"]),
        net=net,
        decode=trains_segmentation(entry) or float(entry["lambda3"]) > 0,
        decoder_channels=tuple(int(c) for c in m["decoder_channels"]),
        cls_level=int(m["cls_level"]),
        cls_pool=str(m["cls_pool"]),
    )


def build_loss(entry: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> L_total:
    """The Eq. 5 loss (:class:`~cpmn.losses.L_total`) of a normalised variant entry."""
    m = {**MODEL_DEFAULTS, **model_cfg}
    return L_total(
        tuple(entry["pathways"]),
        lambda1=entry["lambda1"],
        lambda2=entry["lambda2"],
        lambda3=entry["lambda3"],
        seg_weight=entry["seg_weight"],
        mutual_kl=float(entry.get("mutual_kl", VARIANT_DEFAULTS["mutual_kl"])),
        ifa_alpha=int(m["ifa_alpha"]),
        ifa_beta=int(m["ifa_beta"]),
        seg_loss=str(m["seg_loss"]),
        ifd_normalize=bool(m["ifd_normalize"]),
    )


def build_variant(name: str, cfg: Mapping[str, Any]) -> tuple[VariantModel, L_total]:
    """``(model, loss_fn)`` of variant ``name``; ``cfg`` holds the ``model`` and ``variants`` sections.

    ``loss_fn(model(batch), batch["mask"], batch["label"]) -> (total, terms)``.
    """
    entry = variant_entry(name, cfg)
    model_cfg = cfg.get("model") or {}
    return build_model(entry, model_cfg), build_loss(entry, model_cfg)


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[VariantModel, dict]:
    """Rebuild the whole :class:`VariantModel` from ``model.pt`` or ``last.pt``: (model, checkpoint)."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = build_model(ckpt["variant"], ckpt["model_cfg"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def load_for_inference(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Pathway, str, dict[str, Any]]:
    """``(pathway, phase, entry)`` from a trained ``model.pt``: Ω2 and ``"nct"`` for dual variants, else the
    single pathway and its phase, and the variant entry it was trained with. The pathway is in eval mode on
    ``device``; ``pathway(x)`` with ``x`` ``(B, 1, X, Y, Z)`` returns a :class:`~cpmn.model.PathwayOutput`."""
    model, ckpt = load_checkpoint_model(path, device)
    phase = inference_phase(ckpt["variant"])
    return model.pathway(phase), phase, ckpt["variant"]
