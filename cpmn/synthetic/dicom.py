"""The phantom's DICOM writer: one CT Image Storage file per axial slice of a HU volume.

Geometry: the input ``affine`` is a nibabel world affine (RAS+, mm) of voxel ``(x, y, z)`` = ``(i, j, k)``.
DICOM patient space is LPS, so the writer uses ``LPS = diag(-1, -1, 1, 1) @ affine``. In slice ``k`` the
pixel at (row ``r``, column ``c``) is voxel ``(i=c, j=r, k)``, i.e. the stored frame is ``volume[:, :, k].T``:

- ImageOrientationPatient = (unit step of increasing column ``LPS[:3, 0]``, of increasing row ``LPS[:3, 1]``)
- PixelSpacing = (row spacing = ``|LPS[:3, 1]|``, column spacing = ``|LPS[:3, 0]|``)
- ImagePositionPatient(k) = ``LPS @ (0, 0, k, 1)``

dcm2niix (and nibabel) then recover exactly ``affine`` up to an axis flip/permutation of the voxel grid.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from cpmn import __version__

#: stored value = HU - RESCALE_INTERCEPT (RescaleSlope = 1)
RESCALE_INTERCEPT = -1024.0

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def dicom_date(date: str | _dt.date) -> str:
    """``YYYYMMDD`` from an ISO date (``2021-03-04``), a compact date (``20210304``) or a ``date``."""
    if isinstance(date, _dt.date):
        return date.strftime("%Y%m%d")
    s = str(date).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return _dt.datetime.strptime(s[:10] if fmt == "%Y-%m-%d" else s[:8], fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    raise ValueError(f"not a date: {date!r} (expected YYYY-MM-DD or YYYYMMDD)")


def _ds(x: float) -> str:
    """A DICOM DS string (at most 16 characters)."""
    s = f"{float(x):.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s[:16]


def write_series(
    volume_hu: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    patient_id: str,
    study_date: str,
    series_description: str,
    series_number: int,
    study_uid: str,
    rng: np.random.Generator,
    uid_prefix_seed: str | int,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    slice_thickness: float | None = None,
) -> list[Path]:
    """Write ``volume_hu`` as one DICOM series (one file per z-slice) into ``out_dir``.

    Args:
        volume_hu: (X, Y, Z) array of HU values in nibabel voxel order.
        affine: (4, 4) RAS+ world affine of voxel (x, y, z), mm.
        out_dir: folder to write into (created; other series may already live there).
        patient_id: pseudonymous PatientID; PatientName and PatientBirthDate are written empty.
        study_date: ISO ``YYYY-MM-DD`` or compact ``YYYYMMDD``.
        series_description, series_number: SeriesDescription / SeriesNumber.
        study_uid: StudyInstanceUID shared by the patient's series.
        rng: numpy Generator; only used to draw the shuffled file names.
        uid_prefix_seed: seed of the deterministic Series/SOP/FrameOfReference UIDs.
        modality: DICOM Modality (``CT`` for the phantom; tests write ``MR`` to exercise rejection).
        image_type: ImageType values (e.g. ``("ORIGINAL", "PRIMARY", "LOCALIZER")`` for a scout).
        slice_thickness: SliceThickness in mm; defaults to the slice spacing.

    Returns:
        The written paths, in slice order (k = 0 .. Z-1).
    """
    vol = np.asarray(volume_hu)
    if vol.ndim != 3:
        raise ValueError(f"volume_hu must be (X, Y, Z), got shape {vol.shape}")
    aff = np.asarray(affine, dtype=float)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {aff.shape}")
    nx, ny, nz = vol.shape
    lps = _LPS @ aff
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy, dz = (float(np.linalg.norm(v)) for v in (col_step, row_step, slice_step))
    iop = np.concatenate([col_step / dx, row_step / dy])
    thickness = dz if slice_thickness is None else float(slice_thickness)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = dicom_date(study_date)
    seed = str(uid_prefix_seed)
    series_uid = generate_uid(entropy_srcs=[seed, "series", str(series_number), study_uid])
    for_uid = generate_uid(entropy_srcs=[seed, "frame-of-reference", study_uid])

    stored = np.clip(np.rint(vol - RESCALE_INTERCEPT), -32768, 32767).astype(np.int16)
    names = [f"IM_{rng.integers(0, 2**63, dtype=np.int64):016x}.dcm" for _ in range(nz)]
    paths: list[Path] = []
    for k in range(nz):
        sop_uid = generate_uid(entropy_srcs=[seed, "sop", str(series_number), study_uid, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = generate_uid(entropy_srcs=["cpmn", __version__])
        meta.ImplementationVersionName = f"CPMN_{__version__}"[:16]

        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(image_type)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = date
        ds.SeriesDate = date
        ds.ContentDate = date
        ds.StudyTime = "120000"
        ds.SeriesTime = f"12{int(series_number) % 60:02d}00"
        ds.ContentTime = ds.SeriesTime
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "cpmn-synthetic"
        ds.ManufacturerModelName = "synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CHEST"
        ds.SeriesDescription = series_description
        ds.PatientName = ""
        ds.PatientID = str(patient_id)
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds(thickness)
        ds.SpacingBetweenSlices = _ds(dz)
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        pos = lps @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [_ds(v) for v in pos[:3]]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(pos[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = out / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
