"""A balanced bank of patch centres per patient.

``cpmn patches --preprocessed P.npz --out results/patches/P.npz [--patient P]``

The classifier's patch label is "the patch of size P around the centre contains embolus voxels". The
bank holds ``per_patient`` centres (K, 3) (voxel indices into the preprocessed arrays):

* PE patients: ``round(K * pos_fraction)`` *positive* centres. ``centre_pos_fraction`` of them are drawn
  from within a quarter patch of the volume centre among the positions whose patch holds an embolus voxel
  (the patch that ``infer.score: centre`` scores on a PE patient); the others from embolus voxels of
  ``mask`` (the warped annotation), spread over the clots (connected components are visited round-robin
  in random order, then a random voxel of the clot is taken). The rest are *negative*: centres inside the
  body whose patch contains **no** embolus voxel (we use "patch contains no emboli", the exact complement
  of the label, rather than a distance rule).
* Normals: all K centres negative, inside the body.

Why centre positives: with every positive centred on a clot (plus ``train.jitter``) a classifier learns
"an embolus near the patch centre". A small CNN trained that way scored the bank positives of test
patients 0.6-0.9 but their centre patches, which hold the same emboli off-centre, 0.15-0.45 (patch AUC
0.96, centre-patch AUC 0.61); with half the positives from the centre region its centre-patch AUC on the
CPU default's test split went from 0.56 to 0.75 (docs/method-choices.md, "Patches").

Hard negatives. Positives sit on emboli, i.e. on the central pulmonary arteries; if the negatives were drawn
uniformly from the body, "the patch is centred on a large vessel" would separate the two, and the classifier
would learn that shortcut, which says nothing at inference, where every patient's centre patch holds the
central vessels. So ``centre_fraction`` of the negatives are drawn, embolus-free, from within a quarter
patch of the volume centre (the patch that ``infer.score: centre`` scores: on normals these are the
test-time negatives themselves), and ``vessel_fraction`` of the rest from contrast-enhanced blood of the CTPA
(above ``vessel_hu``).

Patch convention (the same as MONAI ``SpatialCrop(roi_center, roi_size)``): the patch around centre ``c``
covers voxels ``[c - P // 2, c - P // 2 + P)`` per axis, padded where it leaves the volume. Centres may be
anywhere in the volume: the trainer pads (MONAI ``SpatialPad``) volumes smaller than P.

``positive`` (K,) is computed from that definition for every centre (a maximum filter of the mask over the
patch footprint), not taken from how the centre was drawn. If a PE patient has fewer embolus-free patch
positions inside the body than needed, negatives are drawn anywhere in the volume; if none exist at all,
the bank is filled with positives and a warning is printed (the positive rate then exceeds
``pos_fraction``).

The draw is seeded by ``seed`` (the CLI derives it from ``patches.seed`` and the patient id), so a
patient's bank is reproducible and independent of the other patients.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cpmn.config import add_config_arguments, resolve, schema_defaults
from cpmn.data.preprocess import read_preprocessed
from cpmn.errors import InputError, atomic_path, report

#: the ``patches:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("patches")

#: the default patch size P, for every stage that needs one when a config leaves it out
DEFAULT_PATCH: tuple[int, int, int] = tuple(DEFAULTS["size"])

#: what a preprocessed file written before it stored ``hu_window`` and ``body_threshold_hu`` was made with
#: (a record of those files, not defaults: a newer file stores its own settings)
_FORMER_FILE_SETTINGS = {"hu_window": (-1000.0, 600.0), "body_threshold_hu": -500.0}


def patient_seed(patient_id: str, seed: int = 0) -> int:
    """A stable 63-bit seed from the config seed and the patient id (independent of Python's hash salt)."""
    digest = hashlib.sha256(f"{int(seed)}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def contains_embolus(mask: np.ndarray, size) -> np.ndarray:
    """(X, Y, Z) bool: does the patch of ``size`` (3,) centred on each voxel contain an embolus voxel?

    ``scipy.ndimage.maximum_filter`` with the default origin covers offsets ``[-P//2, P - P//2)``, which is
    exactly the patch ``[c - P//2, c - P//2 + P)``; outside the volume counts as background.
    """
    return ndimage.maximum_filter(mask > 0, size=tuple(int(s) for s in size), mode="constant", cval=0)


def _stored_window(npz: Mapping[str, Any]) -> tuple[float, float]:
    """The HU window the preprocessed arrays were scaled with (older files: the former default)."""
    lo, hi = npz["hu_window"] if "hu_window" in npz else _FORMER_FILE_SETTINGS["hu_window"]
    return float(lo), float(hi)


def body_from_npz(npz: Mapping[str, Any]) -> np.ndarray:
    """Body mask on the stored grid, bool (X, Y, Z): the stored ``body`` (NCT above the body threshold in
    HU, written by preprocess), or for an older file the window-normalised NCT above that threshold."""
    if "body" in npz:
        body = np.asarray(npz["body"]) > 0
        return body if body.any() else np.ones(body.shape, dtype=bool)
    lo, hi = _stored_window(npz)
    former = _FORMER_FILE_SETTINGS["body_threshold_hu"]
    thr_hu = float(npz["body_threshold_hu"]) if "body_threshold_hu" in npz else former
    body = np.asarray(npz["nct"]) > (thr_hu - lo) / (hi - lo)
    return body if body.any() else np.ones(body.shape, dtype=bool)


def blood_pool_from_npz(npz: Mapping[str, Any], vessel_hu: float) -> np.ndarray:
    """Contrast-enhanced blood on the stored grid: CTPA above ``vessel_hu`` (window-normalised), bool."""
    lo, hi = _stored_window(npz)
    if "ctpa" not in npz:
        return np.zeros(np.shape(npz["nct"]), dtype=bool)
    return np.asarray(npz["ctpa"]) > (float(vessel_hu) - lo) / (hi - lo)


def _pick(rng: np.random.Generator, candidates: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows of ``candidates`` (M, 3): without replacement where possible."""
    idx = rng.choice(len(candidates), size=n, replace=n > len(candidates))
    return candidates[np.sort(idx)] if n <= len(candidates) else candidates[idx]


def extract_patch_bank(
    npz: Mapping[str, Any] | str | os.PathLike, params: dict[str, Any] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Patch centres for one preprocessed patient.

    ``npz`` is a preprocessed file or its loaded mapping (needs ``nct``, ``mask``, ``label``). Returns
    ``centres`` (K, 3) int64, ``positive`` (K,) bool (patch contains embolus voxels) and ``size`` (3,) int64.
    """
    p = {**DEFAULTS, **(params or {})}
    if not isinstance(npz, Mapping) and not hasattr(npz, "files"):
        with np.load(npz) as f:
            npz = {k: f[k] for k in f.files}
    size = np.asarray(p["size"], dtype=np.int64)
    k = int(p["per_patient"])
    mask = np.asarray(npz["mask"]) > 0
    label = int(npz["label"])
    rng = np.random.default_rng(seed)
    contains = contains_embolus(mask, size)
    body = body_from_npz(npz)

    near = np.zeros(mask.shape, dtype=bool)  # within a quarter patch of the volume centre
    half = [max(1, int(n) // 4) for n in size]
    mid = [int(n) // 2 for n in mask.shape]
    near[tuple(slice(max(0, c - h), c + h + 1) for c, h in zip(mid, half, strict=True))] = True

    n_pos = int(round(k * float(p["pos_fraction"]))) if label == 1 and mask.any() else 0
    parts = []
    if n_pos:
        central_pos = np.argwhere(contains & near)
        n_cpos = min(int(round(n_pos * float(p["centre_pos_fraction"]))), len(central_pos))
        if n_cpos:
            parts.append(_pick(rng, central_pos, n_cpos))
        n_on = n_pos - n_cpos
        lab, n_clots = ndimage.label(mask)
        order = rng.permutation(n_clots) + 1
        per_clot = np.bincount(np.arange(n_on) % n_clots, minlength=n_clots)
        for clot, n in zip(order, per_clot, strict=False):
            if n:
                parts.append(_pick(rng, np.argwhere(lab == clot), int(n)))
    n_neg = k - n_pos
    free = ~contains
    if n_neg:
        central = np.argwhere(free & near)
        n_central = min(int(round(n_neg * float(p["centre_fraction"]))), len(central))
        if n_central:
            parts.append(_pick(rng, central, n_central))
            n_neg -= n_central
        vessel = np.argwhere(free & body & blood_pool_from_npz(npz, p["vessel_hu"]))
        n_vessel = min(int(round(n_neg * float(p["vessel_fraction"]))), len(vessel))
        if n_vessel:
            parts.append(_pick(rng, vessel, n_vessel))
            n_neg -= n_vessel
    if n_neg:
        candidates = np.argwhere(free & body)
        if len(candidates) < n_neg:
            candidates = np.argwhere(free)
        if len(candidates) == 0:
            print(
                f"WARNING no embolus-free patch of size {size.tolist()} exists; bank filled with positives",
                file=sys.stderr,
            )
            candidates = np.argwhere(mask)
        parts.append(_pick(rng, candidates, n_neg))
    centres = np.concatenate(parts, axis=0).astype(np.int64) if parts else np.zeros((0, 3), np.int64)
    positive = contains[tuple(centres.T)].astype(bool)
    return {"centres": centres, "positive": positive, "size": size}


def check_preprocessed(pid: str, path: str | os.PathLike, npz: Mapping[str, Any]) -> None:
    """The arrays a patch bank is drawn from agree: every volume on the ``nct`` grid, ``label`` 0 or 1,
    and a PE patient's mask not empty (it would give a bank without a positive patch).

    Raises:
        InputError: naming the patient and the file.
    """
    shape = np.shape(npz["nct"])
    for key in ("mask", "ctpa", "body"):
        if key in npz and np.shape(npz[key]) != shape:
            raise InputError(pid, path, f"{key} shape {np.shape(npz[key])} differs from nct {shape}")
    label = np.asarray(npz["label"])
    if label.size != 1 or label.item() not in (0, 1):
        raise InputError(pid, path, f"label must be 0 or 1, got {label.tolist()}")
    if int(label.item()) == 1 and not np.any(np.asarray(npz["mask"]) > 0):
        raise InputError(pid, path, "label is 1 (PE) but the embolus mask is empty")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preprocessed", required=True, help="preprocessed patient .npz")
    parser.add_argument("--out", required=True, help="output .npz (centres, positive, size)")
    parser.add_argument("--patient", default=None, help="patient id for the seed (default: the file stem)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = {**DEFAULTS, **resolve(args, "patches")}
    path = Path(args.preprocessed)
    pid = args.patient or path.name.removesuffix(".npz")
    try:
        npz = read_preprocessed(pid, path, ("nct", "mask", "label"), optional=None)
        check_preprocessed(pid, path, npz)
        bank = extract_patch_bank(npz, params, patient_seed(pid, params["seed"]))
    except InputError as err:
        return report(err)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **bank)
    print(f"{pid}: {len(bank['centres'])} centres, {int(bank['positive'].sum())} positive")
    return 0
