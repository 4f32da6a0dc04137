"""Preprocess one registered patient: canonical orientation, common spacing, HU window, body crop.

``cpmn preprocess --patient P --label L --nct F --ctpa F --mask F --out results/preprocessed/P.npz
[--truth-mask F]``

Steps, in order:

1. **Reorient** every image to the closest canonical (RAS+) orientation (``nibabel.as_closest_canonical``),
   so that array axes run left→right, posterior→anterior, inferior→superior for every patient.
2. **Resample** to ``spacing`` mm (``nibabel.processing.resample_from_to``, i.e. scipy ``map_coordinates``):
   trilinear for the CT images, nearest neighbour for the masks. The new grid keeps the first voxel centre
   of the canonical grid and covers the same field of view.
3. **HU window**: clip to ``hu_window`` (config default [-200, 300] HU, mediastinal) and scale linearly to
   [0, 1]: fat and lung saturate at 0, contrast-enhanced blood (250-550 HU) near 1, and emboli (20-70 HU),
   unenhanced blood (35-50 HU) and soft tissue fall in between. ``nct_hu_window`` (null: the same window)
   gives the NCT its own, narrower window, in which the 20-40 HU step of a hyperdense clot over blood spans
   more of the input range (docs/method-choices.md).
4. **Body crop**: threshold the NCT at ``body_threshold_hu`` (-500 HU: soft tissue vs air), keep the
   largest connected component (drops the table and outside air pockets), take its bounding box plus
   ``body_margin_mm`` and, to be safe, the bounding box of the embolus mask.

The ``.npz`` holds the contract keys (``nct``, ``ctpa``, ``mask``, ``truth_mask`` with phantom truth,
``label``, ``spacing``, ``affine``, ``orig_affine``, ``orig_shape``) and the bookkeeping that maps the stored
grid back: ``crop_box`` (2, 3) start/stop voxel of the crop in the resampled canonical grid,
``resampled_shape`` (3,), ``hu_window`` (2,), ``nct_hu_window`` (2,) and ``body_threshold_hu``.
:func:`to_original_grid` uses the stored and original affines, so it undoes reorientation, resampling and
crop in one resampling.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

from cpmn.config import add_config_arguments, resolve, schema_defaults
from cpmn.data.niftiio import load_nifti
from cpmn.errors import InputError, atomic_path, report

#: the ``preprocess:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("preprocess")

AIR_HU = -1024.0

#: what a preprocessed volume means (canonical RAS voxel order, spacing, per-phase HU window to [0, 1],
#: body crop); a model card stores it, and ``cpmn predict`` refuses a model of another contract
CONTRACT = 2

#: air-filled lung: HU band inside the (slice-wise filled) body, and the volume a chest field of view holds
LUNG_HU = (-1000.0, -400.0)
MIN_LUNG_ML = 500.0


def read_preprocessed(
    patient_id: str,
    path: str | os.PathLike,
    required: tuple[str, ...],
    optional: tuple[str, ...] | None = (),
) -> dict[str, np.ndarray]:
    """The ``required`` arrays of one preprocessed ``.npz``, plus those of ``optional`` that are stored
    (``None``: every stored array).

    Raises:
        InputError: the file is missing, unreadable (truncated, not an npz) or lacks a required array,
            naming the patient and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(patient_id, path, "preprocessed volume not found")
    try:
        with np.load(path) as z:
            missing = [k for k in dict.fromkeys(required) if k not in z.files]
            if missing:
                raise InputError(patient_id, path, f"missing arrays {missing}")
            keys = z.files if optional is None else [k for k in (*required, *optional) if k in z.files]
            return {k: np.asarray(z[k]) for k in keys}
    except InputError:
        raise
    except Exception as err:  # a truncated (BadZipFile) or foreign file
        raise InputError(patient_id, path, f"cannot read npz ({err})") from err


def window(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``hu_window`` and scale to [0, 1] (float32, same shape)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def target_grid(img: nib.Nifti1Image, spacing) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the grid with voxel size ``spacing`` mm covering ``img``'s field of view.

    The first voxel centre is kept; the voxel axes keep their direction. ``spacing`` is (3,) mm.
    """
    aff = img.affine
    cur = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    zoom = np.asarray(spacing, dtype=np.float64) / cur
    shape = tuple(max(1, int(round(n / z))) for n, z in zip(img.shape, zoom, strict=True))
    new = aff.copy()
    new[:3, :3] = aff[:3, :3] @ np.diag(zoom)
    return shape, new


def body_box(
    nct_hu: np.ndarray, threshold_hu: float, margin_vox: np.ndarray, extra: np.ndarray | None = None
) -> np.ndarray:
    """Crop box (2, 3) ``[start, stop)``: largest component above ``threshold_hu`` plus ``margin_vox``.

    ``extra`` (bool, same shape) is a mask whose bounding box is included as well. Returns ``None``-free
    int array; raises ``ValueError`` when nothing is above the threshold.
    """
    lab, n = ndimage.label(nct_hu > threshold_hu)
    if n == 0:
        raise ValueError(f"no voxel above the body threshold {threshold_hu} HU")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = lab == int(np.argmax(sizes))
    if extra is not None and extra.any():
        keep = keep | extra
    idx = np.argwhere(keep)
    start = np.maximum(idx.min(axis=0) - margin_vox, 0)
    stop = np.minimum(idx.max(axis=0) + 1 + margin_vox, nct_hu.shape)
    return np.stack([start, stop]).astype(np.int64)


def resample_to(img: nib.Nifti1Image, grid: tuple, order: int, cval: float) -> np.ndarray:
    """``img`` (any orientation) resampled onto ``grid`` = (shape, affine) of the canonical target grid."""
    can = nib.as_closest_canonical(img)
    data = np.asarray(can.dataobj, dtype=np.float32)
    src = nib.Nifti1Image(data, can.affine)
    return np.asarray(resample_from_to(src, grid, order=order, mode="constant", cval=cval).dataobj)


def filled_body(body: np.ndarray) -> np.ndarray:
    """The body ``(X, Y, Z)`` bool with each axial slice's holes filled: lungs and airways count as inside."""
    return np.stack([ndimage.binary_fill_holes(body[:, :, k]) for k in range(body.shape[2])], axis=2)


def nct_grid(
    nct_img: nib.Nifti1Image,
    p: Mapping[str, Any],
    patient_id: str,
    path: str | os.PathLike,
    extra: np.ndarray | None = None,
) -> tuple[tuple, np.ndarray, np.ndarray, tuple[slice, ...], dict[str, Any]]:
    """The NCT on the target grid: ``(grid, nct_hu, box, crop, meta)``.

    ``grid`` = (shape, affine) of the canonical grid at ``p["spacing"]``; ``nct_hu`` the resampled NCT
    (HU, whole grid); ``box`` (2, 3) the body crop (largest component above ``body_threshold_hu`` plus
    ``body_margin_mm``, and the bounding box of ``extra`` (a bool array on ``grid``, e.g. the embolus mask)
    when given); ``crop`` the slices of ``box``; ``meta`` the grid bookkeeping of the stored file. Raises
    :class:`InputError` naming ``path`` for an empty body.
    """
    canon = nib.as_closest_canonical(nct_img)
    shape, affine = target_grid(canon, p["spacing"])
    grid = (shape, affine)
    nct_hu = resample_to(nct_img, grid, 1, AIR_HU)
    margin = np.ceil(float(p["body_margin_mm"]) / np.asarray(p["spacing"], dtype=np.float64)).astype(np.int64)
    try:
        box = body_box(nct_hu, float(p["body_threshold_hu"]), margin, extra)
    except ValueError as exc:
        raise InputError(patient_id, path, str(exc)) from exc
    crop = tuple(slice(int(a), int(b)) for a, b in zip(box[0], box[1], strict=True))
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ box[0] + affine[:3, 3]
    meta = {
        "spacing": np.asarray(p["spacing"], dtype=np.float64),
        "affine": crop_affine,
        "orig_affine": np.asarray(nct_img.affine, dtype=np.float64),
        "orig_shape": np.asarray(nct_img.shape, dtype=np.int64),
        "crop_box": box,
        "resampled_shape": np.asarray(shape, dtype=np.int64),
    }
    return grid, nct_hu, box, crop, meta


def windows(p: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """``(hu_window, nct_window)`` of the preprocess settings (the NCT's own window, or the common one)."""
    hu_window = [float(v) for v in p["hu_window"]]
    return hu_window, [float(v) for v in (p.get("nct_hu_window") or hu_window)]


def prepare_nct(
    nct_img: nib.Nifti1Image,
    params: Mapping[str, Any] | None,
    patient_id: str,
    path: str | os.PathLike,
) -> dict[str, Any]:
    """One NCT scan alone on the training grid, as ``cpmn predict`` needs it, with the chest checked.

    The same steps as :func:`preprocess_patient` for the NCT (canonical grid, spacing, NCT window, body crop).
    Returns the stored file's NCT keys (``nct`` float32 ``(X, Y, Z)``, ``body``, ``spacing``, ``affine``,
    ``orig_affine``, ``orig_shape``, ``crop_box``, ``resampled_shape``, the windows) plus ``body_filled``
    (bool, lungs inside) and ``lung_ml``. Raises :class:`InputError` naming ``path`` when the field of view
    holds no chest: less than :data:`MIN_LUNG_ML` of air-filled lung inside the body.
    """
    p = {**DEFAULTS, **(params or {})}
    _, nct_hu, _, crop, meta = nct_grid(nct_img, p, patient_id, path)
    hu = nct_hu[crop]
    body = hu > float(p["body_threshold_hu"])
    inside = filled_body(body)
    lung = inside & ~body & (hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1])
    lung_ml = float(lung.sum()) * float(np.prod(meta["spacing"])) / 1000.0
    if lung_ml < MIN_LUNG_ML:
        raise InputError(
            patient_id,
            path,
            f"no chest in the field of view: {lung_ml:.0f} mL of air-filled lung inside the body"
            f" (a chest CT holds at least {MIN_LUNG_ML:.0f} mL)",
        )
    hu_window, nct_window = windows(p)
    return {
        "nct": window(hu, nct_window),
        "body": body.astype(np.uint8),
        "body_filled": inside,
        "lung_ml": lung_ml,
        **meta,
        "hu_window": np.asarray(hu_window, dtype=np.float64),
        "nct_hu_window": np.asarray(nct_window, dtype=np.float64),
        "body_threshold_hu": np.float64(p["body_threshold_hu"]),
    }


def preprocess_patient(
    patient_id: str,
    label: int,
    nct: str | os.PathLike,
    ctpa: str | os.PathLike,
    mask: str | os.PathLike | None,
    out: str | os.PathLike,
    params: dict[str, Any] | None = None,
    truth_mask: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``out`` (.npz, keys in the module docstring) for one patient and return a small summary.

    ``nct`` is the NCT NIfTI; ``ctpa`` and ``mask`` are already on the NCT grid (outputs of
    :func:`cpmn.data.register.register_patient`); ``truth_mask`` (phantom) too. Arrays in the file are
    ``(X, Y, Z)`` in canonical RAS voxel order at ``spacing``. Raises :class:`InputError` (and writes nothing)
    for unreadable files, grids that differ from the NCT's, an empty body, or an empty mask on a PE patient.
    """
    p = {**DEFAULTS, **(params or {})}
    label = int(label)
    if label not in (0, 1):
        raise InputError(patient_id, nct, f"label must be 0 or 1, got {label}")
    nct_img = load_nifti(nct, patient_id, "NCT")
    others: dict[str, tuple[nib.Nifti1Image, str | os.PathLike]] = {
        "ctpa": (load_nifti(ctpa, patient_id, "CTPA"), ctpa)
    }
    if mask is not None:
        others["mask"] = (load_nifti(mask, patient_id, "mask"), mask)
    if truth_mask is not None:
        others["truth_mask"] = (load_nifti(truth_mask, patient_id, "truth mask"), truth_mask)
    for key, (img, path) in others.items():
        if img.shape != nct_img.shape:
            raise InputError(
                patient_id, path, f"{key} is not on the NCT grid (shape {img.shape} vs {nct_img.shape})"
            )
        if not np.allclose(img.affine, nct_img.affine, atol=1e-2):
            worst = float(np.max(np.abs(img.affine - nct_img.affine)))
            raise InputError(
                patient_id,
                path,
                f"{key} is not on the NCT grid (same shape {img.shape}, voxel-to-world affine differs"
                f" by up to {worst:.3g} mm)",
            )

    raw_mask = np.asarray(others["mask"][0].dataobj) > 0.5 if mask is not None else None
    if label == 1 and (raw_mask is None or not raw_mask.any()):
        raise InputError(patient_id, mask, "label is 1 (PE) but the embolus mask is empty")
    if label == 0 and raw_mask is not None and raw_mask.any():
        print(
            f"WARNING patient {patient_id}: {mask}: label 0 but the mask has {int(raw_mask.sum())} voxels",
            file=sys.stderr,
        )

    canon = nib.as_closest_canonical(nct_img)
    grid = target_grid(canon, p["spacing"])
    arrays = {}
    for key in ("mask", "truth_mask"):
        if key in others:
            arrays[key] = (resample_to(others[key][0], grid, 0, 0.0) > 0.5).astype(np.uint8)
    if "mask" not in arrays:
        arrays["mask"] = np.zeros(grid[0], dtype=np.uint8)
    if label == 1 and not arrays["mask"].any():
        raise InputError(patient_id, mask, f"the embolus mask vanishes when resampled to {p['spacing']} mm")
    _, nct_hu, _, sl, meta = nct_grid(nct_img, p, patient_id, nct, arrays["mask"] > 0)
    ctpa_hu = resample_to(others["ctpa"][0], grid, 1, AIR_HU)

    hu_window, nct_window = windows(p)
    result = {
        "nct": window(nct_hu[sl], nct_window),
        "ctpa": window(ctpa_hu[sl], hu_window),
        "mask": arrays["mask"][sl].copy(),
        "body": (nct_hu[sl] > float(p["body_threshold_hu"])).astype(np.uint8),
    }
    if "truth_mask" in arrays:
        result["truth_mask"] = arrays["truth_mask"][sl].copy()
    result.update(
        label=np.int64(label),
        **meta,
        hu_window=np.asarray(hu_window, dtype=np.float64),
        nct_hu_window=np.asarray(nct_window, dtype=np.float64),
        body_threshold_hu=np.float64(p["body_threshold_hu"]),
    )
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **result)
    return {
        "patient_id": patient_id,
        "shape": tuple(int(s) for s in result["nct"].shape),
        "mask_voxels": int(result["mask"].sum()),
        "crop_box": meta["crop_box"].tolist(),
    }


def to_original_grid(
    array: np.ndarray, npz: Mapping[str, Any] | str | os.PathLike, order: int | None = None
) -> np.ndarray:
    """Map ``array`` on the stored grid (shape of ``npz["nct"]``) back onto the original NCT grid.

    ``npz`` is a preprocessed file (path) or its loaded mapping. ``order`` is the interpolation order:
    default nearest (0) for integer/bool arrays (masks) and trilinear (1) for floats (probabilities, CAMs).
    Voxels outside the crop get 0. Returns an array of shape ``orig_shape``, in the original (not
    canonical) voxel order, so it can be saved with ``orig_affine``.
    """
    if not isinstance(npz, Mapping) and not hasattr(npz, "files"):
        with np.load(npz) as f:
            meta = {k: f[k] for k in ("affine", "orig_affine", "orig_shape", "nct")}
        npz = meta
    array = np.asarray(array)
    if array.shape != tuple(npz["nct"].shape):
        raise ValueError(f"array shape {array.shape} != stored grid {tuple(npz['nct'].shape)}")
    integer = array.dtype == bool or np.issubdtype(array.dtype, np.integer)
    if order is None:
        order = 0 if integer else 1
    src = nib.Nifti1Image(array.astype(np.float32), np.asarray(npz["affine"], dtype=np.float64))
    target = (tuple(int(s) for s in npz["orig_shape"]), np.asarray(npz["orig_affine"], dtype=np.float64))
    out = np.asarray(resample_from_to(src, target, order=order, mode="constant", cval=0.0).dataobj)
    if integer:
        return np.rint(out).astype(array.dtype)
    return out.astype(np.float32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patient", required=True, help="patient id")
    parser.add_argument("--label", required=True, type=int, choices=[0, 1], help="patient label (1 = PE)")
    parser.add_argument("--nct", required=True, help="NCT NIfTI")
    parser.add_argument("--ctpa", required=True, help="CTPA NIfTI already in NCT space (ctpa_in_nct.nii.gz)")
    parser.add_argument("--mask", required=True, help="embolus mask on the NCT grid (mask_in_nct.nii.gz)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--truth-mask", default=None, help="phantom truth mask on the NCT grid")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = resolve(args, "preprocess")
    try:
        info = preprocess_patient(
            args.patient,
            args.label,
            args.nct,
            args.ctpa,
            args.mask,
            args.out,
            params,
            truth_mask=args.truth_mask,
        )
    except InputError as err:
        return report(err)
    print(f"{info['patient_id']}: stored grid {info['shape']}, mask voxels {info['mask_voxels']}")
    return 0
