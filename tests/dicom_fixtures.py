"""Tiny synthetic chest series for the convert/screen tests, written with the phantom's DICOM writer.

A (48, 48, 24) volume: a body ellipse at 0 HU, two lungs at -850 HU, and a mediastinal "blood pool" disk
(40 HU without contrast, 400 HU with) centred left-right and 42 % of the way back from the anterior skin.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from cpmn.synthetic.dicom import write_series

SHAPE = (48, 48, 24)
#: RAS affine: x and y flipped (what scanners store), 5 x 5 x 6 mm voxels
AFFINE = np.array([[-5.0, 0, 0, 120.0], [0, -5.0, 0, 110.0], [0, 0, 6.0, -70.0], [0, 0, 0, 1]])
STUDY_UID = "1.2.826.0.1.3680043.8.498.77"
NCT_HU, CTPA_HU = 40.0, 400.0

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "data" / "real"


#: the default embolus box of :func:`write_mask`; in the CTPA series it is a 40 HU filling defect
CLOT_BOX = ((20, 26), (20, 26), (10, 14))


def chest_volume(blood_hu: float, shape=SHAPE, affine=AFFINE, clot_box=None) -> np.ndarray:
    """(X, Y, Z) HU phantom; the blood-pool disk is placed anterior of centre in world space; ``clot_box``
    (voxel ranges) is set to 40 HU (an embolus in the enhanced blood pool)."""
    nx, ny, nz = shape
    i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    ax, ay = 0.44 * nx, 0.32 * ny
    body = ((i - cx) / ax) ** 2 + ((j - cy) / ay) ** 2 <= 1
    sl = np.full((nx, ny), -1000.0)
    sl[body] = 0.0
    for side in (-1, 1):
        lung = ((i - (cx + side * 0.22 * nx)) / (0.14 * nx)) ** 2 + ((j - cy) / (0.22 * ny)) ** 2 <= 1
        sl[lung] = -850.0
    # anterior = +y in RAS: with a negative y step, voxel j = 0 is the anterior side
    frac = 0.42
    by = cy - ay + 2 * ay * frac if affine[1, 1] < 0 else cy + ay - 2 * ay * frac
    disk = (i - cx) ** 2 + (j - by) ** 2 <= (0.13 * nx) ** 2
    sl[disk] = blood_hu
    vol = np.repeat(sl[:, :, None], nz, axis=2)
    vol[:, :, [0, nz - 1]] = np.where(body[:, :, None], 0.0, -1000.0)  # caps without blood pool
    if clot_box is not None:
        (a, b), (c, d), (e, f) = clot_box
        vol[a:b, c:d, e:f] = 40.0
    return vol


def write_phase(
    folder: Path,
    pid: str,
    *,
    blood_hu: float,
    description: str,
    series_number: int,
    shape=SHAPE,
    affine=AFFINE,
    seed: int = 0,
    **kw,
) -> list[Path]:
    """Write one series of the chest phantom into ``folder``."""
    return write_series(
        chest_volume(blood_hu, shape, affine, kw.pop("clot_box", None)),
        affine,
        folder,
        patient_id=pid,
        study_date=kw.pop("study_date", "2021-05-06"),
        series_description=description,
        series_number=series_number,
        study_uid=kw.pop("study_uid", STUDY_UID + "." + str(abs(hash(pid)) % 10**6)),
        rng=np.random.default_rng(seed + series_number),
        uid_prefix_seed=f"{pid}-{seed}",
        **kw,
    )


def write_patient(
    folder: Path,
    pid: str,
    *,
    nct_desc: str = "Thorax plain 2.0",
    ctpa_desc: str = "CTPA 1.0",
    nct: bool = True,
    ctpa: bool = True,
    localizer: bool = False,
) -> dict[str, list[Path]]:
    """A patient folder with an NCT and a CTPA series (and optionally a 2-slice localizer)."""
    out: dict[str, list[Path]] = {}
    if nct:
        out["nct"] = write_phase(folder, pid, blood_hu=NCT_HU, description=nct_desc, series_number=2)
    if ctpa:
        out["ctpa"] = write_phase(
            folder, pid, blood_hu=CTPA_HU, description=ctpa_desc, series_number=3, clot_box=CLOT_BOX
        )
    if localizer:
        out["localizer"] = write_phase(
            folder,
            pid,
            blood_hu=0.0,
            description="Topogram",
            series_number=1,
            shape=(48, 48, 2),
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        )
    return out


def write_mask(path: Path, shape=SHAPE, affine=AFFINE, box=CLOT_BOX) -> Path:
    """uint8 mask on the CTPA grid with a box of ones (empty when ``box`` is None)."""
    m = np.zeros(shape, np.uint8)
    if box is not None:
        (a, b), (c, d), (e, f) = box
        m[a:b, c:d, e:f] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(m, affine), path)
    return path


def set_tags(paths: list[Path], **tags) -> None:
    """Rewrite header tags of written files (e.g. PatientName) in place."""
    for p in paths:
        ds = pydicom.dcmread(p)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(p)
