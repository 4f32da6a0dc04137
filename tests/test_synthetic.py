"""Tests of the synthetic dual-phase chest cohort (cpmn.synthetic): geometry through dcm2niix, determinism,
embolus truth, phase physics and the cross-phase misalignment."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cpmn.errors import InputError
from cpmn.synthetic import cohort as C
from cpmn.synthetic.anatomy import segment_distance

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "data" / "real"

#: tiny but anisotropic and non-square, so that axis mix-ups show up
TINY = {"patients": 3, "seed": 7, "pe_fraction": 0.34, "shape": [64, 60, 40], "spacing": [5.0, 5.3, 6.0]}
#: finer grid for the physics checks (vessels several voxels wide)
FINE = {"patients": 4, "seed": 14, "pe_fraction": 0.5, "shape": [96, 96, 64], "spacing": [2.5, 2.5, 2.5]}


def _dcm2niix() -> str:
    exe = Path(sys.executable).parent / "dcm2niix"
    if exe.exists():
        return str(exe)
    found = shutil.which("dcm2niix")
    if not found:
        pytest.skip("dcm2niix not installed")
    return found


def _first(plan: pd.DataFrame, label: int) -> int:
    return int(plan.index[plan.label == label][0])


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    sheet = C.generate_cohort(out, {**TINY, "montage": True})
    return out, sheet


@pytest.fixture(scope="module")
def fine_pe():
    p = dict(FINE)
    plan = C.plan_cohort(p)
    return C.generate_patient("/nonexistent", p, _first(plan, 1), plan=plan, write=False, keep_arrays=True)


def test_cohort_layout_and_sheet(tiny_cohort):
    out, sheet = tiny_cohort
    tsv = pd.read_csv(out / "cohort.tsv", sep="\t")
    assert list(tsv.columns) == ["patient_id", "label", "study_date", "nct_dicom", "ctpa_dicom", "ctpa_mask"]
    assert list(tsv.patient_id) == ["SYN0001", "SYN0002", "SYN0003"]
    assert tsv.label.sum() == 1  # round(0.34 * 3)
    for row in tsv.itertuples():
        assert (out / row.nct_dicom).is_dir() and (out / row.ctpa_mask).is_file()
        truth = json.loads((out / "truth" / row.patient_id / "truth.json").read_text())
        roles = [s["role"] for s in truth["series"]]
        assert roles[:2] == ["nct", "ctpa"]
        n_files = sum(s["files"] for s in truth["series"])
        assert len(list((out / row.nct_dicom).glob("*.dcm"))) == n_files
        assert int(row.study_date[:4]) in range(2019, 2023)
    readers = pd.read_csv(out / "readers.tsv", sep="\t")
    assert list(readers.columns) == ["reader", "patient_id", "decision"]
    last = tsv.study_date.astype(str).str[:4].max()  # the temporal test set: the readers read only these
    test_ids = set(tsv.patient_id[tsv.study_date.astype(str).str[:4] == last])
    assert 0 < len(test_ids) < len(tsv)
    assert set(readers.patient_id) == test_ids and set(readers.decision) <= {0, 1}
    assert len(readers) == 3 * len(test_ids)
    assert (out / "montage.png").stat().st_size > 10_000
    assert "synthetic" in (out / "README.md").read_text().lower()
    assert not list(out.parent.glob(".cohort.tmp*"))  # the temporary folder is gone


def test_dcm2niix_geometry_and_hu(tiny_cohort, tmp_path):
    """dcm2niix returns exactly the generator's arrays and affines (NCT, CTPA) and the mask's affine."""
    out, sheet = tiny_cohort
    pid = sheet.patient_id[0]
    truth = json.loads((out / "truth" / pid / "truth.json").read_text())
    res = C.generate_patient(out, TINY, 0, write=False, keep_arrays=True)
    a = res["arrays"]
    subprocess.run(
        [_dcm2niix(), "-z", "y", "-f", "%s", "-o", str(tmp_path), str(out / "dicom" / pid)],
        check=True,
        capture_output=True,
    )
    mask = nib.load(out / "masks" / f"{pid}_ctpa_mask.nii.gz")
    for role, vol, aff in (("nct", a["nct"], a["nct_affine"]), ("ctpa", a["ctpa"], a["ctpa_affine"])):
        num = next(s["series_number"] for s in truth["series"] if s["role"] == role)
        img = nib.load(tmp_path / f"{num}.nii.gz")
        np.testing.assert_allclose(img.affine, aff, atol=1e-3)
        assert img.shape == tuple(TINY["shape"])
        np.testing.assert_array_equal(np.asarray(img.dataobj).astype(np.int32), vol.astype(np.int32))
        if role == "ctpa":
            np.testing.assert_allclose(mask.affine, img.affine, atol=1e-3)
            assert mask.shape == img.shape
    assert truth["ctpa_grid"]["affine"] != truth["nct_grid"]["affine"]  # different table position


def test_determinism_by_seed():
    p = dict(TINY)
    one = C.generate_patient("/x", p, 1, write=False, keep_arrays=True)["arrays"]
    two = C.generate_patient("/x", p, 1, write=False, keep_arrays=True)["arrays"]
    other = C.generate_patient("/x", {**p, "seed": 8}, 1, write=False, keep_arrays=True)["arrays"]
    for k in ("nct", "ctpa", "mask_ctpa", "displacement"):
        assert one[k].tobytes() == two[k].tobytes()
    assert one["nct"].tobytes() != other["nct"].tobytes()
    assert one["ctpa"].tobytes() != other["ctpa"].tobytes()


def test_dicom_bytes_identical(tmp_path):
    p = {**TINY, "patients": 2, "extra_series_fraction": 1.0}
    for d in ("a", "b"):
        C.generate_patient(tmp_path / d, p, 0)
    fa = sorted((tmp_path / "a" / "dicom" / "SYN0001").glob("*.dcm"))
    fb = sorted((tmp_path / "b" / "dicom" / "SYN0001").glob("*.dcm"))
    assert [f.name for f in fa] == [f.name for f in fb] and len(fa) > 80  # an extra series is present
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb, strict=True))


def test_parallel_generation_is_identical(tmp_path):
    p = {**TINY, "patients": 2, "montage": False}
    a = C.generate_cohort(tmp_path / "a", p, jobs=2)
    b = C.generate_cohort(tmp_path / "b", p, jobs=1)
    assert a["patient_id"].tolist() == b["patient_id"].tolist() == ["SYN0001", "SYN0002"]
    fa = sorted(p_.relative_to(tmp_path / "a") for p_ in (tmp_path / "a").rglob("*") if p_.is_file())
    fb = sorted(p_.relative_to(tmp_path / "b") for p_ in (tmp_path / "b").rglob("*") if p_.is_file())
    assert fa == fb and len(fa) > 50
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in fa)


def test_clots_exactly_in_pe_patients_and_inside_lumen():
    p = {**TINY, "patients": 4, "pe_fraction": 0.5}
    plan = C.plan_cohort(p)
    for i, lab in enumerate(plan.label):
        r = C.generate_patient("/x", p, i, plan=plan, write=False, keep_arrays=True)
        a, t = r["arrays"], r["truth"]
        assert (a["mask_nct"].any() and a["mask_ctpa"].any()) == bool(lab)
        assert (len(t["clots"]) > 0) == bool(lab)
        if lab:
            lo, hi = p.get("clots_per_patient", [1, 5])
            assert lo <= len(t["clots"]) <= hi
            assert {c["generation"] for c in t["clots"]} <= {1, 2, 3}
        for g in ("nct", "ctpa"):
            assert not (a[f"mask_{g}"].astype(bool) & ~a[f"lumen_{g}"]).any()


def test_masks_agree_through_the_displacement(fine_pe):
    """Each CTPA clot voxel y maps (y + u(y)) onto the NCT clot: the stored convention is the one used."""
    a = fine_pe["arrays"]
    ijk = np.argwhere(a["mask_ctpa"])
    world = nib.affines.apply_affine(a["ctpa_affine"], ijk) + a["displacement"][tuple(ijk.T)]
    back = np.rint(nib.affines.apply_affine(np.linalg.inv(a["nct_affine"]), world)).astype(int)
    hit = a["mask_nct"][tuple(np.clip(back, 0, np.array(a["mask_nct"].shape) - 1).T)]
    near = ndimage.binary_dilation(a["mask_nct"])[
        tuple(np.clip(back, 0, np.array(a["mask_nct"].shape) - 1).T)
    ]
    assert hit.mean() > 0.75 and near.mean() > 0.98
    # the whole arterial lumen: with the displacement it lines up, without it clearly less so
    lum = np.argwhere(a["lumen_ctpa"])
    y = nib.affines.apply_affine(a["ctpa_affine"], lum)
    inv, top = np.linalg.inv(a["nct_affine"]), np.array(a["lumen_nct"].shape) - 1

    def agree(points):
        idx = np.clip(np.rint(nib.affines.apply_affine(inv, points)).astype(int), 0, top)
        return a["lumen_nct"][tuple(idx.T)].mean()

    u = a["displacement"][tuple(lum.T)]
    with_u, without_u, reversed_u = agree(y + u), agree(y), agree(y - u)
    assert fine_pe["truth"]["misalignment"]["max_displacement_mm"] > 4
    assert with_u > 0.78 and with_u > without_u + 0.03 and with_u > reversed_u + 0.08, (
        with_u,
        without_u,
        reversed_u,
    )


def _core(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_erosion(mask)


def _clot_core(a: dict) -> np.ndarray:
    """NCT clot voxels away from the clot surface and from the vessel wall (no partial volume)."""
    return _core(a["mask_nct"]) & _core(_core(a["lumen_nct"]))


def test_nct_clot_contrast_and_ctpa_vessel_hu(fine_pe):
    a, t = fine_pe["arrays"], fine_pe["truth"]
    blood = t["phase_hu"]["nct"]["pa"]
    assert 35 <= blood <= 50
    core = _clot_core(a)
    ijk = np.argwhere(core)
    xyz = nib.affines.apply_affine(a["nct_affine"], ijk).T
    inside = np.stack([segment_distance(*xyz, c.p0, c.p1) < c.r - 1.5 for c in a["clots"]])  # (clots, voxels)
    measured = 0
    for n, c in enumerate(a["clots"]):
        lo, hi = C.DEFAULTS["nct_clot_contrast_hu"]
        assert c.nct_contrast == 0 or lo <= c.nct_contrast <= hi
        own = inside[n] & (inside.sum(0) == 1)  # deep inside this clot and no other
        if not own.any():
            continue
        # noise-free, unblurred rendering: the clot core is exactly blood + contrast
        got = float(a["nct_clean"][tuple(ijk[own].T)].mean()) - blood
        assert got == pytest.approx(c.nct_contrast, abs=1.0)
        measured += c.nct_contrast > 0
    assert measured >= 1
    # CTPA arterial lumen (eroded, away from clots) in the noisy blurred image: the drawn enhancement
    pa = t["phase_hu"]["ctpa"]["pa"]
    assert 250 <= pa <= 550
    free = _core(_core(a["lumen_ctpa"])) & ~ndimage.binary_dilation(a["mask_ctpa"], iterations=2)
    assert abs(float(np.median(a["ctpa"][free])) - pa) < 10
    # NCT noise is larger than CTPA noise (residual after the noise-free image, eroded lungs)
    sd = {}
    for g in ("nct", "ctpa"):
        lung = _core(_core((a[f"{g}_clean"] < -700) & (a[f"{g}_clean"] > -950)))
        sd[g] = float(np.std(a[g][lung] - a[f"{g}_clean"][lung]))
    sd_nct, sd_ctpa = sd["nct"], sd["ctpa"]
    assert 16 < sd_nct < 22 and 8 < sd_ctpa < 13  # noise_sd_nct 18, noise_sd_ctpa 10 (+ a little blur)


def test_contrast_and_occult_knobs_are_used():
    base = {**FINE, "shape": [80, 80, 48], "spacing": [3.0, 3.0, 3.0], "clots_per_patient": [3, 3]}
    plan = C.plan_cohort(base)
    i = _first(plan, 1)
    r = C.generate_patient(
        "/x",
        {**base, "nct_clot_contrast_hu": [30, 30], "nct_occult_fraction": 0.0},
        i,
        plan=plan,
        write=False,
        keep_arrays=True,
    )
    a, t = r["arrays"], r["truth"]
    assert [c["nct_contrast_hu"] for c in t["clots"]] == [30.0] * 3
    blood = t["phase_hu"]["nct"]["pa"]
    core = _clot_core(a)
    assert float(a["nct_clean"][core].mean()) - blood == pytest.approx(30.0, abs=1.5)
    r = C.generate_patient(
        "/x", {**base, "nct_occult_fraction": 1.0}, i, plan=plan, write=False, keep_arrays=True
    )
    assert all(c["occult_in_nct"] for c in r["truth"]["clots"])
    core = _clot_core(r["arrays"])
    assert float(r["arrays"]["nct_clean"][core].mean()) == pytest.approx(
        r["truth"]["phase_hu"]["nct"]["pa"], abs=1.5
    )


@pytest.mark.parametrize("max_mm", [8.0, 3.0])
def test_misalignment_size(max_mm):
    p = {**TINY, "max_misalignment_mm": max_mm}
    for i in range(2):
        r = C.generate_patient("/x", p, i, write=False, keep_arrays=True)
        mag = np.sqrt((r["arrays"]["displacement"] ** 2).sum(-1))
        assert 0.5 * max_mm - 1e-3 <= mag.max() <= max_mm + 1e-4
        assert r["truth"]["misalignment"]["max_displacement_mm"] == pytest.approx(mag.max(), abs=1e-3)
        u = r["arrays"]["displacement"].astype(float)
        # T(y) = y + u(y) is a smooth deformation without folding: det(I + du/dy) close to 1
        sp = np.array(TINY["spacing"])
        grad = np.stack([np.stack(np.gradient(u[..., c], *sp), -1) for c in range(3)], -2)  # (..., 3, 3)
        jac = np.linalg.det(np.eye(3) + grad)
        assert 0.9 < jac.min() and jac.max() < 1.1
        # it is not just rigid: an affine fit leaves a non-rigid residual
        ijk = np.indices(u.shape[:3]).reshape(3, -1).T.astype(float)
        design = np.c_[ijk, np.ones(len(ijk))]
        flat = u.reshape(-1, 3)
        resid = flat - design @ np.linalg.lstsq(design, flat, rcond=None)[0]
        assert np.sqrt((resid**2).sum(1)).max() > 0.05 * max_mm
    z = C.generate_patient("/x", {**p, "max_misalignment_mm": 0.0}, 0, write=False, keep_arrays=True)
    assert np.abs(z["arrays"]["displacement"]).max() == 0


def test_displacement_file_matches(tiny_cohort):
    out, sheet = tiny_cohort
    img = nib.load(out / "truth" / "SYN0001" / "displacement.nii.gz")
    r = C.generate_patient(out, TINY, 0, write=False, keep_arrays=True)
    assert img.shape == tuple(TINY["shape"]) + (3,)
    np.testing.assert_allclose(img.get_fdata(), r["arrays"]["displacement"], atol=1e-3)
    np.testing.assert_allclose(img.affine, r["arrays"]["ctpa_affine"], atol=1e-4)


def test_plan_every_year_has_both_classes():
    plan = C.plan_cohort({})
    assert len(plan) == 48 and plan.label.sum() == 24
    years = pd.to_datetime(plan.study_date).dt.year
    for y in (2020, 2021, 2022):
        assert set(plan.label[years == y]) == {0, 1}


def test_series_descriptions_informative_and_not():
    p = {**TINY, "patients": 12, "uninformative_description_fraction": 0.5, "extra_series_fraction": 1.0}
    plan = C.plan_cohort(p)
    seen = set()
    for i in range(len(plan)):
        rng = np.random.default_rng(np.random.SeedSequence([p["seed"], i]).spawn(8)[7])
        plan_s = C._series_plan(rng, C.resolve_params(p), 6.0)
        seen.add(plan_s["informative"])
        assert plan_s["extra"] in ("localizer", "thick")
        if not plan_s["informative"]:
            assert plan_s["desc"]["nct"] == plan_s["desc"]["ctpa"] == "Chest 6mm"
    assert seen == {True, False}


def test_bad_config_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="shape"):
        C.generate_cohort(tmp_path / "c", {"shape": [4, 64]})
    assert not (tmp_path / "c").exists()


def test_cli_runs(tmp_path):
    from cpmn.cli import main

    rc = main(
        [
            "synthetic",
            "--out",
            str(tmp_path / "c"),
            "--patients",
            "2",
            "--seed",
            "3",
            "--no-montage",
            "--quiet",
            "--params",
            json.dumps({"shape": [40, 40, 24], "spacing": [8.0, 8.0, 8.0], "readers": 0}),
        ]
    )
    assert rc == 0
    tsv = pd.read_csv(tmp_path / "c" / "cohort.tsv", sep="\t")
    assert len(tsv) == 2 and tsv.label.tolist().count(1) == 1


def test_realistic_hu_against_real_scans():
    """Phantom lung and soft-tissue statistics against the real NCT chest series and the real CTPA crop."""
    nct_dir, ctpa = REAL / "chest_nct_dicom", REAL / "ctpa_chest_crop"
    needed = (ctpa / "pulmonary_artery.nii.gz", ctpa / "ct_cropped.nii.gz")
    if not nct_dir.is_dir() or not all(f.is_file() for f in needed):
        pytest.skip("shared real data not available")
    import pydicom

    ds = [pydicom.dcmread(f) for f in sorted(nct_dir.glob("*.dcm"))[::4]]
    real = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds])
    p = dict(FINE)
    r = C.generate_patient("/x", p, 0, write=False, keep_arrays=True)["arrays"]["nct"].astype(float)

    def lung_median(v, axis_slices):
        body = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(v > -500, axis_slices, 0)])
        body = np.moveaxis(body, 0, axis_slices)
        return float(np.median(v[(v < -400) & (v > -1000) & body]))

    assert abs(lung_median(r, 2) - lung_median(real, 0)) < 40  # real: about -817 HU
    soft_real, soft_ph = real[(real > 0) & (real < 80)], r[(r > 0) & (r < 80)]
    assert abs(soft_ph.std() - soft_real.std()) < 5  # real: about 21 HU
    ct = nib.load(ctpa / "ct_cropped.nii.gz").get_fdata()
    pa = nib.load(ctpa / "pulmonary_artery.nii.gz").get_fdata() > 0.5
    real_pa = np.percentile(ct[pa], [5, 50, 95])
    lo, hi = C.DEFAULTS["ctpa_vessel_hu"]
    assert lo <= real_pa[1] + 50 and hi >= real_pa[0]  # the configured range covers real enhancement


def test_dependent_lung_density_gradient(fine_pe):
    """Mimic of disease in every patient: posterior (dependent) lung is denser than anterior lung."""
    a, t = fine_pe["arrays"], fine_pe["truth"]
    clean = a["nct_clean"]
    lung = _core((clean < -700) & (clean > -950))
    j = np.indices(clean.shape)[1]  # y index: posterior -> anterior (LAS)
    ys = j[lung]
    post = clean[lung][ys < np.percentile(ys, 20)].mean()
    ant = clean[lung][ys > np.percentile(ys, 80)].mean()
    assert post - ant > 0.3 * t["phase_hu"]["nct"]["lung_dependent"] > 5


def test_synthetic_reader_model():
    clot = {"occult_in_nct": False, "generation": 3, "radius_mm": 3.0}
    truths = [{"patient_id": f"P{i}", "label": i % 2, "clots": [clot] if i % 2 else []} for i in range(2000)]
    r = C.synthetic_readers(truths, 2, seed=1)
    assert len(r) == 4000
    lab = r.patient_id.str[1:].astype(int) % 2
    for _, g in r.groupby("reader"):
        sens = g.decision[lab[g.index] == 1].mean()
        spec = 1 - g.decision[lab[g.index] == 0].mean()
        assert 0.2 < sens < 0.55 and 0.87 < spec < 0.97
    occult = [{**t, "clots": [{**clot, "occult_in_nct": True}]} for t in truths if t["label"]]
    assert C.synthetic_readers(occult, 2, seed=1).decision.mean() < 0.3
