"""The FUMPE dataset's layout: per-patient CTPA DICOM folders and MATLAB embolus masks.

FUMPE (Masoudi et al., Sci. Data 2018; CC BY 4.0, doi 10.6084/m9.figshare.c.4107803) holds 35 PE patients::

    CT_scans/PAT001/*.dcm   one CTPA series per patient
    GroundTruth/PAT001.mat  the embolus mask, (rows, columns, slices) like the series' pixel arrays

A scan is read into ``(rows, columns, slices)`` HU with its slices in InstanceNumber order, the order of the
mask's third axis. The mask is read with ``scipy.io.loadmat`` (MATLAB v5) or ``h5py`` (v7.3, HDF5; MATLAB
stores arrays column-major, so the HDF5 dataset's axes are reversed). A mask whose shape is not the series'
is an :class:`~cpmn.errors.InputError` naming the patient and the file.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pydicom
import scipy.io

from cpmn.errors import InputError

#: variable names tried first in a mask file (otherwise its only array)
MASK_NAMES = ("Mask", "mask", "GroundTruth", "gt", "GT")


def fumpe_patients(root: str | Path) -> list[str]:
    """The patient ids of a FUMPE folder: the ``CT_scans/PAT*`` folders that have ``GroundTruth/<id>.mat``."""
    root = Path(root)
    scans = root / "CT_scans"
    if not scans.is_dir():
        raise InputError(None, scans, "not a FUMPE folder (no CT_scans/)")
    return sorted(
        p.name
        for p in scans.glob("PAT*")
        if p.is_dir() and (root / "GroundTruth" / f"{p.name}.mat").is_file()
    )


def read_series(folder: str | Path, patient: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One CT series folder -> ``(rows, columns, slices)`` float32 HU and the voxel size (mm) per axis.

    Slices are ordered by InstanceNumber; HU = stored value x RescaleSlope + RescaleIntercept.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not files:
        raise InputError(patient, folder, "no DICOM files")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            if getattr(ds, "Modality", "CT") != "CT":
                raise InputError(patient, f, f"modality {ds.Modality}, not CT")
            img = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1))
            img += float(getattr(ds, "RescaleIntercept", 0))
        except InputError:
            raise
        except Exception as err:
            raise InputError(patient, f, f"cannot read DICOM ({type(err).__name__}: {err})") from err
        slices.append((int(getattr(ds, "InstanceNumber", len(slices) + 1)), img, ds))
    slices.sort(key=lambda s: s[0])
    shapes = {s[1].shape for s in slices}
    if len(shapes) != 1:
        raise InputError(patient, folder, f"slices of different sizes {sorted(shapes)}")
    vol = np.stack([s[1] for s in slices], axis=-1)
    ds0 = slices[0][2]
    row_mm, col_mm = (float(v) for v in ds0.PixelSpacing)
    if len(slices) > 1 and hasattr(ds0, "ImagePositionPatient"):
        a, b = (np.array(s[2].ImagePositionPatient, float) for s in slices[:2])
        z_mm = float(np.linalg.norm(b - a)) or float(getattr(ds0, "SliceThickness", 1.0))
    else:
        z_mm = float(getattr(ds0, "SliceThickness", 1.0))
    return vol, (row_mm, col_mm, z_mm)


def read_mask(path: str | Path, patient: str) -> np.ndarray:
    """A FUMPE ``.mat`` mask -> ``(rows, columns, slices)`` bool (v5 via scipy, v7.3 via h5py)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(patient, path, "no mask file")
    try:
        if h5py.is_hdf5(path):  # MATLAB v7.3
            with h5py.File(path, "r") as fh:
                names = [k for k in fh if isinstance(fh[k], h5py.Dataset) and not k.startswith("#")]
                arrays = {k: np.asarray(fh[k]).T for k in names}  # column-major -> (rows, cols, slices)
        else:
            arrays = {
                k: np.asarray(v)
                for k, v in scipy.io.loadmat(path).items()
                if not k.startswith("__") and isinstance(v, np.ndarray)
            }
    except Exception as err:  # scipy's MatReadError, h5py's OSError, a truncated or foreign file
        raise InputError(patient, path, f"cannot read the MATLAB mask ({type(err).__name__}: {err})") from err
    name = next((n for n in MASK_NAMES if n in arrays), None)
    if name is None:
        if len(arrays) != 1:
            raise InputError(patient, path, f"expected one mask array, found {sorted(arrays) or 'none'}")
        name = next(iter(arrays))
    mask = arrays[name]
    if mask.ndim != 3:
        raise InputError(
            patient, path, f"mask {name!r} has shape {mask.shape}, expected (rows, columns, slices)"
        )
    return mask > 0


def read_fumpe_patient(
    root: str | Path, patient: str
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(hu, mask, voxel_mm)`` of one FUMPE patient; the mask must have the series' shape."""
    root = Path(root)
    hu, voxel = read_series(root / "CT_scans" / patient, patient)
    mat = root / "GroundTruth" / f"{patient}.mat"
    mask = read_mask(mat, patient)
    if mask.shape != hu.shape:
        raise InputError(
            patient,
            mat,
            f"mask shape {mask.shape} does not match the series {hu.shape} (rows, columns, slices)",
        )
    return hu, mask, voxel
