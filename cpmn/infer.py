"""Inference: patient probability, predicted embolus mask and Grad-CAM for one split of one variant.

For each patient of the split the stored (preprocessed) volume of the variant's phase — NCT, or CTPA for the
``ctpa`` variant — goes through the trained pathway:

* the patient probability comes from the classifier on the centre patch (``infer.score: centre``, as in the
  paper), from the maximum of the classifier over the sliding windows (``infer.score: max``), or from the
  segmentation: the predicted embolus volume ``V`` (mL) mapped to ``V / (V + seg_volume_half_ml)``
  (``infer.score: seg_volume``; see :func:`cpmn.scoring.seg_volume_score`, where every score lives);
* the embolus mask comes from MONAI ``sliding_window_inference`` over the whole volume with the patch size P
  (Gaussian blending), arg-max over the two classes, resampled back onto the original NCT grid;
* the CAM comes from MONAI ``GradCAM`` on the classification logit, at the encoder map the classifier reads
  (``model.cls_level``), over the same sliding windows, written as NIfTI on the original NCT grid and as a
  PNG (:func:`cpmn.evaluate.figures.cam_overview`: the axial slice with the most reference voxels, CAM
  overlay, predicted mask in red and reference in green).

Masks and CAMs are written for the splits in ``infer.mask_splits`` / ``infer.cam_splits`` (default: test,
which is where Dice and Fig. 2b are measured); with ``infer.score: centre`` or ``max`` the validation split
then costs only its classifier passes. A variant may set its own ``score`` (e.g. a classification-only
baseline, ``seg_weight: 0``, needs ``score: centre``).
Every score of ``infer.compare_scores`` other than ``infer.score`` is written too, as a ``prob_<score>``
column, so that one trained model is scored both ways (``cpmn evaluate`` tabulates them: see
:func:`cpmn.evaluate.metrics.score_comparison`); the ``score`` column names the score of ``prob``.
Grad-CAM needs a backward pass per window; with ``infer.cam_positives_only`` (default) it is computed for the
PE-positive patients only, which is what Fig. 2b shows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.inferers import sliding_window_inference
from monai.networks import eval_mode
from monai.visualize import GradCAM
from torch import nn
from tqdm import tqdm

from cpmn.config import add_config_arguments, resolve
from cpmn.data.patches import DEFAULT_PATCH
from cpmn.data.preprocess import read_preprocessed, to_original_grid
from cpmn.data.split import read_splits
from cpmn.errors import InputError, atomic_path, report
from cpmn.evaluate.figures import cam_overview
from cpmn.scoring import DEFAULTS, as_batch, compare_scores, patient_score, seg_volume_score, segment
from cpmn.variants import load_for_inference, trains_segmentation, variant_score

#: arrays ``cpmn infer`` reads from a preprocessed file besides the phase (label; grid for the mask and CAM)
NPZ_KEYS = ("label", "nct", "affine", "orig_affine", "orig_shape")


class ClassifierLogit(nn.Module):
    """``(B, 1, X, Y, Z) -> (B, 1)`` classification logit of a pathway (what Grad-CAM differentiates)."""

    def __init__(self, pathway: nn.Module):
        super().__init__()
        self.pathway = pathway

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pathway.classify(x).reshape(-1, 1)


def cam_target_layer(head: ClassifierLogit) -> str:
    """The name of the last convolutional stage of the encoder, the Grad-CAM target.

    The encoder map the classifier reads (``cls_level``: the deepest, 320 channels at stride 32, for the
    paper's EfficientNet-B0) is the pathway's ``cam_layer``, so its gradient-weighted activations are the
    class activation map of the classifier.
    """
    name = getattr(head.pathway, "cam_layer", None)
    if name:
        return f"pathway.{name}"
    last = None
    for n, m in head.named_modules():
        if "encoder" in n and isinstance(m, nn.Conv3d):
            last = n
    if last is None:
        raise ValueError("no 3D convolution found in the pathway's encoder for Grad-CAM")
    return last


def min_max_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Each map of ``x`` ``(B, 1, *spatial)`` scaled linearly so that its minimum is 0 and its maximum 1 (a
    constant map becomes 0). MONAI's default CAM post-processing maps (min, max) to (1, 0), which flips the
    map: the most activated voxel would read 0."""
    lo = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True)
    hi = x.amax(dim=tuple(range(1, x.ndim)), keepdim=True)
    span = hi - lo
    return torch.where(
        span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x)
    )


def grad_cam(
    pathway: nn.Module,
    volume: np.ndarray,
    patch: Sequence[int],
    params: dict[str, Any],
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """The ``(X, Y, Z)`` float32 class activation map of one phase ``volume`` ``(X, Y, Z)``: MONAI
    ``GradCAM`` on the classification logit at :func:`cam_target_layer`, each window's map scaled to [0, 1]
    (:func:`min_max_to_unit`: 1 at the most activated voxel), blended over the sliding windows of ``patch``
    (``params["overlap"]``, Gaussian weights), with the pathway in eval mode."""

    cls_logit = ClassifierLogit(pathway)
    cam = GradCAM(cls_logit, target_layers=cam_target_layer(cls_logit), postprocessing=min_max_to_unit)
    with eval_mode(pathway), torch.enable_grad():  # eval_mode also turns gradients off; the CAM needs them
        heat = sliding_window_inference(
            as_batch(volume, device),
            tuple(int(v) for v in patch),
            1,
            cam,
            overlap=float(params["overlap"]),
            mode="gaussian",
        )
    return heat[0, 0].detach().cpu().numpy().astype(np.float32)


def load_inference_npz(pid: str, preprocessed_dir: str | os.PathLike, phase: str) -> dict[str, np.ndarray]:
    """The arrays of one preprocessed file that inference needs: ``phase`` ``(X, Y, Z)`` float32, ``label``,
    the grids (``nct``, ``affine``, ``orig_affine``, ``orig_shape``) and, where stored, ``spacing``,
    ``mask`` and ``truth_mask`` (the reference drawn in the CAM PNG).

    Raises:
        InputError: the file is missing, unreadable, lacks an array, or the phase is not a 3D volume of the
            stored grid's shape (naming the patient and the file).
    """

    path = Path(preprocessed_dir) / f"{pid}.npz"
    out = read_preprocessed(pid, path, (phase, *NPZ_KEYS), ("spacing", "mask", "truth_mask"))
    out[phase] = np.ascontiguousarray(out[phase], dtype=np.float32)
    if out[phase].ndim != 3 or out[phase].shape != out["nct"].shape:
        raise InputError(pid, path, f"{phase} must be a 3D volume of the stored grid {out['nct'].shape}")
    if int(out["label"]) not in (0, 1):
        raise InputError(pid, path, f"label must be 0 or 1, got {out['label']}")
    return out


def infer_split(
    model_path: str | os.PathLike,
    splits_tsv: str | os.PathLike,
    split: str,
    preprocessed_dir: str | os.PathLike,
    out_tsv: str | os.PathLike,
    params: dict[str, Any] | None = None,
    patch_size: tuple[int, int, int] = DEFAULT_PATCH,
    nifti_dir: str | os.PathLike | None = None,
    ref_template: str | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """Predict every patient of ``split`` and write the predictions TSV (docs/contracts.md).

    Returns the predictions table: ``patient_id, split, label, prob, score`` (the name of ``prob``'s
    score), a ``prob_<score>`` column per score of :func:`cpmn.scoring.compare_scores` and, where written, the
    ``mask``, ``cam``, ``image`` and ``ref_mask`` paths (relative to the TSV's folder).
    """

    p = {**DEFAULTS, **(params or {})}
    if ref_template:
        try:
            ref_template.format(patient="P")
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(None, ref_template, f"--ref-template: bad placeholder ({err!r})") from err
        if "{patient}" not in ref_template:
            raise InputError(None, ref_template, "--ref-template must contain {patient}")
    patch = tuple(int(v) for v in patch_size)
    out_tsv = Path(out_tsv)
    out_dir = out_tsv.parent
    masks_dir = out_dir / split
    try:
        pathway, phase, entry = load_for_inference(model_path, device)
    except Exception as err:  # a missing, truncated or foreign checkpoint
        raise InputError(None, model_path, f"cannot load the trained model ({err})") from err
    p = variant_score(entry, p)  # a variant may set its own score
    alternatives = compare_scores(p, entry)
    ids = read_splits(splits_tsv).get(split, [])
    if not ids:
        raise InputError(None, splits_tsv, f"split {split!r} has no patients")
    # a variant without segmentation (DML, a classifier) has no mask to write: its Dice cell is "–"
    write_masks = split in p["mask_splits"] and trains_segmentation(entry)
    write_cams = split in p["cam_splits"]
    # masks and CAMs go to a staging folder that replaces ``{split}/`` only once every patient is done:
    # a failure on one patient leaves no files of the patients before it
    _check_replaceable(masks_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{split}.tmp*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{split}.tmp", dir=out_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the masks from the rest of a group
    old = out_dir / f".{split}.old{os.getpid()}"
    try:
        rows = []
        # disable=None: the bar draws only on a terminal, not into a rule's log file
        for pid in tqdm(ids, desc=f"infer {split}", unit="patient", disable=None):
            npz = load_inference_npz(pid, preprocessed_dir, phase)
            vol = torch.from_numpy(npz[phase])[None, None].to(device)
            spacing = npz.get("spacing")
            prob, mask = patient_score(pathway, npz[phase], spacing, patch, p, device)
            row: dict[str, Any] = {
                "patient_id": pid,
                "split": split,
                "label": int(npz["label"]),
                "prob": prob,
            }
            row["score"] = p["score"]
            for alt in alternatives:
                if alt == "seg_volume" and mask is not None:
                    half = float(p["seg_volume_half_ml"])
                    row[f"prob_{alt}"] = seg_volume_score(mask, spacing, half)
                else:
                    row[f"prob_{alt}"], alt_mask = patient_score(
                        pathway, npz[phase], spacing, patch, {**p, "score": alt}, device
                    )
                    mask = alt_mask if mask is None else mask
            orig_affine = np.asarray(npz["orig_affine"], dtype=float)
            if write_masks:
                if mask is None:
                    mask = segment(pathway, vol, patch, p)
                mask = mask.cpu().numpy().astype(np.uint8)
                row["mask"] = _write_nifti(
                    to_original_grid(mask, npz, order=0).astype(np.uint8),
                    orig_affine,
                    staging / f"{pid}_mask.nii.gz",
                    split,
                )
            if write_cams and (row["label"] == 1 or not p["cam_positives_only"]):
                heat = grad_cam(pathway, npz[phase], patch, p, device)
                row["cam"] = _write_nifti(
                    to_original_grid(heat, npz, order=1).astype(np.float32),
                    orig_affine,
                    staging / f"{pid}_cam.nii.gz",
                    split,
                )
                ref = npz.get("truth_mask", npz.get("mask"))  # phantom truth, else the annotation
                pred = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask
                cam_overview(
                    npz[phase],
                    heat,
                    np.linalg.norm(np.asarray(npz["affine"], float)[:3, :3], axis=0),
                    staging / f"{pid}_cam.png",
                    f"{pid} ({phase.upper()}, label {row['label']}), p = {prob:.3f}",
                    mask=pred,
                    ref=ref,
                )
                row["cam_png"] = f"{split}/{pid}_cam.png"
            if nifti_dir is not None:
                image = Path(nifti_dir) / pid / "nct.nii.gz"
                if not image.is_file():
                    raise InputError(pid, image, "NCT NIfTI not found (--nifti-dir)")
                row["image"] = os.path.relpath(image, out_dir)
            if ref_template:
                ref = Path(ref_template.format(patient=pid))
                if ref.exists():
                    row["ref_mask"] = os.path.relpath(ref, out_dir)
            rows.append(row)
        df = pd.DataFrame(rows)
        if split in p["mask_splits"] and "mask" not in df:
            df["mask"] = ""  # a split with masks keeps its column; empty for a variant without segmentation
        with atomic_path(out_tsv) as tmp:
            df.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
            if masks_dir.exists():
                os.replace(masks_dir, old)  # set aside, removed once the new table is in place
            os.replace(staging, masks_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return df


#: what ``infer`` writes into ``{split}/``; a folder holding anything else is not replaced
_OURS = ("*_mask.nii.gz", "*_cam.nii.gz", "*_cam.png", ".snakemake_timestamp")


def _check_replaceable(masks_dir: Path) -> None:
    """Refuse to replace a ``{split}/`` folder that holds files ``infer`` did not write (``--out`` pointed
    next to an unrelated folder of the same name)."""
    if not masks_dir.exists():
        return
    if not masks_dir.is_dir():
        raise InputError(None, masks_dir, "is a file; infer writes its masks and CAMs into a folder here")
    foreign = [f.name for f in masks_dir.iterdir() if not any(f.match(pat) for pat in _OURS)]
    if foreign:
        raise InputError(
            None,
            masks_dir,
            f"holds files infer did not write ({', '.join(sorted(foreign)[:3])}); refusing to replace it",
        )


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path, split: str) -> str:
    """Write ``array`` on the original NCT grid into the staging folder; returns the path it will have
    relative to the predictions folder (``{split}/{name}``)."""
    nib.save(nib.Nifti1Image(array, affine), path)
    return f"{split}/{path.name}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="results/models/{variant}/model.pt")
    parser.add_argument("--splits", required=True, help="results/splits.tsv")
    parser.add_argument("--split", required=True, choices=["train", "val", "test"])
    parser.add_argument("--preprocessed-dir", required=True)
    parser.add_argument("--out", required=True, help="results/predictions/{variant}/{split}.tsv")
    parser.add_argument("--nifti-dir", default=None, help="results/nifti (for the image column)")
    parser.add_argument(
        "--ref-template", default=None, help="reference mask path with {patient}, e.g. results/registered/..."
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        df = infer_split(
            args.model,
            args.splits,
            args.split,
            args.preprocessed_dir,
            args.out,
            params=cfg.get("infer", {}),
            patch_size=tuple(cfg.get("patches", {}).get("size", DEFAULT_PATCH)),
            nifti_dir=args.nifti_dir,
            ref_template=args.ref_template,
            device=device,
        )
    except InputError as err:
        return report(err)
    print(f"{args.split}: {len(df)} patients, mean prob {df['prob'].mean():.3f} -> {args.out}")
    return 0
