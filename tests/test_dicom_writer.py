"""The phantom's DICOM writer: geometry survives dcm2niix, HU survive the rescale, headers are clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cpmn.synthetic.dicom import RESCALE_INTERCEPT, dicom_date, write_series

DCM2NIIX = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which("dcm2niix")

AFFINES = {
    # RAS affine with flips on x and z, anisotropic voxels, non-zero origin
    "flip_xz": np.array([[-0.8, 0, 0, 100.0], [0, 1.2, 0, -50.0], [0, 0, -2.5, 30.0], [0, 0, 0, 1]]),
    # RAS+ as written by nibabel for a canonical volume
    "ras": np.array([[0.7, 0, 0, -10.0], [0, 0.9, 0, 20.0], [0, 0, 3.0, -200.0], [0, 0, 0, 1]]),
    # LPS-like (what a scanner usually stores): x and y flipped
    "lps": np.array([[-1.0, 0, 0, 250.0], [0, -1.0, 0, 180.0], [0, 0, 2.0, -300.0], [0, 0, 0, 1]]),
}


def _pattern(shape=(20, 16, 10)) -> np.ndarray:
    """An asymmetric volume: background -1000, a gradient, and two distinct markers."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    vol = -1000.0 + 7 * x + 3 * y + 11 * z
    vol[3, 5, 7] = 1500.0
    vol[10, 2, 1] = 900.0
    return vol


def _write(tmp_path: Path, vol: np.ndarray, affine: np.ndarray, **kw) -> list[Path]:
    args = dict(
        patient_id="PH0001",
        study_date="2021-03-04",
        series_description="CTPA 1.0",
        series_number=3,
        study_uid="1.2.826.0.1.3680043.8.498.1",
        rng=np.random.default_rng(0),
        uid_prefix_seed="seed-1",
    )
    args.update(kw)
    return write_series(vol, affine, tmp_path / "dcm", **args)


def _dcm2niix(src: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir()
    subprocess.run(
        [DCM2NIIX, "-z", "y", "-b", "y", "-ba", "y", "-f", "%s", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (nii,) = sorted(out.glob("*.nii.gz"))
    return nib.load(nii)


@pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix not installed")
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_dcm2niix_recovers_affine_and_values(tmp_path, name):
    affine = AFFINES[name]
    vol = _pattern()
    _write(tmp_path, vol, affine)
    img = _dcm2niix(tmp_path / "dcm", tmp_path / "nii")
    assert img.shape == vol.shape
    # same world grid once both are brought to the closest canonical (RAS+) orientation
    ref = nib.as_closest_canonical(nib.Nifti1Image(vol.astype(np.float32), affine))
    got = nib.as_closest_canonical(img)
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-3)
    np.testing.assert_allclose(got.get_fdata(), ref.get_fdata(), atol=0.5)
    # the marker voxels sit at the same world coordinates in the converted image
    data = img.get_fdata()
    for marker, hu in (((3, 5, 7), 1500.0), ((10, 2, 1), 900.0)):
        (idx,) = np.argwhere(np.isclose(data, hu))
        np.testing.assert_allclose(img.affine @ np.r_[idx, 1], affine @ np.r_[marker, 1], atol=1e-3)


def test_headers_and_hu_rescale(tmp_path):
    affine = AFFINES["flip_xz"]
    vol = _pattern()
    vol[0, 0, 0] = -40000.0  # clipped to the int16 range
    paths = _write(tmp_path, vol, affine, slice_thickness=3.0)
    assert len(paths) == 10 and all(p.name.startswith("IM_") and p.suffix == ".dcm" for p in paths)
    assert sorted(paths) != paths  # shuffled names
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.StudyDate == "20210304" and ds.PatientID == "PH0001"
        assert str(ds.PatientName) == "" and ds.PatientBirthDate == ""
        assert ds.InstanceNumber == k + 1 and ds.SeriesNumber == 3
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == RESCALE_INTERCEPT
        assert float(ds.SliceThickness) == 3.0 and float(ds.SpacingBetweenSlices) == 2.5
        # DICOM row spacing is the y step (1.2), column spacing the x step (0.8)
        assert [float(v) for v in ds.PixelSpacing] == [1.2, 0.8]
        # LPS: x flipped in RAS -> +L; y in RAS -> -P
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, -1, 0])
        # IPP(k) = LPS of voxel (0, 0, k): RAS (100, -50, 30 - 2.5k) -> LPS (-100, 50, 30 - 2.5k)
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-100, 50, 30 - 2.5 * k])
        assert ds.pixel_array.dtype == np.int16 and ds.pixel_array.shape == (16, 20)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        expect = np.clip(vol[:, :, k].T, -32768 + RESCALE_INTERCEPT, 32767 + RESCALE_INTERCEPT)
        np.testing.assert_allclose(hu, expect)
    assert pydicom.dcmread(paths[0]).pixel_array[0, 0] == -32768


def test_uids_deterministic_and_distinct(tmp_path):
    vol = np.zeros((6, 5, 4))
    a = [pydicom.dcmread(p) for p in _write(tmp_path / "a", vol, AFFINES["ras"])]
    b = [
        pydicom.dcmread(p) for p in _write(tmp_path / "b", vol, AFFINES["ras"], rng=np.random.default_rng(9))
    ]
    c = [pydicom.dcmread(p) for p in _write(tmp_path / "c", vol, AFFINES["ras"], series_number=4)]
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert len({d.SOPInstanceUID for d in a + c}) == 8
    assert len({d.SeriesInstanceUID for d in a}) == 1 and a[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    assert a[0].FrameOfReferenceUID == c[0].FrameOfReferenceUID
    assert all(d.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1" for d in a + c)


def test_dicom_date():
    assert dicom_date("2020-01-31") == "20200131"
    assert dicom_date("20200131") == "20200131"
    with pytest.raises(ValueError):
        dicom_date("31/01/2020")
