"""Patient scoring: one home for the score that training validates on and inference reports.

A trained pathway turns one preprocessed phase ``(X, Y, Z)`` into a patient probability in one of
:data:`SCORES` (``infer.score``):

* ``centre`` (the paper): the classifier on the centre patch (:func:`centre_patch_score`);
* ``max``: the maximum of the classifier over the sliding windows (:func:`window_scores`);
* ``seg_volume``: the predicted embolus volume ``V`` (mL) of the segmentation (:func:`predict_mask`, MONAI
  ``sliding_window_inference`` with Gaussian blending) mapped to ``V / (V + seg_volume_half_ml)``
  (:func:`seg_volume_score`).

:func:`patient_score` dispatches on the score; the per-epoch validation of :mod:`cpmn.train`,
:mod:`cpmn.infer` and :mod:`cpmn.predict` all call it, so that a checkpoint is chosen on the score that is
reported. :func:`compare_scores` lists the alternatives written beside the primary score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data.utils import dense_patch_slices, get_valid_patch_size
from monai.inferers import sliding_window_inference
from monai.networks import eval_mode
from monai.transforms import ResizeWithPadOrCrop, SpatialPad
from torch import nn

from cpmn.config import schema_defaults
from cpmn.variants import trains_segmentation

#: patient scores (``infer.score``)
SCORES = ("centre", "max", "seg_volume")
#: the ``infer:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("infer")


class SegmentationLogits(nn.Module):
    """``(B, 1, X, Y, Z) -> (B, 2, X, Y, Z)`` segmentation logits of a pathway (for the sliding window)."""

    def __init__(self, pathway: nn.Module):
        super().__init__()
        self.pathway = pathway

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pathway(x).seg


def window_scores(
    pathway: nn.Module, volume: torch.Tensor, patch: tuple[int, int, int], overlap: float
) -> float:
    """The maximum classifier probability over the sliding windows of ``volume`` ``(1, 1, X, Y, Z)``."""

    vol = SpatialPad(spatial_size=patch)(volume[0])[None]
    size = vol.shape[2:]
    patch = get_valid_patch_size(size, patch)
    interval = [max(1, int(p * (1 - overlap))) for p in patch]
    best = 0.0
    with torch.no_grad():
        for sl in dense_patch_slices(size, patch, interval):
            logit = pathway.classify(vol[(slice(None), slice(None), *sl)])
            best = max(best, float(torch.sigmoid(logit).max()))
    return best


def segment(
    pathway: nn.Module, volume: torch.Tensor, patch: Sequence[int], params: dict[str, Any]
) -> torch.Tensor:
    """The ``(X, Y, Z)`` uint8 arg-max embolus mask of ``volume`` ``(1, 1, X, Y, Z)``: MONAI
    ``sliding_window_inference`` with the patch size, ``overlap`` and ``sw_batch_size`` of ``params`` and
    Gaussian blending."""

    with torch.no_grad():
        logits = sliding_window_inference(
            volume,
            tuple(int(v) for v in patch),
            int(params["sw_batch_size"]),
            SegmentationLogits(pathway),
            overlap=float(params["overlap"]),
            mode="gaussian",
        )
    return logits.argmax(1)[0].to(torch.uint8)


def seg_volume_score(mask: np.ndarray | torch.Tensor, spacing_mm: Sequence[float], half_ml: float) -> float:
    """``V / (V + half_ml)`` for the predicted embolus volume ``V`` (mL) of a binary ``mask`` ``(X, Y, Z)``.

    A monotone map of ``V`` onto [0, 1): AUC sees only the ranking; ``half_ml`` is the volume scored 0.5.
    """
    voxel_ml = float(np.prod(np.asarray(spacing_mm, dtype=float))) / 1000.0
    v = float(torch.as_tensor(mask).sum()) * voxel_ml
    return v / (v + float(half_ml))


@torch.no_grad()
def centre_patch_score(
    pathway: torch.nn.Module,
    volume: np.ndarray | torch.Tensor,
    patch_size: Sequence[int],
    device: str | torch.device = "cpu",
) -> float:
    """The patient score: sigmoid of the classifier on the centre patch of ``volume``.

    ``volume`` ``(X, Y, Z)`` (one phase of the preprocessed npz). The centre window of size ``patch_size``
    is taken with MONAI ``ResizeWithPadOrCrop`` (centred crop, zero ``SpatialPad`` where the volume is
    smaller). The pathway is run in eval mode; its previous mode is restored.
    """
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None]  # (1, X, Y, Z)
    x = ResizeWithPadOrCrop(spatial_size=tuple(int(s) for s in patch_size), mode="constant")(x)
    x = torch.as_tensor(x).as_subclass(torch.Tensor)[None].to(device)  # (1, 1, *P)
    with eval_mode(pathway):
        logit = pathway.classify(x).float()
    return float(torch.sigmoid(logit)[0])


def as_batch(volume: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """One phase ``volume`` ``(X, Y, Z)`` as a float32 batch ``(1, 1, X, Y, Z)`` on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(device)


def predict_mask(
    pathway: nn.Module,
    volume: np.ndarray,
    patch: Sequence[int],
    params: dict[str, Any],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The ``(X, Y, Z)`` uint8 embolus mask of one phase ``volume`` ``(X, Y, Z)`` (:func:`segment`), with the
    pathway in eval mode; its previous mode is restored."""
    with eval_mode(pathway):
        return segment(pathway, as_batch(volume, device), patch, params)


def patient_score(
    pathway: nn.Module,
    volume: np.ndarray,
    spacing_mm: Sequence[float] | None,
    patch: Sequence[int],
    params: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[float, torch.Tensor | None]:
    """The patient probability of ``infer.score`` for one phase ``volume`` ``(X, Y, Z)``, and the predicted
    mask ``(X, Y, Z)`` when the score needed it (``seg_volume``; else None). Used by inference and by the
    per-epoch validation of training, so that the checkpoint is chosen on the score that is reported."""
    p = {**DEFAULTS, **(params or {})}
    if p["score"] not in SCORES:
        raise ValueError(f"unknown infer.score {p['score']!r}; expected one of {SCORES}")
    if p["score"] == "seg_volume" and spacing_mm is None:
        raise ValueError("infer.score seg_volume needs the voxel spacing; the preprocessed volume has none")
    if p["score"] == "centre":
        return float(centre_patch_score(pathway, volume, patch, device)), None
    if p["score"] == "max":
        with eval_mode(pathway):
            return window_scores(
                pathway, as_batch(volume, device), tuple(int(v) for v in patch), float(p["overlap"])
            ), None
    mask = predict_mask(pathway, volume, patch, p, device)
    return seg_volume_score(mask, spacing_mm, float(p["seg_volume_half_ml"])), mask


def compare_scores(params: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """The scores of ``params["compare_scores"]`` written besides ``params["score"]`` for a variant.

    The primary score and repeats are dropped; ``seg_volume`` is dropped for a variant that trains no
    segmentation (``seg_weight`` 0). An unknown score raises ``ValueError``.
    """

    out: list[str] = []
    for s in params.get("compare_scores") or []:
        if s not in SCORES:
            raise ValueError(f"unknown infer.compare_scores entry {s!r}; expected one of {SCORES}")
        if s == params["score"] or s in out:
            continue
        if s == "seg_volume" and not trains_segmentation(entry):
            continue
        out.append(s)
    return out
