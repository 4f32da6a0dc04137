"""cpmn convert: series picking (rules, heuristic, rejection), dcm2niix geometry, anonymity, errors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_fixtures import (
    AFFINE,
    CLOT_BOX,
    CTPA_HU,
    NCT_HU,
    REAL,
    SHAPE,
    chest_volume,
    set_tags,
    write_patient,
    write_phase,
)

from cpmn.cli import main
from cpmn.data.convert import convert_patient
from cpmn.errors import InputError


def _canon(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    c = nib.as_closest_canonical(img)
    return c.affine, np.asarray(c.dataobj)


def _write_non_image(path: Path, sop_class: str) -> None:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR" if sop_class == pydicom.uid.BasicTextSRStorage else "OT"
    ds.save_as(path, enforce_file_format=True)


def test_picks_by_rule_and_preference(tmp_path):
    src = tmp_path / "dicom"
    write_patient(src, "P1", localizer=True)
    # a second CTPA reconstruction, thicker slices: rule matches both, preference keeps the thin one
    write_phase(src, "P1", blood_hu=CTPA_HU, description="CTPA 5.0 mm", series_number=4, slice_thickness=7.5)
    (src / "README.txt").write_text("export notes\n")
    # a report and a vendor's private non-image object (Siemens CSA) in the export: ignored, not errors
    _write_non_image(src / "SR_0001.dcm", pydicom.uid.BasicTextSRStorage)
    _write_non_image(src / "CSA_0001.dcm", "1.3.12.2.1107.5.9.1")
    qc = convert_patient([src], tmp_path / "out", "P1")
    out = tmp_path / "out"
    assert sorted(x.name for x in out.iterdir()) == [
        "ctpa.json",
        "ctpa.nii.gz",
        "nct.json",
        "nct.nii.gz",
        "qc.json",
    ]
    assert qc["chosen"]["nct"]["series_number"] == 2 and qc["chosen"]["ctpa"]["series_number"] == 3
    assert "2 series match the ctpa rule" in qc["chosen"]["ctpa"]["reason"]
    by_num = {s["series_number"]: s for s in qc["series"]}
    assert by_num[1]["decision"] == "rejected" and by_num[1]["reason"] == "localizer"
    assert by_num[4]["decision"] == "not used" and by_num[4]["slice_thickness_mm"] == 7.5
    assert (
        by_num[2]["blood_pool_hu"] == pytest.approx(NCT_HU, abs=1) and by_num[3]["blood_pool_hu"] == CTPA_HU
    )
    assert sorted(qc["ignored_files"], key=lambda f: f["file"]) == [
        {
            "file": str(src / "CSA_0001.dcm"),
            "reason": "DICOM object without image (SOP class 1.3.12.2.1107.5.9.1)",
        },
        {"file": str(src / "README.txt"), "reason": "documentation / non-image file by name"},
        {"file": str(src / "SR_0001.dcm"), "reason": "DICOM object without image (Basic Text SR Storage)"},
    ]
    # geometry and HU survive: same world grid as the phantom after reorientation
    ref_aff, ref = _canon(nib.Nifti1Image(chest_volume(CTPA_HU, clot_box=CLOT_BOX), AFFINE))
    aff, got = _canon(nib.load(out / "ctpa.nii.gz"))
    np.testing.assert_allclose(aff, ref_aff, atol=1e-3)
    np.testing.assert_allclose(got, ref, atol=0.5)
    assert nib.load(out / "nct.nii.gz").shape == SHAPE
    assert json.loads((out / "qc.json").read_text())["chosen"]["ctpa"]["dcm2niix_output"] == "plain"
    assert json.loads((out / "nct.json").read_text())["SeriesNumber"] == 2


def test_heuristic_decides_when_rules_do_not(tmp_path):
    src = tmp_path / "dicom"
    # no rule matches "Series A"/"Series B"; "non contrast" would match both rules: both go to the heuristic
    write_phase(src, "P2", blood_hu=CTPA_HU, description="Series A", series_number=7)
    write_phase(src, "P2", blood_hu=NCT_HU, description="Thorax non contrast", series_number=8)
    qc = convert_patient([src], tmp_path / "out", "P2", {"contrast_threshold_hu": 150})
    assert qc["chosen"]["ctpa"]["series_number"] == 7 and qc["chosen"]["nct"]["series_number"] == 8
    assert "heuristic" in qc["chosen"]["ctpa"]["reason"] and "heuristic" in qc["chosen"]["nct"]["reason"]
    s8 = next(s for s in qc["series"] if s["series_number"] == 8)
    assert s8["rule_match"] == ["nct", "ctpa"] and s8["heuristic"] == "nct"
    # a threshold above the enhanced blood pool makes both look non-contrast: ctpa goes missing,
    # and two equal candidates for nct cannot be told apart
    with pytest.raises(InputError, match="no series for phase ctpa"):
        convert_patient([src], tmp_path / "out2", "P2", {"contrast_threshold_hu": 500}, phases=("ctpa",))
    with pytest.raises(InputError, match="ambiguous nct series: S01 'Series A' .* and S02"):
        convert_patient([src], tmp_path / "out2", "P2", {"contrast_threshold_hu": 500})
    assert not (tmp_path / "out2").exists()


def test_no_identifiers_in_any_output(tmp_path, capsys, caplog):
    src = tmp_path / "dicom"
    files = write_patient(src, "PSEUDO7")
    set_tags(
        files["nct"] + files["ctpa"],
        PatientName="Doe^Jane",
        PatientBirthDate="19610203",
        InstitutionName="Saint Elsewhere Hospital",
        ReferringPhysicianName="Who^Doctor",
    )
    caplog.set_level("INFO")
    assert main(["convert", str(src), str(tmp_path / "out"), "--patient", "PSEUDO7"]) == 0
    texts = [capsys.readouterr().err, caplog.text]
    for f in (tmp_path / "out").iterdir():
        raw = f.read_bytes()
        texts.append((gzip.decompress(raw) if f.suffix == ".gz" else raw).decode("latin-1"))
    blob = "\n".join(texts)
    assert "PSEUDO7" in blob  # the pseudonym is what identifies the patient
    for needle in ("Doe", "Jane", "19610203", "1961-02-03", "Elsewhere", "Who^Doctor"):
        assert needle not in blob, needle


def _bad_cases(tmp_path: Path):
    """(name, folder, expected message, offending file) for each bad-input case."""
    cases = []
    d = tmp_path / "junk"
    write_patient(d, "B1")
    (d / "IM_0000.dcm").write_bytes(b"this is not dicom\n" * 20)
    cases.append(("junk", d, "not a DICOM file", d / "IM_0000.dcm"))
    d = tmp_path / "trunc"
    f = write_patient(d, "B2")["ctpa"][5]
    f.write_bytes(f.read_bytes()[:-300])
    cases.append(("truncated", d, "truncated pixel data", f))
    d = tmp_path / "headcut"
    f = write_patient(d, "B6")["nct"][3]
    f.write_bytes(f.read_bytes()[:600])  # cut inside the header: no Rows, SOP class CT Image Storage
    cases.append(("headcut", d, "corrupt DICOM: header ends after 600 bytes", f))
    d = tmp_path / "mr"
    write_patient(d, "B3", ctpa=False)
    mr = write_phase(d, "B3", blood_hu=CTPA_HU, description="CTPA", series_number=9, modality="MR")
    cases.append(("modality", d, "modality MR, expected CT", None))
    d = tmp_path / "missing"
    write_patient(d, "B4", ctpa=False)
    cases.append(("missing", d, "no series for phase ctpa", None))
    d = tmp_path / "dup"
    write_patient(d, "B5")
    write_phase(d, "B5", blood_hu=CTPA_HU, description="CTPA 1.0", series_number=5)
    cases.append(("duplicate", d, "ambiguous ctpa series", None))
    return cases, mr


def test_bad_input_one_line_no_output(tmp_path, capsys):
    cases, mr = _bad_cases(tmp_path)
    for name, folder, msg, bad_file in cases:
        out = tmp_path / f"out_{name}"
        pid = {"junk": "B1", "truncated": "B2", "modality": "B3", "missing": "B4", "duplicate": "B5"}
        pid = {**pid, "headcut": "B6"}[name]
        with pytest.raises(InputError) as ei:
            convert_patient([folder], out, pid)
        assert msg in str(ei.value), (name, str(ei.value))
        assert str(ei.value).startswith(f"patient {pid}: ")
        if bad_file is not None:
            assert ei.value.path == str(bad_file)
        if name == "modality":
            assert Path(ei.value.path) in mr
        assert not out.exists() and not list(tmp_path.glob(f".out_{name}*")), name
    # the CLI: one line on stderr, exit 1
    name, folder, msg, _ = cases[0]
    assert main(["convert", str(folder), str(tmp_path / "cli_out"), "--patient", "B1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR patient B1: ") and msg in err[0]


def test_phases_option_and_split_folders(tmp_path):
    nct_dir, ctpa_dir = tmp_path / "a", tmp_path / "b"
    write_patient(nct_dir, "P6", ctpa=False)
    write_patient(ctpa_dir, "P6", nct=False)
    qc = convert_patient([nct_dir, ctpa_dir], tmp_path / "both", "P6")
    assert set(qc["chosen"]) == {"nct", "ctpa"}
    assert main(["convert", str(nct_dir), str(tmp_path / "only"), "--patient", "P6", "--phases", "nct"]) == 0
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["nct.json", "nct.nii.gz", "qc.json"]


# ----------------------------------------------------------------------------- real data


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data absent: {path}")
    return path


def test_real_chest_nct(tmp_path):
    src = _need(REAL / "chest_nct_dicom")
    qc = convert_patient([src], tmp_path / "out", "REAL1", phases=("nct",))
    img = nib.load(tmp_path / "out" / "nct.nii.gz")
    assert img.shape == (512, 512, 141)
    np.testing.assert_allclose(img.header.get_zooms()[:3], (0.9765625, 0.9765625, 2.0), atol=1e-4)
    (s,) = qc["series"]
    assert s["heuristic"] == "nct" and 20 < s["blood_pool_hu"] < 100  # measured 57 HU
    assert qc["chosen"]["nct"]["dcm2niix_output"] == "plain"


@pytest.mark.parametrize(
    "vendor, ref, variant, n_slices, dz",
    [
        ("GE", "_2.json", "Tilt_Eq", 56, 144.0883 / 55),  # tilt 18.5 deg and 1.1/4.0/7.0 mm gaps
        ("Philips_S21610_S2010", "1F_STEREOTAXIS_Head_201.json", "Tilt", 54, 2.370809),  # tilt -18.5 deg
    ],
)
def test_real_gantry_tilt_and_variable_spacing(tmp_path, vendor, ref, variant, n_slices, dz):
    src = _need(REAL / "dcm_qa_ct" / "In" / vendor)
    ref_json = _need(REAL / "dcm_qa_ct" / "Ref" / ref)
    work = tmp_path / "in"
    shutil.copytree(src, work)
    qc = convert_patient([work], tmp_path / "out", "QA", phases=("nct",))
    chosen = qc["chosen"]["nct"]
    assert chosen["dcm2niix_output"] == variant
    img = nib.load(tmp_path / "out" / "nct.nii.gz")
    assert img.shape[2] == n_slices and chosen["axes_orthogonal"]
    assert img.header.get_zooms()[2] == pytest.approx(dz, abs=2e-3)
    # the corrected grid is orthogonal: its z axis is no longer the tilted slice stack direction
    cols = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    np.testing.assert_allclose(cols.T @ cols, np.eye(3), atol=1e-3)
    assert abs(qc["series"][0]["tilt_deg"] - 18.5) < 0.1
    side = json.loads((tmp_path / "out" / "nct.json").read_text())
    want = json.loads(ref_json.read_text())
    for key in (
        "Modality",
        "Manufacturer",
        "ManufacturersModelName",
        "SeriesNumber",
        "ImageType",
        "ImageOrientationPatientDICOM",
        "ConvolutionKernel",
        "PatientPosition",
        "XRayTubeCurrent",
        "SliceThickness",
    ):
        if key in want:
            assert (
                side[key] == pytest.approx(want[key])
                if isinstance(want[key], list)
                else side[key] == want[key]
            )
    for key in ("InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber"):
        assert key not in side
    if vendor.startswith("Philips"):  # its DIRFILE is a DICOMDIR: ignored, not an error
        assert [x["reason"] for x in qc["ignored_files"]] == ["DICOMDIR (media storage directory)"]
    # pydicom agrees with the slice count used
    assert qc["series"][0]["n_slices"] == len([p for p in work.iterdir() if p.name != "DIRFILE"])
    assert pydicom.dcmread(qc["series"][0]["first_file"], stop_before_pixels=True).Modality == "CT"
