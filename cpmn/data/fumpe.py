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
import scipy.io

from cpmn.data.dicomio import iter_files, read_header, read_hu_slice
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

    The files are checked as ``cpmn convert`` checks them (:func:`cpmn.data.dicomio.read_header`: corrupt or
    truncated DICOM and a modality other than CT are errors; DICOMDIR and reports are skipped). Slices are
    ordered by InstanceNumber, the order of the mask's third axis.
    """
    folder = Path(folder)
    heads = [h for f in iter_files([folder], patient) if not isinstance(h := read_header(f, patient), str)]
    if not heads:
        raise InputError(patient, folder, "no DICOM images")
    heads.sort(key=lambda h: (h.instance is None, h.instance or 0))
    shapes = {(h.rows, h.cols) for h in heads}
    if len(shapes) != 1:
        raise InputError(patient, folder, f"slices of different sizes {sorted(shapes)}")
    vol = np.stack([read_hu_slice(h) for h in heads], axis=-1)
    row_mm, col_mm = heads[0].pixel_spacing
    z_mm = float(np.linalg.norm(heads[1].ipp - heads[0].ipp)) if len(heads) > 1 else 0.0
    return vol, (row_mm, col_mm, z_mm or float(heads[0].thickness or 1.0))


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
