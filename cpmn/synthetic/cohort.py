"""The synthetic dual-phase cohort: per patient an NCT and a CTPA DICOM series (sometimes a localizer or a
thick-slice reconstruction too), the embolus annotation on the CTPA grid, the hidden truth (mask on the NCT
grid, displacement field, truth.json), the cohort sheet, a synthetic reader study and a montage.

Seeds: the cohort plan (labels, study dates) comes from ``SeedSequence([seed, PLAN_KEY])``; patient ``i``
(0-based) draws everything from ``SeedSequence([seed, i])``, so one patient can be regenerated alone with
:func:`generate_patient` and the same seed always gives byte-identical pixel data.

Grids: the NCT grid has the configured ``shape`` and ``spacing`` and is centred on world 0; its affine is
LAS (``diag(-sx, sy, sz)``), the orientation dcm2niix reports for an ordinary axial series. The CTPA grid
has the same shape and spacing, shifted by a few mm (a different table position). Each series is written
so that ``dcm2niix`` returns exactly the grid's array and affine, so the CTPA mask NIfTI shares the affine
of the converted CTPA series voxel for voxel.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from pydicom.uid import generate_uid

from cpmn.config import schema_defaults
from cpmn.errors import InputError
from cpmn.synthetic import anatomy as A
from cpmn.synthetic import physics as P
from cpmn.synthetic.dicom import write_series
from cpmn.synthetic.montage import write_montage

#: the ``synthetic:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("synthetic")

PLAN_KEY = 2**31 - 1
DISPLACEMENT_CONVENTION = (
    "u(y) = T(y) - y in mm (RAS+ world components, last axis = x, y, z) on the CTPA grid (affine of the "
    "NIfTI). The CTPA voxel at world y shows the anatomy found at world y + u(y) in the NCT; "
    "T = rigid o nonrigid. To map a CTPA-space point to NCT space add u; the NCT->CTPA direction needs "
    "the inverse."
)


def resolve_params(params: dict | None) -> dict:
    """Defaults merged with ``params``; raises :class:`InputError` for values that cannot work."""
    p = dict(DEFAULTS)
    p.update(params or {})
    bad = None
    if int(p["patients"]) < 1:
        bad = "synthetic.patients must be >= 1"
    elif len(p["shape"]) != 3 or min(p["shape"]) < 8:
        bad = f"synthetic.shape must be 3 sizes >= 8, got {p['shape']}"
    elif len(p["spacing"]) != 3 or min(p["spacing"]) <= 0:
        bad = f"synthetic.spacing must be 3 positive numbers, got {p['spacing']}"
    elif len(p["years"]) < 1:
        bad = "synthetic.years is empty"
    elif not 0 <= float(p["pe_fraction"]) <= 1:
        bad = "synthetic.pe_fraction must be in [0, 1]"
    elif p["clots_per_patient"][0] < 1 or p["clots_per_patient"][1] < p["clots_per_patient"][0]:
        bad = f"synthetic.clots_per_patient must be [lo >= 1, hi >= lo], got {p['clots_per_patient']}"
    if bad:
        raise InputError(None, "synthetic config", bad)
    return p


def patient_id(index: int) -> str:
    return f"SYN{index + 1:04d}"


def plan_cohort(params: dict) -> pd.DataFrame:
    """Labels and study dates: ``patient_index, patient_id, label, study_date``.

    PE and normal patients are each spread round-robin over the years, so that every year (the last
    one is the test year) holds both classes whenever there are at least as many of each as years.
    """
    p = resolve_params(params)
    n = int(p["patients"])
    rng = np.random.default_rng(np.random.SeedSequence([int(p["seed"]), PLAN_KEY]))
    n_pe = int(round(float(p["pe_fraction"]) * n))
    if 0 < float(p["pe_fraction"]) < 1 and n >= 2:
        n_pe = min(max(n_pe, 1), n - 1)
    years = [int(y) for y in p["years"]]
    labels = np.array([1] * n_pe + [0] * (n - n_pe))
    yr = np.empty(n, dtype=int)
    for lab in (1, 0):
        idx = np.flatnonzero(labels == lab)
        off = int(rng.integers(len(years)))
        yr[idx] = [years[(off + k) % len(years)] for k in range(len(idx))]
    order = rng.permutation(n)
    labels, yr = labels[order], yr[order]
    dates = []
    for y in yr:
        start = dt.date(int(y), 1, 1)
        days = (dt.date(int(y) + 1, 1, 1) - start).days
        dates.append((start + dt.timedelta(days=int(rng.integers(days)))).isoformat())
    return pd.DataFrame(
        {
            "patient_index": np.arange(n),
            "patient_id": [patient_id(i) for i in range(n)],
            "label": labels.astype(int),
            "study_date": dates,
        }
    )


def grids(p: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """NCT and CTPA affines (LAS, centred on world 0; CTPA shifted by a few mm)."""
    shape = np.array(p["shape"], int)
    sp = np.array(p["spacing"], float)
    nct = np.diag([-sp[0], sp[1], sp[2], 1.0])
    nct[:3, 3] = -(nct[:3, :3] @ ((shape - 1) / 2))
    ctpa = nct.copy()
    ctpa[:3, 3] += rng.uniform(-1, 1, 3) * np.array([3.0, 3.0, 5.0])
    return nct, ctpa


def _dicom_view(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(volume, affine) for ``write_series`` such that dcm2niix (which flips rows) returns ``vol``."""
    ny = vol.shape[1]
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, ny - 1
    return np.ascontiguousarray(vol[:, ::-1, :]), affine @ flip


def _save_nifti(
    arr: np.ndarray, affine: np.ndarray, path: Path, intent: str | None = None, dtype=None
) -> None:
    img = nib.Nifti1Image(arr, affine)
    if dtype is not None:  # stored scaled (scl_slope), read back as float by get_fdata
        img.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if intent:
        img.header.set_intent(intent)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _series_plan(rng: np.random.Generator, p: dict, sz: float) -> dict:
    informative = bool(rng.uniform() >= float(p["uninformative_description_fraction"]))
    extra = None
    if rng.uniform() < float(p["extra_series_fraction"]):
        extra = "localizer" if rng.uniform() < 0.5 else "thick"
    swap = bool(rng.uniform() < 0.2)
    sp = f"{sz:g}mm"
    if informative:
        desc = {"nct": f"NCT chest non-contrast {sp}", "ctpa": f"CTPA pulmonary angio {sp}"}
    else:
        desc = {"nct": f"Chest {sp}", "ctpa": f"Chest {sp}"}
    desc["localizer"] = "Localizer" if informative else "Topogram 0.6 T20f"
    desc["thick"] = f"Chest {2 * sz:g}mm thick" if informative else f"Chest {2 * sz:g}mm"
    numbers = {"localizer": 1, "nct": 4 if swap else 2, "thick": 3, "ctpa": 2 if swap else 4}
    return {"informative": informative, "extra": extra, "desc": desc, "numbers": numbers}


def generate_patient(
    out_dir: str | Path,
    params: dict | None,
    index: int,
    *,
    plan: pd.DataFrame | None = None,
    write: bool = True,
    keep_arrays: bool = False,
) -> dict:
    """Generate patient ``index`` (0-based) of the cohort described by ``params``.

    Args:
        out_dir: cohort folder (``dicom/``, ``masks/``, ``truth/`` are written below it).
        params: the ``synthetic`` config section (missing keys take :data:`DEFAULTS`).
        index: patient index; the patient's randomness is ``SeedSequence([seed, index])``.
        plan: the cohort plan (:func:`plan_cohort`), recomputed when omitted.
        write: write files (False: only compute, e.g. for tests).
        keep_arrays: add ``arrays`` to the result: ``nct``/``ctpa`` (X, Y, Z) int16 as written,
            ``nct_clean``/``ctpa_clean`` float32 (noise-free, unblurred), ``mask_nct``/``mask_ctpa`` and
            ``lumen_nct``/``lumen_ctpa`` (X, Y, Z), ``displacement`` (X, Y, Z, 3) mm, the affines.

    Returns:
        The cohort-sheet row (``patient_id, label, study_date, nct_dicom, ctpa_dicom, ctpa_mask``), plus
        ``seconds`` and, with ``keep_arrays``, ``arrays`` and ``truth``.
    """
    t0 = time.perf_counter()
    p = resolve_params(params)
    plan = plan_cohort(p) if plan is None else plan
    row = plan.iloc[int(index)]
    pid, label, date = str(row.patient_id), int(row.label), str(row.study_date)
    seed = int(p["seed"])
    streams = np.random.SeedSequence([seed, int(index)]).spawn(8)
    r_anat, r_phys, r_tex, r_nn, r_nc, r_mot, r_dcm, r_ser = (np.random.default_rng(s) for s in streams)
    shape = tuple(int(v) for v in p["shape"])
    sp = np.array(p["spacing"], float)
    nct_aff, ctpa_aff = grids(p, r_mot)
    half = np.array(shape) * sp / 2
    an = A.sample_anatomy(
        r_anat, half, tree_generations=int(p["tree_generations"]), murray_exponent=float(p["murray_exponent"])
    )
    phases = P.sample_phases(r_phys, p)
    an.mimics = P.sample_mimics(r_phys, an)
    u, motion = P.misalignment(r_mot, ctpa_aff, shape, float(p["max_misalignment_mm"]), half[2])
    g_nct = P.make_grid(nct_aff, shape)
    g_ctpa = P.make_grid(ctpa_aff, shape, u)
    tex = P.TextureField(r_tex, nct_aff, shape)

    clots: list[P.Clot] = []
    for _attempt in range(20):
        if label:
            lo, hi = p["clots_per_patient"]
            clots = P.sample_clots(r_phys, an, p, int(r_phys.integers(lo, hi + 1)), phases["nct"]["pa"])
        blood = phases["nct"]["pa"]
        nct_clean, lumen_n, mask_n = P.render(
            an, g_nct, phases["nct"], clots, [blood + c.nct_contrast for c in clots], tex, an.mimics
        )
        ctpa_clean, lumen_c, mask_c = P.render(
            an, g_ctpa, phases["ctpa"], clots, [c.ctpa_hu for c in clots], tex, an.mimics
        )
        if not label or (mask_n.any() and mask_c.any()):
            break
    else:
        raise RuntimeError(f"patient {pid}: could not place an embolus inside the field of view")
    nct = P.scanner(nct_clean, sp, float(p["blur_sigma_mm"]), float(p["noise_sd_nct"]), r_nn)
    ctpa = P.scanner(ctpa_clean, sp, float(p["blur_sigma_mm"]), float(p["noise_sd_ctpa"]), r_nc)
    series = _series_plan(r_ser, p, float(sp[2]))

    clot_truth = []
    for c in clots:
        d = c.truth()
        clot_truth.append(d)
    truth = {
        "patient_id": pid,
        "patient_index": int(index),
        "seed": seed,
        "label": label,
        "study_date": date,
        "synthetic": True,
        "nct_grid": {"affine": nct_aff.tolist(), "shape": list(shape)},
        "ctpa_grid": {"affine": ctpa_aff.tolist(), "shape": list(shape)},
        "phase_hu": {k: {n: round(v, 2) for n, v in t.items()} for k, t in phases.items()},
        "coordinates": "world RAS+ mm = the NCT frame; NCT voxel = inv(nct_grid.affine) @ point",
        "clots": clot_truth,
        "mask_voxels": {"nct": int(mask_n.sum()), "ctpa": int(mask_c.sum())},
        "misalignment": {**motion, "convention": DISPLACEMENT_CONVENTION},
        "anatomy": an.summary(),
        "series": [],
    }
    out = Path(out_dir)
    rel = {
        "nct_dicom": f"dicom/{pid}",
        "ctpa_dicom": f"dicom/{pid}",
        "ctpa_mask": f"masks/{pid}_ctpa_mask.nii.gz",
    }
    if write:
        ddir = out / "dicom" / pid
        if ddir.exists():
            shutil.rmtree(ddir)
        study_uid = generate_uid(entropy_srcs=[str(seed), pid, "study"])
        common = {
            "patient_id": pid,
            "study_date": date,
            "study_uid": study_uid,
            "rng": r_dcm,
            "uid_prefix_seed": f"{seed}-{pid}",
        }
        todo = [("nct", nct, nct_aff, None, ("ORIGINAL", "PRIMARY", "AXIAL"))]
        todo.append(("ctpa", ctpa, ctpa_aff, None, ("ORIGINAL", "PRIMARY", "AXIAL")))
        if series["extra"] == "thick":
            nz2 = shape[2] // 2
            thick = nct[..., : 2 * nz2].reshape(shape[0], shape[1], nz2, 2).mean(-1)
            aff = nct_aff.copy()
            aff[:3, 2] *= 2
            aff[:3, 3] += nct_aff[:3, 2] / 2
            todo.append(
                (
                    "thick",
                    np.rint(thick).astype(np.int16),
                    aff,
                    2 * float(sp[2]),
                    ("DERIVED", "SECONDARY", "AXIAL"),
                )
            )
        elif series["extra"] == "localizer":
            proj = nct_clean.mean(axis=1)[:, ::-1]  # (X, Z): rows from superior to inferior
            img = np.rint(proj)[:, :, None].astype(np.int16)
            aff = np.zeros((4, 4))
            aff[:3, 0] = nct_aff[:3, 0]
            aff[:3, 1] = -nct_aff[:3, 2]
            aff[:3, 2] = [0.0, float(sp[1]), 0.0]
            aff[:3, 3] = nct_aff[:3, 3] + nct_aff[:3, 2] * (shape[2] - 1)
            aff[1, 3] = 0.0
            aff[3, 3] = 1.0
            todo.append(("localizer", img, aff, float(sp[1]), ("ORIGINAL", "PRIMARY", "LOCALIZER")))
        for role, vol, aff, thick_mm, itype in todo:
            if role in ("nct", "ctpa"):
                v, a = _dicom_view(vol, aff)
            else:
                v, a = _dicom_view(vol, aff) if role == "thick" else (vol, aff)
            files = write_series(
                v,
                a,
                ddir,
                series_description=series["desc"][role],
                series_number=series["numbers"][role],
                image_type=itype,
                slice_thickness=thick_mm,
                **common,
            )
            truth["series"].append(
                {
                    "role": role,
                    "series_number": series["numbers"][role],
                    "series_description": series["desc"][role],
                    "image_type": list(itype),
                    "files": len(files),
                    "slice_thickness_mm": thick_mm if thick_mm else float(sp[2]),
                    "informative_description": series["informative"],
                    "use": role in ("nct", "ctpa"),
                }
            )
        _save_nifti(mask_c.astype(np.uint8), ctpa_aff, out / rel["ctpa_mask"])
        tdir = out / "truth" / pid
        _save_nifti(mask_n.astype(np.uint8), nct_aff, tdir / "mask_nct.nii.gz")
        _save_nifti(lumen_n.astype(np.uint8), nct_aff, tdir / "lumen_nct.nii.gz")  # the ceiling observer's
        _save_nifti(u, ctpa_aff, tdir / "displacement.nii.gz", intent="vector", dtype=np.int16)
        with open(tdir / "truth.json", "w") as fh:
            json.dump(truth, fh, indent=1)
    result = {"patient_id": pid, "label": label, "study_date": date, **rel}
    result["seconds"] = time.perf_counter() - t0
    if keep_arrays:
        result["truth"] = truth
        result["arrays"] = {
            "nct": nct,
            "ctpa": ctpa,
            "nct_clean": nct_clean,
            "ctpa_clean": ctpa_clean,
            "mask_nct": mask_n,
            "mask_ctpa": mask_c,
            "lumen_nct": lumen_n,
            "lumen_ctpa": lumen_c,
            "displacement": u,
            "nct_affine": nct_aff,
            "ctpa_affine": ctpa_aff,
            "anatomy": an,
            "clots": clots,
            "phases": phases,
        }
    return result


# --------------------------------------------------------------------------------------------------
# readers


READER_MODEL = (
    "Synthetic readers (not real radiologists). Reader r has a base NCT sensitivity s_r ~ U(0.25, 0.45) and "
    "a specificity sp_r ~ U(0.90, 0.95). For a PE patient the detection probability is "
    "min(0.95, s_r + 0.15 [a visible clot is central, generation 1] + 0.05 min(1, largest visible clot "
    "radius / 8 mm)), halved when every clot is occult in NCT (zero contrast); a normal patient is called "
    "positive with probability 1 - sp_r. Decisions are Bernoulli draws from SeedSequence([seed, 2**31 - 2]), "
    "drawn for every patient; readers.tsv keeps those of the last year's patients (the temporal test "
    "set), as in a reader study of the test scans."
)


def synthetic_readers(truths: list[dict], n_readers: int, seed: int) -> pd.DataFrame:
    """Reader decisions ``reader, patient_id, decision`` under :data:`READER_MODEL`."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), PLAN_KEY - 1]))
    rows = []
    for r in range(n_readers):
        sens, spec = rng.uniform(0.25, 0.45), rng.uniform(0.90, 0.95)
        for t in truths:
            if t["label"]:
                vis = [c for c in t["clots"] if not c["occult_in_nct"]]
                if vis:
                    central = any(c["generation"] <= 1 for c in vis)
                    big = max(c["radius_mm"] for c in vis)
                    pr = min(0.95, sens + 0.15 * central + 0.05 * min(1.0, big / 8.0))
                else:
                    pr = sens / 2
            else:
                pr = 1 - spec
            rows.append(
                {
                    "reader": f"synthetic_reader_{r + 1}",
                    "patient_id": t["patient_id"],
                    "decision": int(rng.uniform() < pr),
                }
            )
    return pd.DataFrame(rows, columns=["reader", "patient_id", "decision"])


# --------------------------------------------------------------------------------------------------
# the cohort


def _generate_one(args: tuple) -> dict:
    """``generate_patient`` for a process pool: ``args`` = (out_dir, params, index, plan)."""
    out_dir, params, index, plan = args
    return generate_patient(out_dir, params, index, plan=plan)


def generate_cohort(
    out_dir: str | Path, params: dict | None = None, *, progress: bool = False, jobs: int = 1
) -> pd.DataFrame:
    """Write the whole synthetic cohort into ``out_dir`` (layout: docs/contracts.md, ``synthetic``).

    Everything is generated in a temporary sibling folder and moved into place at the end, so a failure
    leaves no partial output. Returns the cohort sheet (``patient_id, label, study_date, nct_dicom,
    ctpa_dicom, ctpa_mask``) with an extra ``seconds`` column (generation time per patient).
    ``jobs`` > 1 generates patients in that many processes; every patient has its own seed, so the output
    is the same whatever ``jobs`` is.
    """
    p = resolve_params(params)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        plan = plan_cohort(p)
        rows, truths = [], []
        if jobs > 1:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                results = list(pool.map(_generate_one, [(tmp, p, i, plan) for i in range(len(plan))]))
        else:
            results = (generate_patient(tmp, p, i, plan=plan) for i in range(len(plan)))
        for res in results:
            rows.append(res)
            truths.append(json.loads((tmp / "truth" / res["patient_id"] / "truth.json").read_text()))
            if progress:
                print(f"{res['patient_id']} label={res['label']} {res['seconds']:.2f}s", flush=True)
        sheet = pd.DataFrame(rows)
        cols = ["patient_id", "label", "study_date", "nct_dicom", "ctpa_dicom", "ctpa_mask"]
        sheet[cols].to_csv(tmp / "cohort.tsv", sep="\t", index=False)
        readers = synthetic_readers(truths, int(p["readers"]), int(p["seed"]))
        test_year = sheet.study_date.str[:4].max()  # cpmn split: the latest year is the test set
        readers = readers[readers.patient_id.isin(sheet.patient_id[sheet.study_date.str[:4] == test_year])]
        readers.to_csv(tmp / "readers.tsv", sep="\t", index=False)
        _write_readme(tmp, p, sheet)
        if p["montage"]:
            plan = plan_cohort(p)
            picks = [int(sheet.index[sheet.label == lab][0]) for lab in (1, 0) if (sheet.label == lab).any()]
            cases = [generate_patient(tmp, p, i, plan=plan, write=False, keep_arrays=True) for i in picks]
            write_montage(cases, tmp / "montage.png")
        out.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            dest = out / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            os.replace(item, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return sheet


def _write_readme(d: Path, p: dict, sheet: pd.DataFrame) -> None:
    n_pe = int(sheet.label.sum())
    txt = [
        "# Synthetic dual-phase chest CT cohort (cpmn synthetic) - NOT patient data",
        "",
        f"{len(sheet)} patients ({n_pe} PE, {len(sheet) - n_pe} normal), seed {p['seed']}, "
        f"shape {p['shape']}, spacing {p['spacing']} mm, years {p['years']}.",
        "",
        "- cohort.tsv: patient_id, label, study_date, nct_dicom, ctpa_dicom, ctpa_mask (relative paths).",
        "- dicom/{pid}/: NCT and CTPA series (some patients also a localizer or a thick-slice NCT).",
        "- masks/{pid}_ctpa_mask.nii.gz: embolus annotation on the CTPA grid.",
        "- truth/{pid}/: mask_nct.nii.gz, lumen_nct.nii.gz, displacement.nii.gz, truth.json (hidden truth,"
        " scoring and the ceiling observer only).",
        f"- displacement: {DISPLACEMENT_CONVENTION}",
        f"- readers.tsv: {READER_MODEL}",
        "",
    ]
    (d / "README.md").write_text("\n".join(txt))
