"""Bad input at every per-patient stage run by hand: exit status 1, one ``ERROR patient P: file: reason`` line
on stderr naming the patient and the file, and no output left behind."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cpmn.cli import main


def _nifti(path, arr, spacing=(4.0, 4.0, 4.0)):
    nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), np.diag([*spacing, 1.0])), path)
    return path


def _volumes(tmp_path, shape=(20, 20, 12)):
    nct = np.full(shape, -1000.0)
    nct[3:17, 3:17, 2:10] = 40.0
    mask = np.zeros(shape)
    mask[8:11, 8:11, 4:7] = 1
    return {
        "nct": _nifti(tmp_path / "nct.nii.gz", nct),
        "ctpa": _nifti(tmp_path / "ctpa.nii.gz", nct + 300 * mask),
        "mask": _nifti(tmp_path / "mask.nii.gz", mask),
    }


def _preprocess_args(paths, out, label=1):
    return ["preprocess", "--patient", "Q7", "--label", str(label), "--nct", str(paths["nct"])] + [
        "--ctpa",
        str(paths["ctpa"]),
        "--mask",
        str(paths["mask"]),
        "--out",
        str(out),
    ]


def _case_preprocess_missing_nifti(tmp_path):
    paths = _volumes(tmp_path)
    paths["ctpa"].unlink()
    out = tmp_path / "Q7.npz"
    return _preprocess_args(paths, out), "Q7", paths["ctpa"], "does not exist", out


def _case_preprocess_4d(tmp_path):
    paths = _volumes(tmp_path)
    _nifti(paths["nct"], np.zeros((20, 20, 12, 2)))
    out = tmp_path / "Q7.npz"
    return _preprocess_args(paths, out), "Q7", paths["nct"], "must be a 3D image", out


def _case_preprocess_empty_mask(tmp_path):
    paths = _volumes(tmp_path)
    _nifti(paths["mask"], np.zeros((20, 20, 12)))
    out = tmp_path / "Q7.npz"
    return (
        _preprocess_args(paths, out),
        "Q7",
        paths["mask"],
        r"label is 1 \(PE\) but the embolus mask is empty",
        out,
    )


def _case_preprocess_mask_off_grid(tmp_path):
    paths = _volumes(tmp_path)
    _nifti(paths["mask"], np.ones((20, 20, 12)), spacing=(5.0, 4.0, 4.0))
    out = tmp_path / "Q7.npz"
    return _preprocess_args(paths, out), "Q7", paths["mask"], "not on the NCT grid", out


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _case_preprocess_truncated_mask(tmp_path):
    paths = _volumes(tmp_path)
    _truncate(paths["mask"])
    out = tmp_path / "Q7.npz"
    return _preprocess_args(paths, out), "Q7", paths["mask"], "cannot read mask NIfTI", out


def _case_preprocess_mask_shifted(tmp_path):
    paths = _volumes(tmp_path)
    img = nib.load(paths["mask"])
    affine = img.affine.copy()
    affine[0, 3] += 3.0  # same shape and spacing, 3 mm off
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), paths["mask"])
    out = tmp_path / "Q7.npz"
    return _preprocess_args(paths, out), "Q7", paths["mask"], r"affine differs by up to 3 mm", out


def _case_register_truncated_ctpa(tmp_path):
    # a cut .nii.gz: ITK would read it as a whole volume with zeros at the end and register garbage
    paths = _volumes(tmp_path, shape=(40, 40, 30))
    _truncate(paths["ctpa"])
    out = tmp_path / "reg"
    args = ["register", "--patient", "Q7", "--nct", str(paths["nct"]), "--ctpa", str(paths["ctpa"])]
    args += ["--mask", str(paths["mask"]), "--out-dir", str(out)]
    return args, "Q7", paths["ctpa"], "cannot read CTPA NIfTI", out


def _patches_case(tmp_path, reason, cut=None, **arrays):
    """``cpmn patches`` on a hand-made preprocessed file R2.npz holding ``arrays`` (cut to ``cut`` bytes)."""
    src = tmp_path / "R2.npz"
    np.savez(src, **arrays)
    if cut is not None:
        src.write_bytes(src.read_bytes()[:cut])
    out = tmp_path / "bank" / "R2.npz"
    return ["patches", "--preprocessed", str(src), "--out", str(out)], "R2", src, reason, out


VOL = np.zeros((40, 40, 40), np.float32)


def _case_patches_truncated(tmp_path):
    return _patches_case(tmp_path, "cannot read npz", cut=100, nct=VOL, mask=VOL.astype(np.uint8), label=0)


def _case_patches_no_mask(tmp_path):
    return _patches_case(tmp_path, r"missing arrays \['mask'\]", nct=VOL, label=0)


def _case_patches_empty_mask_on_pe(tmp_path):
    reason = r"label is 1 \(PE\) but the embolus mask is empty"
    return _patches_case(tmp_path, reason, nct=VOL, mask=VOL.astype(np.uint8), label=1)


def _case_patches_shape_mismatch(tmp_path):
    reason = r"mask shape \(40, 40, 36\) differs from nct \(40, 40, 40\)"
    return _patches_case(tmp_path, reason, nct=VOL, mask=np.ones((40, 40, 36), np.uint8), label=1)


def _sheet(tmp_path, edit):
    rows = [
        {"patient_id": f"S{i:02d}", "label": i % 2, "study_date": f"{2019 + i % 4}-06-01"} for i in range(24)
    ]
    df = pd.DataFrame(rows)
    df = edit(df)
    sheet = tmp_path / "cohort.tsv"
    df.to_csv(sheet, sep="\t", index=False)
    out = tmp_path / "splits.tsv"
    return ["split", "--sheet", str(sheet), "--out", str(out)], sheet, out


def _case_split_bad_label(tmp_path):
    args, sheet, out = _sheet(
        tmp_path, lambda d: d.assign(label=d["label"].astype(str).mask(d.index == 5, "yes"))
    )
    return args, "S05", sheet, r"row 6: label 'yes' is not 0 or 1", out


def _case_split_duplicate(tmp_path):
    args, sheet, out = _sheet(
        tmp_path, lambda d: d.assign(patient_id=d["patient_id"].mask(d.index == 7, "S03"))
    )
    return args, "S03", sheet, "patient_id appears more than once", out


def _case_split_empty(tmp_path):
    args, sheet, out = _sheet(tmp_path, lambda d: d.iloc[:0])
    return args, "?", sheet, "no patients to split", out


def _case_split_not_utf8(tmp_path):
    args, sheet, out = _sheet(tmp_path, lambda d: d)
    sheet.write_bytes(sheet.read_bytes().replace(b"S03", b"S\xe93", 1))
    return args, "?", sheet, r"not UTF-8 text \(invalid continuation byte at byte \d+\)", out


def _case_split_bad_yaml_config(tmp_path):
    args, sheet, out = _sheet(tmp_path, lambda d: d)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("split:\n  seed: 1\n val_fraction: 0.3\n")  # one space short
    reason = r"cannot read config \(ParserError: expected <block end>, .* at line 3\)"
    return [*args, "--config", str(cfg)], "?", cfg, reason, out


def _case_split_missing_config(tmp_path):
    args, sheet, out = _sheet(tmp_path, lambda d: d)
    cfg = tmp_path / "nope.yaml"
    return [*args, "--config", str(cfg)], "?", cfg, r"cannot read config \(FileNotFoundError", out


def _case_preprocess_nan_voxels(tmp_path):
    paths = _volumes(tmp_path)
    nct = nib.load(paths["nct"]).get_fdata()
    nct[5:7, 5:7, 5:7] = np.nan
    _nifti(paths["nct"], nct)
    out = tmp_path / "Q7.npz"
    return _preprocess_args(paths, out), "Q7", paths["nct"], r"NCT has 8 non-finite \(NaN or infinite\)", out


def _case_register_constant_ctpa(tmp_path):
    paths = _volumes(tmp_path, shape=(40, 40, 30))
    _nifti(paths["ctpa"], np.full((40, 40, 30), -1000.0))
    out = tmp_path / "reg"
    args = ["register", "--patient", "Q7", "--nct", str(paths["nct"]), "--ctpa", str(paths["ctpa"])]
    args += ["--mask", str(paths["mask"]), "--out-dir", str(out)]
    return args, "Q7", paths["ctpa"], r"CTPA image is constant \(-1000\): nothing to register", out


def _case_patches_output_under_a_file(tmp_path):
    args, pid, src, _, _ = _patches_case(tmp_path, "", nct=VOL, mask=VOL.astype(np.uint8), label=0)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "R2.npz"
    args[-1] = str(out)
    return args, "?", tmp_path / "afile", "File exists", out


CASES = {
    "preprocess: missing NIfTI": _case_preprocess_missing_nifti,
    "preprocess: 4-D image": _case_preprocess_4d,
    "preprocess: empty mask on a PE patient": _case_preprocess_empty_mask,
    "preprocess: mask off the NCT grid": _case_preprocess_mask_off_grid,
    "preprocess: truncated mask": _case_preprocess_truncated_mask,
    "preprocess: mask shifted, same shape": _case_preprocess_mask_shifted,
    "register: truncated CTPA": _case_register_truncated_ctpa,
    "patches: truncated file": _case_patches_truncated,
    "patches: no mask": _case_patches_no_mask,
    "patches: empty mask on a PE patient": _case_patches_empty_mask_on_pe,
    "patches: mask off the nct grid": _case_patches_shape_mismatch,
    "split: bad label": _case_split_bad_label,
    "split: duplicate patient": _case_split_duplicate,
    "split: empty cohort": _case_split_empty,
    "split: sheet not UTF-8": _case_split_not_utf8,
    "split: bad YAML config": _case_split_bad_yaml_config,
    "split: missing config": _case_split_missing_config,
    "preprocess: NaN voxels": _case_preprocess_nan_voxels,
    "register: constant CTPA": _case_register_constant_ctpa,
    "patches: output under a file": _case_patches_output_under_a_file,
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_error_line_naming_patient_and_file_and_no_output(case, tmp_path, capsys):
    args, pid, path, reason, out = CASES[case](tmp_path)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.match(rf"^ERROR patient {re.escape(pid)}: {re.escape(str(path))}: ", err[0]), err[0]
    assert re.search(reason, err[0]), err[0]
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name.split('.')[0]}*")]  # no temporary file either


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ('{"reg_iteration": [40, 20, 0]}', "--params: register: unknown key(s) reg_iteration"),
        ('{"reg_iterations": "40"}', "--params: register.reg_iterations: '40' is not of type 'array'"),
        ('{"reg_iterations": [40, 20, 0]', "--params: not valid JSON"),
    ],
)
def test_a_config_typo_in_a_hand_run_is_one_error_line(params, reason, tmp_path, capsys):
    """The workflow validates the config against its schema; a stage run by hand does the same."""
    paths = _volumes(tmp_path)
    out = tmp_path / "reg"
    args = ["register", "--patient", "Q7", "--nct", str(paths["nct"]), "--ctpa", str(paths["ctpa"])]
    args += ["--mask", str(paths["mask"]), "--out-dir", str(out), "--params", params]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ERROR patient ?: {reason}"), err
    assert not out.exists()


def test_unknown_section_or_key_of_a_whole_config_names_the_file():
    from cpmn.config import check_sections
    from cpmn.errors import InputError

    with pytest.raises(InputError, match=r"mine.yaml: infer: unknown key\(s\) scor$"):
        check_sections({"infer": {"scor": "max"}}, None, "mine.yaml")
    with pytest.raises(InputError, match=r"mine.yaml: unknown config section 'inferr'$"):
        check_sections({"inferr": {}}, None, "mine.yaml")
    check_sections({"infer": {"score": "max"}, "patches": {"size": [32, 32, 32]}}, None, "mine.yaml")
