"""One reader of NIfTI inputs for the per-patient stages, with the errors named after patient and file."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from cpmn.errors import InputError


def load_nifti(path: str | os.PathLike, patient_id: str, what: str) -> nib.Nifti1Image:
    """Open a 3-D NIfTI and decode all of its voxels once, so that a truncated ``.nii.gz`` fails here.

    nibabel reads the header lazily and antspyx (ITK) does not notice a gzip stream cut short (it fills
    the rest of the volume), so a file written only in part would otherwise flow on as a plausible image.

    Raises:
        InputError: the file is missing, unreadable or truncated, not 3-D, or holds NaN or infinite
            voxels (they would pass resampling and turn a training loss into NaN); ``what`` names the role
            (``NCT``, ``CTPA``, ``mask``) in the message.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(patient_id, p, f"{what} file does not exist")
    try:
        img = nib.load(str(p))
        data = img.get_fdata(dtype=np.float32)  # cached: img.get_fdata(dtype=np.float32) reuses it
    except Exception as exc:  # noqa: BLE001 - nibabel raises assorted types for broken files
        raise InputError(
            patient_id, p, f"cannot read {what} NIfTI ({exc.__class__.__name__}: {exc})"
        ) from exc
    if img.ndim != 3:
        raise InputError(patient_id, p, f"{what} must be a 3D image, got shape {img.shape}")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputError(patient_id, p, f"{what} has {bad} non-finite (NaN or infinite) voxels")
    return img
