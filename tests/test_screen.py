"""cpmn screen: every bad-row case is excluded with one line naming patient and file; the rest goes on."""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from dicom_fixtures import AFFINE, SHAPE, write_mask, write_patient, write_phase

from cpmn.cli import main
from cpmn.data.dicomio import DEFAULTS
from cpmn.data.screen import COLUMNS, grid_mismatch, read_sheet, screen_cohort, validate_sheet
from cpmn.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _row(pid, label="0", date="2021-05-06", nct=None, ctpa=None, mask=""):
    nct = nct or f"dicom/{pid}"
    return {
        "patient_id": pid,
        "label": label,
        "study_date": date,
        "nct_dicom": nct,
        "ctpa_dicom": ctpa or nct,
        "ctpa_mask": mask,
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A sheet with one good patient per label and one row per failure case."""
    root = tmp_path_factory.mktemp("cohort")
    rows = []
    # good: PE patient with a mask on the CTPA grid; non-PE patient without a mask; mask with flipped axes
    write_patient(root / "dicom/G1", "G1", localizer=True)
    write_mask(root / "masks/G1.nii.gz")
    rows.append(_row("G1", "1", mask="masks/G1.nii.gz"))
    write_patient(root / "dicom/G2", "G2")
    rows.append(_row("G2"))
    write_patient(root / "dicom/G3", "G3")
    flip = AFFINE @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, -1, SHAPE[2] - 1], [0, 0, 0, 1]])
    write_mask(root / "masks/G3.nii.gz", affine=flip)
    rows.append(_row("G3", "1", mask="masks/G3.nii.gz"))
    # corrupt / non-DICOM file
    write_patient(root / "dicom/X1", "X1")
    (root / "dicom/X1/IM_JUNK.dcm").write_bytes(b"\x00garbage" * 50)
    rows.append(_row("X1"))
    # missing phase (no CTPA series at all)
    write_patient(root / "dicom/X2", "X2", ctpa=False)
    rows.append(_row("X2"))
    # non-CT modality
    write_patient(root / "dicom/X3", "X3", ctpa=False)
    mr = write_phase(
        root / "dicom/X3", "X3", blood_hu=400.0, description="CTPA", series_number=3, modality="MR"
    )
    rows.append(_row("X3"))
    # mask geometry: shifted by 2 voxels; another with a different shape
    write_patient(root / "dicom/X4", "X4")
    shifted = AFFINE.copy()
    shifted[:3, 3] += AFFINE[:3, :3] @ [2, 0, 0]
    write_mask(root / "masks/X4.nii.gz", affine=shifted)
    rows.append(_row("X4", "1", mask="masks/X4.nii.gz"))
    write_patient(root / "dicom/X5", "X5")
    write_mask(root / "masks/X5.nii.gz", shape=(48, 48, 20))
    rows.append(_row("X5", "1", mask="masks/X5.nii.gz"))
    # empty mask on a PE patient
    write_patient(root / "dicom/X6", "X6")
    write_mask(root / "masks/X6.nii.gz", box=None)
    rows.append(_row("X6", "1", mask="masks/X6.nii.gz"))
    # duplicate patient id (both rows go), bad label and bad date (schema)
    write_patient(root / "dicom/D1", "D1")
    rows += [_row("D1"), _row("D1")]
    rows.append(_row("G2", "2", nct="dicom/G2") | {"patient_id": "S1"})
    rows.append(_row("G2", "0", date="2021-13-40", nct="dicom/G2") | {"patient_id": "S2"})
    # a truncated mask file and a mask with a value other than 0 and 1 (PE patients)
    write_patient(root / "dicom/X7", "X7")
    write_mask(root / "masks/X7.nii.gz")
    data = (root / "masks/X7.nii.gz").read_bytes()
    (root / "masks/X7.nii.gz").write_bytes(data[: len(data) // 2])
    rows.append(_row("X7", "1", mask="masks/X7.nii.gz"))
    write_patient(root / "dicom/X8", "X8")
    write_mask(root / "masks/X8.nii.gz")
    two = nib.load(root / "masks/X8.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(two.dataobj) * 2, two.affine), root / "masks/X8.nii.gz")
    rows.append(_row("X8", "1", mask="masks/X8.nii.gz"))
    sheet = root / "cohort.tsv"
    pd.DataFrame(rows, columns=COLUMNS).to_csv(sheet, sep="\t", index=False)
    return root, sheet, mr


def test_screen_cohort_cases(cohort, capsys):
    root, sheet, mr = cohort
    inc, exc = screen_cohort(sheet, root / "out/cohort.included.tsv", root / "out/qc/excluded.tsv", {})
    lines = capsys.readouterr().err.strip().splitlines()
    assert list(inc["patient_id"]) == ["G1", "G2", "G3"]
    assert inc.loc[0, "nct_dicom"] == str(root / "dicom/G1") and inc.loc[0, "ctpa_mask"] == str(
        root / "masks/G1.nii.gz"
    )
    assert inc.loc[1, "ctpa_mask"] == ""
    on_disk = pd.read_csv(root / "out/cohort.included.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(on_disk.columns) == COLUMNS and on_disk.equals(inc)
    ex = pd.read_csv(root / "out/qc/excluded.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(ex.columns) == ["patient_id", "stage", "file", "reason"]
    got = {(r.patient_id, r.stage): (r.file, r.reason) for r in ex.itertuples()}
    assert got[("X1", "dicom")] == (str(root / "dicom/X1/IM_JUNK.dcm"), "not a DICOM file")
    assert got[("X2", "phase")][1].startswith("no series for phase ctpa")
    file, reason = got[("X3", "dicom")]
    assert reason == "modality MR, expected CT" and file in {str(p.resolve()) for p in mr}
    assert got[("X4", "mask")][0] == str(root / "masks/X4.nii.gz")
    assert "off the CTPA series grid by 2.00 voxel" in got[("X4", "mask")][1]
    assert "mask shape (48, 48, 20) != CTPA grid (48, 48, 24)" in got[("X5", "mask")][1]
    assert got[("X6", "mask")][1] == "empty mask on a PE patient (label 1)"
    assert (ex["patient_id"] == "D1").sum() == 2 and "duplicate patient_id (data rows 10, 11)" in got[
        ("D1", "sheet")
    ][1]
    assert "data row 12 (line 13): column label" in got[("S1", "sheet")][1]
    assert "data row 13 (line 14): column study_date" in got[("S2", "sheet")][1]
    assert got[("X7", "mask")][1].startswith("mask is not a readable NIfTI")
    assert got[("X8", "mask")][1] == "mask must contain only 0 and 1, found [0, 2]"
    assert len(ex) == 12
    # one stderr line per exclusion, naming patient and file
    assert len(lines) == 12 and all(ln.startswith("EXCLUDED patient ") for ln in lines)
    assert any(ln.startswith("EXCLUDED patient X1: ") and "IM_JUNK.dcm" in ln for ln in lines)


def test_cohort_exclude_leaves_a_patient_out_and_warns_on_an_unknown_id(cohort, tmp_path, capsys):
    root, sheet, _ = cohort
    inc, exc = screen_cohort(sheet, tmp_path / "inc.tsv", tmp_path / "exc.tsv", {}, leave_out=["G2", "NOPE"])
    err = capsys.readouterr().err
    assert list(inc["patient_id"]) == ["G1", "G3"]
    row = exc[exc["patient_id"] == "G2"].iloc[0]
    assert (row.stage, row.file, row.reason) == ("config", str(sheet), "listed in cohort.exclude")
    assert f"WARNING cohort.exclude: patient NOPE is not in {sheet}" in err
    assert f"EXCLUDED patient G2: {sheet}: listed in cohort.exclude" in err


def test_screen_reads_pixels_only_when_rules_do_not_decide(cohort, monkeypatch):
    import cpmn.data.dicomio as dio

    root, _, _ = cohort
    calls = []
    real = dio.read_hu_slice
    monkeypatch.setattr(dio, "read_hu_slice", lambda h: calls.append(h) or real(h))
    from cpmn.data.screen import screen_row

    row = {k: str(root / v) if k.endswith("dicom") else v for k, v in _row("G2").items()}
    assert screen_row(row, {}) is None and calls == []  # "Thorax plain" / "CTPA": rules decide
    assert screen_row(row, {"series_rules": {"nct": "^$", "ctpa": "^$"}}) is None
    assert len(calls) == 2 * DEFAULTS["heuristic_slices"]  # both series classified by the heuristic


def test_validate_sheet_messages():
    df = pd.DataFrame(
        [_row("A1"), _row("A 2", label="x"), _row("A3", "1", mask=""), _row("A4", date="2021-02-30")],
        dtype=str,
    )
    errs = validate_sheet(df)
    assert len(errs) == 4
    assert errs[0].startswith("data row 2 (line 3) (patient A 2): column label:")
    assert errs[1].startswith("data row 2 (line 3) (patient A 2): column patient_id:")
    assert errs[2].startswith(
        "data row 3 (line 4) (patient A3): column ctpa_mask:"
    )  # PE patient needs a mask
    assert errs[3].startswith("data row 4 (line 5) (patient A4): column study_date:")
    assert validate_sheet(df.drop(columns=["label"])) == ["column label: missing from the sheet"]


def test_grid_mismatch_tolerance():
    a = np.diag([2.0, 2.0, 3.0, 1.0])
    assert grid_mismatch(a, (4, 5, 6), a, (4, 5, 6)) is None
    # permuted x/y axes describe the same grid
    perm = a @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert grid_mismatch(perm, (5, 4, 6), a, (4, 5, 6)) is None
    b = a.copy()
    b[0, 3] = 0.9  # 0.45 voxel: accepted; 1.1 mm = 0.55 voxel: rejected
    assert grid_mismatch(b, (4, 5, 6), a, (4, 5, 6)) is None
    b[0, 3] = 1.1
    assert "0.55 voxel" in grid_mismatch(b, (4, 5, 6), a, (4, 5, 6))


def test_cli_and_unusable_sheet(cohort, tmp_path, capsys):
    root, sheet, _ = cohort
    from cpmn.data import screen

    rc = screen.run(
        argparse.Namespace(
            sheet=str(sheet),
            included=str(tmp_path / "i.tsv"),
            excluded=str(tmp_path / "e.tsv"),
            phases=("nct",),
            exclude=[],
            readers=None,
            overlays=None,
            config=[],
            params=None,
        )
    )
    assert rc == 0
    # with only NCT required the missing-CTPA patient passes
    assert "X2" in set(read_sheet(tmp_path / "i.tsv")["patient_id"])
    bad = tmp_path / "bad.tsv"
    bad.write_text("patient_id\tlabel\nA\t1\n")
    with pytest.raises(InputError, match="lacks column"):
        screen_cohort(bad, tmp_path / "i2.tsv", tmp_path / "e2.tsv")
    assert not (tmp_path / "i2.tsv").exists()
    capsys.readouterr()
    assert main(["screen", "--sheet", str(bad), "--included", "i", "--excluded", "e"]) == 1
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("ERROR patient ?: ") and "bad.tsv: cohort sheet lacks column(s) study_date" in err


def test_defaults_match_config():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["convert"]
    assert cfg == {k: DEFAULTS[k] for k in cfg} and set(cfg) == set(DEFAULTS)


def _tiny_sheet(tmp_path, sep="\t"):
    sheet = tmp_path / "sheet.tsv"
    cols = ["patient_id", "label", "study_date", "nct_dicom", "ctpa_dicom", "ctpa_mask"]
    rows = [["H1", "1", "2020-01-02", "d1", "d1", "m1.nii.gz"], ["H2", "0", "10/04/2020", "d2", "d2", ""]]
    sheet.write_text("\n".join(sep.join(r) for r in [cols, *rows]) + "\n")
    return sheet


@pytest.mark.parametrize(
    ("body", "want"),
    [
        (
            "H1\tr1\tyes\n",
            r"readers file, data row 1 \(line 2\), reader r1, patient H1: decision must be 0 or 1",
        ),
        (
            "H1\tr1\t1\nH9\tr1\t0\n",
            r"readers file, data row 2 \(line 3\): patient 'H9' is not in the cohort sheet",
        ),
        (
            "H1\tr1\t1\nH1\tr1\t0\n",
            r"readers file, data row 2 \(line 3\), reader r1, patient H1: duplicate patient",
        ),
    ],
)
def test_a_bad_readers_file_stops_screening_naming_the_file_and_row(tmp_path, body, want):
    sheet = _tiny_sheet(tmp_path)
    readers = tmp_path / "readers.tsv"
    readers.write_text("patient_id\treader\tdecision\n" + body)
    inc, exc = tmp_path / "inc.tsv", tmp_path / "exc.tsv"
    with pytest.raises(InputError, match=r"^patient \?: .*readers.tsv: " + want) as info:
        screen_cohort(sheet, inc, exc, readers=readers)
    assert info.value.patient == "?"  # the readers file is at fault: no cohort.exclude advice follows
    assert not inc.exists() and not exc.exists()


def test_sheet_messages_name_the_date_format_and_a_comma_separated_sheet(tmp_path, capsys):
    sheet = _tiny_sheet(tmp_path)
    screen_cohort(sheet, tmp_path / "inc.tsv", tmp_path / "exc.tsv")
    err = capsys.readouterr().err
    assert "EXCLUDED patient H2: " in err and "data row 2 (line 3): column study_date:" in err
    assert "(expected YYYY-MM-DD, e.g. 2020-04-10)" in err
    csv_sheet = _tiny_sheet(tmp_path, sep=",")
    with pytest.raises(
        InputError,
        match=r"lacks column\(s\) .*the sheet is read as tab-separated, TSV; this header is comma-separated",
    ):
        screen_cohort(csv_sheet, tmp_path / "inc.tsv", tmp_path / "exc.tsv")


def test_a_mask_that_misses_the_filling_defect_is_excluded_with_the_measured_reason(tmp_path, capsys):
    """Another patient's annotation (a box in the right lung here, on the right grid) is excluded: none of
    its voxels is at clot HU next to enhanced blood; the patient's own (the 40 HU defect) passes."""
    write_patient(tmp_path / "dicom/S1", "S1")
    write_mask(tmp_path / "masks/own.nii.gz")
    write_mask(tmp_path / "masks/other.nii.gz", box=((6, 12), (20, 26), (10, 14)))
    rows = [_row("S1", "1", nct="dicom/S1", mask="masks/own.nii.gz")]
    rows.append({**_row("S2", "1", nct="dicom/S1", mask="masks/other.nii.gz")})
    sheet = tmp_path / "sheet.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    inc, exc = screen_cohort(sheet, tmp_path / "i.tsv", tmp_path / "e.tsv", overlays=tmp_path / "png")
    assert inc.patient_id.tolist() == ["S1"]
    assert (tmp_path / "png" / "S1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # one to look at
    (reason,) = exc.reason[exc.patient_id == "S2"]
    assert (
        reason.startswith("mask implausible for its CTPA (series ")
        and ": 0% of its 144 voxels are at" in reason
    )
    off = screen_cohort(
        sheet, tmp_path / "i.tsv", tmp_path / "e.tsv", params={"mask_plausible_fraction": 0.0}
    )
    assert off[0].patient_id.tolist() == ["S1", "S2"]  # 0 turns the check off


def test_two_synthetic_patients_masks_swapped_are_implausible():
    """Two PE patients of the default phantom: each annotation on its own CTPA is plausible (>= 0.6); the
    masks swapped (grids a few mm apart, as the issue's 0.375-voxel case) are not."""
    from cpmn.data.screen import mask_plausibility
    from cpmn.synthetic.cohort import generate_patient, plan_cohort, resolve_params

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    params = resolve_params({**cfg["synthetic"], "patients": 12})
    pe = np.flatnonzero(plan_cohort(params).label.to_numpy() == 1)[:2]
    a, b = (generate_patient("unused", params, int(i), write=False, keep_arrays=True)["arrays"] for i in pe)
    own = [
        mask_plausibility(x["mask_ctpa"], x["ctpa_affine"], x["ctpa"], x["ctpa_affine"], 150)[0]
        for x in (a, b)
    ]
    swapped = [
        mask_plausibility(a["mask_ctpa"], a["ctpa_affine"], b["ctpa"], b["ctpa_affine"], 150)[0],
        mask_plausibility(b["mask_ctpa"], b["ctpa_affine"], a["ctpa"], a["ctpa_affine"], 150)[0],
    ]
    need = cfg["convert"]["mask_plausible_fraction"]
    assert min(own) >= need > max(swapped), (own, swapped)
