"""Register the CTPA scan onto the NCT scan (antspyx) and warp the image and the embolus mask.

``cpmn register --nct F --ctpa F [--mask F] --out-dir D --patient P [--truth-mask F] [--threads N]``

The NCT is the fixed image and the CTPA the moving one: everything downstream lives on the NCT grid,
so the CTPA image and its annotation are brought into NCT space. ``ants.registration`` with
``type_of_transform="SyN"`` runs a centre-of-mass initialisation, an affine stage and then a symmetric
diffeomorphic (SyN) stage; metric, iterations and regularisation come from the ``register`` config
section.

Two things are done to the *registration copies* only (the transforms are then applied to the
full-resolution, unclipped images):

* HU clipping to ``hu_clip`` (default [-1000, 600]). Contrast-enhanced vessels reach several hundred HU
  in CTPA but ~40 HU in NCT; clipping bounds that contrast difference so that the metric is driven by the
  body outline, lungs, bone and soft tissue that both phases share rather than by the iodinated blood.
* Downsampling to ``reg_spacing`` mm (default 4) where the scan is finer. Registration cost grows with
  the voxel count while the deformation between two breath-holds of the same patient is smooth, so a
  4 mm grid estimates it well; the affine matrix is in physical space and the warp field is
  interpolated when it is applied to the full-resolution grid.

Outputs in ``D``: ``ctpa_in_nct.nii.gz`` (linear interpolation, air (-1024 HU) outside the CTPA field of
view), ``mask_in_nct.nii.gz`` (uint8, ``genericLabel`` interpolation), ``transforms/`` (the forward affine
``0GenericAffine.mat``, the forward warp ``1Warp.nii.gz``, its inverse ``1InverseWarp.nii.gz`` and
``transforms.json`` naming the forward and inverse lists as ``ants.apply_transforms`` takes them) and
``qc.json``.

Tuning on the phantom (6 PE patients, 128 x 128 x 80 at 2.5 mm, clots a few voxels across): the default
``reg_iterations`` [40, 20, 0] gives a mean warped-mask Dice of 0.88 against the hidden truth (an oracle
warp with the true displacement field reaches 0.93 because of resampling of such small objects) in about
15 s per patient on 2 threads; [40, 20, 10] (iterations at full resolution) gives 0.90 at ~2.5x the time;
a tighter HU clip ([-1000, 200]) or ``flow_sigma`` 2 changed Dice by < 0.005.

antspyx is imported lazily, after the thread count and random seed are put into the environment, and no
function that downloads data (``ants.get_data``) is ever called.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cpmn.config import add_config_arguments, resolve, schema_defaults
from cpmn.data.niftiio import load_nifti
from cpmn.errors import InputError, atomic_path, report

#: the ``register:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("register")

AIR_HU = -1024.0


def _setup_environment(threads: int | None, seed: int) -> None:
    """Thread count and seed for ITK/ANTs; must run before ANTs creates its thread pool."""
    if threads is not None:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    os.environ["ANTS_RANDOM_SEED"] = str(int(seed))


def _read(path: str | os.PathLike, patient_id: str, what: str):
    import ants  # antspyx: heavy (2 s), and only after _setup_environment (see register_patient)

    p = Path(path)
    load_nifti(p, patient_id, what)  # ITK fills a truncated .nii.gz silently; nibabel decoding does not
    try:
        img = ants.image_read(str(p))
    except Exception as exc:  # noqa: BLE001 - ants raises assorted types for unreadable files
        raise InputError(
            patient_id, p, f"cannot read {what} image ({exc.__class__.__name__}: {exc})"
        ) from exc
    if img.dimension != 3 or img.components != 1:
        raise InputError(
            patient_id, p, f"{what} must be a 3D scalar image, got {img.dimension}D x {img.components}"
        )
    return img


def _same_grid(a, b) -> bool:
    return (
        a.shape == b.shape
        and np.allclose(a.spacing, b.spacing, atol=1e-3)
        and np.allclose(a.origin, b.origin, atol=1e-2)
        and np.allclose(a.direction, b.direction, atol=1e-4)
    )


def registration_copy(img, hu_clip: tuple[float, float] | None, reg_spacing: float | None):
    """The image the metric sees: HU-clipped and, where finer than ``reg_spacing`` mm, downsampled."""
    import ants  # antspyx: heavy (2 s), and only after _setup_environment (see register_patient)

    out = img.clone("float")
    if hu_clip is not None:
        arr = np.clip(out.numpy(), float(hu_clip[0]), float(hu_clip[1]))
        out = ants.from_numpy(arr, origin=out.origin, spacing=out.spacing, direction=out.direction)
    if reg_spacing:
        spacing = tuple(max(float(s), float(reg_spacing)) for s in out.spacing)
        if not np.allclose(spacing, out.spacing):
            out = ants.resample_image(out, spacing, use_voxels=False, interp_type=0)
    return out


def body_mask(nct: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Largest connected component above ``threshold_hu``, holes filled (bool, same shape as ``nct``)."""
    fg = nct > threshold_hu
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(lab == int(np.argmax(sizes)))


def ncc(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Normalised cross-correlation (Pearson r) of ``a`` and ``b`` over the voxels in ``where``."""
    x = a[where].astype(np.float64)
    y = b[where].astype(np.float64)
    if x.size < 2:
        return float("nan")
    x -= x.mean()
    y -= y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; NaN when both are empty."""
    a = a > 0
    b = b > 0
    s = int(a.sum()) + int(b.sum())
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else float("nan")


def _jacobian_qc(domain, fwdtransforms: list[str]) -> tuple[float, float]:
    """(min Jacobian determinant, % voxels with det <= 0) of the forward transform on ``domain``."""
    import ants  # antspyx: heavy (2 s), and only after _setup_environment (see register_patient)

    warps = [t for t in fwdtransforms if t.endswith(".nii.gz") or t.endswith(".nii")]
    affines = [t for t in fwdtransforms if t.endswith(".mat")]
    aff_det = 1.0
    for t in affines:
        params = np.asarray(ants.read_transform(t).parameters, dtype=np.float64)
        aff_det *= float(np.linalg.det(params[:9].reshape(3, 3)))
    if not warps:
        return aff_det, 0.0 if aff_det > 0 else 100.0
    jac = ants.create_jacobian_determinant_image(domain, warps[0], do_log=False).numpy()
    # the warp is defined relative to the affine-aligned image; the full map's determinant is the product
    jac = jac * aff_det
    return float(jac.min()), float(100.0 * np.mean(jac <= 0))


def register_patient(
    nct: str | os.PathLike,
    ctpa: str | os.PathLike,
    mask: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    patient_id: str,
    params: dict[str, Any] | None = None,
    truth_mask: str | os.PathLike | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Register CTPA (moving) to NCT (fixed); warp the CTPA image and its mask into NCT space.

    ``mask`` is the embolus annotation on the CTPA grid (uint8 0/1, same grid as ``ctpa``; ``None`` for a
    patient without annotation gives an empty mask). ``truth_mask`` (phantom only) is the true embolus mask
    on the NCT grid, used for ``dice_truth``. Returns the QC dict that is also written to ``out_dir/qc.json``:
    ``patient_id, ncc_before, ncc_after, jac_min, folding_pct, seconds, dice_truth, transform`` and a few
    settings. Raises :class:`InputError` for unreadable or inconsistent inputs before writing anything.
    """
    p = {**DEFAULTS, **(params or {})}
    _setup_environment(threads, p["random_seed"])
    # antspyx after _setup_environment: ITK reads its thread count at import; and it is heavy (2 s)
    import ants
    import ants.config

    ants.config._random_seed = int(p["random_seed"])  # adds --random-seed to antsRegistration

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    fixed = _read(nct, patient_id, "NCT")
    moving = _read(ctpa, patient_id, "CTPA")
    for img, path, what in ((fixed, nct, "NCT"), (moving, ctpa, "CTPA")):
        lo, hi = float(img.min()), float(img.max())
        if hi - lo < 1.0:  # ANTs would fail after pages of ITK numerical warnings
            raise InputError(patient_id, path, f"{what} image is constant ({lo:g}): nothing to register")
    if mask is not None:
        mask_img = _read(mask, patient_id, "mask")
        if not _same_grid(mask_img, moving):
            raise InputError(
                patient_id, mask, f"mask grid {mask_img.shape} does not match the CTPA grid {moving.shape}"
            )
        if not np.isin(np.unique(mask_img.numpy()), [0, 1]).all():
            raise InputError(patient_id, mask, "mask must contain only 0 and 1")
    else:
        mask_img = moving.new_image_like(np.zeros(moving.shape, dtype=np.float32))
    truth = None
    if truth_mask is not None:
        truth_img = _read(truth_mask, patient_id, "truth mask")
        if truth_img.shape != fixed.shape:
            raise InputError(
                patient_id, truth_mask, f"truth mask shape {truth_img.shape} != NCT {fixed.shape}"
            )
        truth = truth_img.numpy() > 0.5

    hu_clip = p["hu_clip"]
    fixed_r = registration_copy(fixed, hu_clip, p["reg_spacing"])
    moving_r = registration_copy(moving, hu_clip, p["reg_spacing"])

    with tempfile.TemporaryDirectory(prefix=f"cpmn_reg_{patient_id}_") as tmp:
        try:
            reg = ants.registration(
                fixed=fixed_r,
                moving=moving_r,
                type_of_transform=p["type_of_transform"],
                aff_metric=p["aff_metric"],
                syn_metric=p["syn_metric"],
                reg_iterations=tuple(int(i) for i in p["reg_iterations"]),
                aff_iterations=tuple(int(i) for i in p["aff_iterations"]),
                aff_shrink_factors=tuple(int(i) for i in p["aff_shrink_factors"]),
                aff_smoothing_sigmas=tuple(float(i) for i in p["aff_smoothing_sigmas"]),
                grad_step=float(p["grad_step"]),
                flow_sigma=float(p["flow_sigma"]),
                total_sigma=float(p["total_sigma"]),
                outprefix=str(Path(tmp) / "reg_"),
            )
        except (RuntimeError, ValueError) as exc:
            raise InputError(patient_id, ctpa, f"antsRegistration failed ({exc})") from exc
        fwd = list(reg["fwdtransforms"])
        inv = list(reg["invtransforms"])
        warped = ants.apply_transforms(
            fixed=fixed, moving=moving, transformlist=fwd, interpolator="linear", defaultvalue=AIR_HU
        )
        warped_mask = ants.apply_transforms(
            fixed=fixed, moving=mask_img.clone("float"), transformlist=fwd, interpolator="genericLabel"
        )
        identity = ants.resample_image_to_target(moving, fixed, interp_type="linear")
        jac_min, folding_pct = _jacobian_qc(fixed_r, fwd)

        # --- QC on the NCT grid: HU-windowed intensities over the NCT body mask, restricted to voxels that
        # both the identity-resampled and the warped CTPA actually cover (outside its field of view the two
        # resamplings fill different values, which would bias the comparison)
        ones = moving.new_image_like(np.ones(moving.shape, dtype=np.float32))
        fov_id = ants.resample_image_to_target(ones, fixed, interp_type="linear").numpy() > 0.999
        fov_w = ants.apply_transforms(
            fixed=fixed, moving=ones, transformlist=fwd, interpolator="linear"
        ).numpy()
        lo, hi = float(hu_clip[0]), float(hu_clip[1])
        f_arr = np.clip(fixed.numpy(), lo, hi)
        covered = body_mask(fixed.numpy(), float(p["body_threshold_hu"])) & (fov_w > 0.999)
        if covered.sum() < 2:
            raise InputError(
                patient_id, ctpa, "the registered CTPA covers none of the NCT body: the scans do not match"
            )
        where = covered & fov_id
        if where.sum() < 2:
            # scanner coordinates of the two scans do not overlap (another frame of reference, e.g. a
            # different session): the centre-of-mass start still aligns them, but there is no "before"
            print(
                f"WARNING patient {patient_id}: {ctpa}: CTPA and NCT do not overlap in scanner coordinates;"
                f" ncc_before is undefined, ncc_after is over the {int(covered.sum())} NCT body voxels"
                " the registered CTPA covers",
                file=sys.stderr,
            )
            where = covered
        ncc_before = ncc(f_arr, np.clip(identity.numpy(), lo, hi), where & fov_id)
        ncc_after = ncc(f_arr, np.clip(warped.numpy(), lo, hi), where)
        mask_arr = (warped_mask.numpy() > 0.5).astype(np.uint8)
        qc = {
            "patient_id": patient_id,
            "ncc_before": ncc_before,
            "ncc_after": ncc_after,
            "jac_min": jac_min,
            "folding_pct": folding_pct,
            "seconds": 0.0,
            "dice_truth": dice(mask_arr, truth) if truth is not None else float("nan"),
            "transform": p["type_of_transform"],
            "ncc_voxels": int(where.sum()),
            "mask_voxels_ctpa": int((mask_img.numpy() > 0.5).sum()),
            "mask_voxels_nct": int(mask_arr.sum()),
            "reg_spacing": list(fixed_r.spacing),
            "threads": threads,
        }

        # --- write: every output to a temporary name first; qc.json last
        out_dir.mkdir(parents=True, exist_ok=True)
        tx_tmp = Path(tempfile.mkdtemp(prefix=".transforms.tmp", dir=out_dir))
        try:
            names = {src: Path(src).name.removeprefix("reg_") for src in dict.fromkeys(fwd + inv)}
            for src, name in names.items():
                shutil.copyfile(src, tx_tmp / name)
            (tx_tmp / "transforms.json").write_text(
                json.dumps(
                    {
                        "fwdtransforms": [names[t] for t in fwd],
                        "invtransforms": [names[t] for t in inv],
                        "whichtoinvert_inverse": [t.endswith(".mat") for t in inv],
                        "registration_spacing": list(fixed_r.spacing),
                        "note": "ants.apply_transforms(fixed=nct, moving=ctpa, transformlist=fwdtransforms)",
                    },
                    indent=2,
                )
            )
            with atomic_path(out_dir / "ctpa_in_nct.nii.gz") as tmp_img:
                ants.image_write(warped, str(tmp_img))
            with atomic_path(out_dir / "mask_in_nct.nii.gz") as tmp_mask:
                ants.image_write(
                    fixed.new_image_like(mask_arr.astype(np.float32)).astype("uint8"), str(tmp_mask)
                )
            final_tx = out_dir / "transforms"
            if final_tx.exists():
                shutil.rmtree(final_tx)
            os.replace(tx_tmp, final_tx)
        finally:
            if tx_tmp.exists():
                shutil.rmtree(tx_tmp)
        qc["seconds"] = round(time.perf_counter() - t0, 3)
        with atomic_path(out_dir / "qc.json") as tmp_qc:
            tmp_qc.write_text(json.dumps(qc, indent=2) + "\n")
    return qc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nct", required=True, help="NCT NIfTI (fixed image)")
    parser.add_argument("--ctpa", required=True, help="CTPA NIfTI (moving image)")
    parser.add_argument(
        "--mask", default=None, help="embolus mask NIfTI on the CTPA grid (none: a normal without annotation)"
    )
    parser.add_argument("--out-dir", required=True, help="output folder D")
    parser.add_argument("--patient", required=True, help="patient id")
    parser.add_argument("--truth-mask", default=None, help="true embolus mask on the NCT grid (phantom)")
    parser.add_argument("--threads", type=int, default=None, help="ITK threads (default: ITK's own)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = resolve(args, "register")
    try:
        qc = register_patient(
            args.nct,
            args.ctpa,
            args.mask,
            args.out_dir,
            args.patient,
            params,
            truth_mask=args.truth_mask,
            threads=args.threads,
        )
    except InputError as err:
        return report(err)
    print(
        f"{qc['patient_id']}: NCC {qc['ncc_before']:.3f} -> {qc['ncc_after']:.3f}, "
        f"jac_min {qc['jac_min']:.3f}, folding {qc['folding_pct']:.3f}%, "
        f"Dice(truth) {qc['dice_truth']:.3f}, {qc['seconds']:.1f} s"
    )
    return 0
