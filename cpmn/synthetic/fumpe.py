"""A small FUMPE-shaped set from the phantom: every patient has PE, one CTPA series and a MATLAB mask.

``cpmn synthetic --layout fumpe --out DIR`` writes ``DIR/CT_scans/PAT001/*.dcm`` (the phantom's CTPA) and
``DIR/GroundTruth/PAT001.mat`` (MATLAB v5, variable ``Mask``, ``(rows, columns, slices)`` uint8 in the
series' InstanceNumber order), the layout that :mod:`cpmn.data.fumpe` reads, so that the FUMPE 2D
experiment runs, and is tested, without the real data.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from pydicom.uid import generate_uid

from cpmn.errors import InputError, atomic_path
from cpmn.synthetic.cohort import generate_patient, resolve_params
from cpmn.synthetic.dicom import write_series


def fumpe_id(index: int) -> str:
    """FUMPE's patient folder name of patient ``index`` (0-based): PAT001, PAT002, ..."""
    return f"PAT{index + 1:03d}"


def generate_fumpe(out: str | Path, params: dict[str, Any] | None, progress: bool = False) -> list[str]:
    """Write ``params["patients"]`` PE patients of the ``synthetic`` section's phantom in FUMPE's layout.

    ``pe_fraction`` is forced to 1 (FUMPE holds PE patients only). The folder appears whole or not at all.
    Returns the patient ids.
    """
    p = resolve_params({**(params or {}), "pe_fraction": 1.0})
    out = Path(out)
    if out.exists():
        raise InputError(None, out, "exists; remove it first (the set is written whole or not at all)")
    ids = []
    with atomic_path(out) as tmp:
        try:
            for i in range(int(p["patients"])):
                pid = fumpe_id(i)
                res = generate_patient(tmp, p, i, write=False, keep_arrays=True)
                arr = res["arrays"]
                rng = np.random.default_rng([int(p["seed"]), i, 7])
                write_series(
                    arr["ctpa"],
                    arr["ctpa_affine"],
                    tmp / "CT_scans" / pid,
                    patient_id=pid,
                    study_date=res["study_date"],
                    series_description="CTPA",
                    series_number=1,
                    study_uid=generate_uid(entropy_srcs=[str(p["seed"]), pid, "fumpe"]),
                    rng=rng,
                    uid_prefix_seed=f"fumpe-{p['seed']}-{pid}",
                )
                # write_series puts voxel (x, y, z) at pixel (row y, column x) of instance z + 1
                mask = np.ascontiguousarray(arr["mask_ctpa"].astype(np.uint8).transpose(1, 0, 2))
                (tmp / "GroundTruth").mkdir(parents=True, exist_ok=True)
                scipy.io.savemat(tmp / "GroundTruth" / f"{pid}.mat", {"Mask": mask}, do_compression=True)
                ids.append(pid)
                if progress:
                    print(f"{pid}: {int(mask.sum())} embolus voxels", flush=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ids
