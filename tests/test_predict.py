"""`cpmn predict` and the model card: one new NCT scan through a self-describing model folder."""

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigParser
from scipy import ndimage

from cpmn import card, scoring
from cpmn.bundle import export_bundle
from cpmn.cli import main
from cpmn.data.convert import convert_patient
from cpmn.data.preprocess import CONTRACT, prepare_nct, preprocess_patient
from cpmn.predict import input_body, largest_component, predict_scan
from cpmn.synthetic.cohort import generate_patient, plan_cohort, resolve_params
from cpmn.variants import build_model, variant_entry

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SYNTHETIC = {"patients": 2, "seed": 3, "pe_fraction": 0.5, "shape": [64, 64, 40], "spacing": [5.0, 5.0, 5.0]}
PRE = {"spacing": [5.0, 5.0, 5.0]}
THRESHOLD = {"value": 0.5, "method": "youden", "chosen_on": "val", "n_val": 7}


def _model_folder(root: Path, score: str = "seg_volume") -> Path:
    """A model folder as the workflow leaves it: model.pt of a seeded, untrained NCT pathway, and its card."""
    cfg = {"variants": {"nct": {"pathways": ["nct"]}}, "model": {"ifa_level": 2}}
    entry = variant_entry("nct", cfg)
    torch.manual_seed(0)
    model = build_model(entry, cfg["model"])
    d = root / "models" / "nct"
    d.mkdir(parents=True)
    torch.save(
        {
            "variant_name": "nct",
            "variant": entry,
            "model_cfg": {"ifa_level": 2},
            "patch_size": [32, 32, 32],
            "model": model.state_dict(),
            "epoch": 2,
            "val_auc": 0.75,
        },
        d / "model.pt",
    )
    splits = pd.DataFrame(
        {"patient_id": ["a", "b", "c"], "split": ["train", "train", "val"], "label": [1, 0, 1]}
    )
    stats = {"variants": {"nct": {"threshold": THRESHOLD}}}
    c = card.build_card(d, stats, splits, {"convert": {}, "preprocess": PRE, "infer": {"score": score}})
    (d / card.CARD).write_text(json.dumps(c))
    return d


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """One phantom PE patient's DICOM folder (NCT and CTPA series) and a model folder."""
    root = tmp_path_factory.mktemp("predict")
    p = resolve_params(SYNTHETIC)
    plan = plan_cohort(p)
    index = int(np.flatnonzero(plan.label.to_numpy() == 1)[0])
    row = generate_patient(root / "cohort", p, index, plan=plan)
    return {"root": root, "dicom": root / "cohort" / row["nct_dicom"], "model": _model_folder(root)}


def test_the_card_holds_what_predict_needs(scan):
    c = card.read_card(scan["model"])
    assert c["threshold"] == THRESHOLD
    assert c["preprocess"] == PRE and c["infer"]["score"] == "seg_volume"
    splits = {"train": {"patients": 2, "pe": 1}, "val": {"patients": 1, "pe": 1}}
    assert c["training_data"]["splits"] == splits
    assert c["training_data"]["best_epoch"] == 2 and c["preprocess_contract"] == CONTRACT
    outside = ("threshold", "training_data", "cpmn_version", "config_digest")
    settings = {k: c[k] for k in c if k not in outside}
    assert c["config_digest"] == card.config_digest(settings)
    moved = {**settings, "preprocess": {"spacing": [4.0, 4.0, 4.0]}}
    assert card.config_digest(moved) != c["config_digest"]
    assert card.config_digest({"a": 1, "b": [1, 2]}) == card.config_digest({"b": [1, 2], "a": 1})


def test_predict_on_dicom_equals_the_pipeline_on_the_same_scan(scan, tmp_path):
    out = tmp_path / "out"
    rep = predict_scan(scan["model"], scan["dicom"], out)
    assert sorted(p.name for p in out.iterdir()) == ["cam.png", "mask.nii.gz", "report.json"]
    assert json.loads((out / "report.json").read_text()) == rep
    assert rep["input"]["kind"] == "dicom" and rep["input"]["series"]

    # the workflow's path: convert (both phases picked from the same folder), preprocess to a .npz, score
    nifti = tmp_path / "nifti"
    convert_patient([scan["dicom"]], nifti, "P", None, phases=("nct",))
    preprocess_patient("P", 0, nifti / "nct.nii.gz", nifti / "nct.nii.gz", None, tmp_path / "P.npz", PRE)
    z = np.load(tmp_path / "P.npz")
    entry = variant_entry("nct", {"variants": {"nct": {"pathways": ["nct"]}}})
    pathway = build_model(entry, {"ifa_level": 2})
    pathway.load_state_dict(torch.load(scan["model"] / "model.pt", weights_only=False)["model"])
    pathway = pathway.pathway("nct").eval()
    params = {**scoring.DEFAULTS, "score": "seg_volume"}
    prob, mask = scoring.patient_score(pathway, z["nct"], z["spacing"], (32, 32, 32), params)
    assert rep["probability"] == pytest.approx(prob, abs=1e-6)

    # the mask lies on the input's own grid, and its volume is what the report says
    written = nib.load(out / "mask.nii.gz")
    original = nib.load(nifti / "nct.nii.gz")
    assert written.shape == original.shape and np.allclose(written.affine, original.affine)
    m = np.asarray(written.dataobj)
    voxel_ml = abs(np.linalg.det(original.affine[:3, :3])) / 1000
    assert rep["embolus_volume_ml"] == pytest.approx(m.sum() * voxel_ml, abs=1e-3)
    hu = np.asarray(original.dataobj)
    assert m.sum() == 0 or (hu[m > 0] > -500).mean() > 0.5  # in the body, not in air or lung
    decision = "PE" if rep["probability"] >= THRESHOLD["value"] else "no PE"
    assert rep["decision"] == decision and rep["threshold"] == THRESHOLD
    assert rep["model"]["config_digest"] == card.read_card(scan["model"])["config_digest"]
    assert rep["run_time_s"] > 0


def test_the_exported_bundle_reproduces_predict(scan, tmp_path):
    rep = predict_scan(scan["model"], scan["dicom"], tmp_path / "out")
    bundle = export_bundle(scan["model"], tmp_path / "bundle")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["cpmn_card"]["threshold"] == THRESHOLD
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    # the scan through the bundle's stated preprocessing and score
    nifti = tmp_path / "nifti"
    convert_patient([scan["dicom"]], nifti, "P", None, phases=("nct",))
    grid = prepare_nct(nib.load(nifti / "nct.nii.gz"), parser["preprocessing"], "P", nifti)
    params = {
        **scoring.DEFAULTS,
        "score": parser["score"],
        "seg_volume_half_ml": parser["seg_volume_half_ml"],
    }
    prob, _ = scoring.patient_score(net, grid["nct"], grid["spacing"], tuple(parser["patch_size"]), params)
    assert prob == pytest.approx(rep["probability"], abs=1e-6)
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():
        logits = inferer(torch.from_numpy(grid["nct"])[None, None], lambda x: net(x).seg)
    assert logits.shape == (1, 2, *grid["nct"].shape)


def test_largest_component_by_hand():
    m = np.zeros((10, 10, 10), np.uint8)
    m[1:3, 1:3, 1:3] = 1  # 8 voxels
    m[5:8, 4:7, 6:9] = 1  # 27 voxels, centroid (6, 5, 7)
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10, -20, 5]
    c = largest_component(m, affine)
    assert c["components"] == 2 and c["voxels"] == 27
    assert c["volume_ml"] == pytest.approx(27 * 12 / 1000)
    assert c["centroid_voxel"] == [6, 5, 7] and c["slice_index"] == 7
    assert c["centroid_world_mm"] == [-2.0, -10.0, 26.0]
    assert largest_component(np.zeros((3, 3, 3)), affine) is None


def _soft_tissue_nifti(path: Path) -> Path:
    """A body of soft tissue with no lungs (an abdomen- or limb-like field of view)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in (60, 60, 40)], indexing="ij")
    hu = np.where((x / 0.9) ** 2 + (y / 0.8) ** 2 < 1, 40.0, -1000.0).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([5.0, 5.0, 5.0, 1.0])), path)
    return path


def _bad_model(root: Path, what: str) -> Path:
    d = root / f"model_{what}"
    shutil.copytree(root / "models" / "nct", d)
    c = json.loads((d / card.CARD).read_text())
    if what == "weights":
        (d / "model.pt").unlink()
    elif what == "threshold":
        c["threshold"]["value"] = None
    elif what == "contract":
        c["preprocess_contract"] = CONTRACT - 1
    elif what == "card":
        (d / card.CARD).unlink()
    if (d / card.CARD).exists():
        (d / card.CARD).write_text(json.dumps(c))
    return d


@pytest.mark.parametrize(
    "case, named, reason",
    [
        ("text", "notes.txt", "no CT images"),
        ("empty", "empty", "no CT images"),
        ("no_chest", "belly.nii.gz", "no chest"),
        ("weights", "model.pt", "no weights"),
        ("threshold", "card.json", "no stored threshold"),
        ("contract", "card.json", "preprocessing contract"),
        ("card", "card.json", "no card.json"),
    ],
)
def test_bad_input_is_one_error_line_and_no_output(scan, tmp_path, capsys, case, named, reason):
    model, nct = scan["model"], scan["dicom"]
    if case == "text":
        nct = tmp_path / "notes.txt"
        nct.write_text("not an image\n")
    elif case == "empty":
        nct = tmp_path / "empty"
        nct.mkdir()
    elif case == "no_chest":
        nct = _soft_tissue_nifti(tmp_path / "belly.nii.gz")
    else:
        model = _bad_model(scan["root"], case)
    out = tmp_path / "out"
    rc = main(["predict", "--model", str(model), "--nct", str(nct), "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert rc == 1 and len(err) == 1, err
    assert named in err[0] and reason in err[0], err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@pytest.mark.skipif(not (SHARED / "chest_nct_dicom").is_dir(), reason="../shared is absent")
def test_a_real_chest_nct_goes_through(scan, tmp_path):
    out = tmp_path / "real"
    rep = predict_scan(scan["model"], SHARED / "chest_nct_dicom", out)
    assert math.isfinite(rep["probability"]) and 0.0 <= rep["probability"] <= 1.0
    assert rep["input"]["shape"][2] == 141
    m = np.asarray(nib.load(out / "mask.nii.gz").dataobj) > 0
    nifti = tmp_path / "nifti"
    convert_patient([SHARED / "chest_nct_dicom"], nifti, "real", None, phases=("nct",))
    img = nib.load(nifti / "nct.nii.gz")
    assert m.shape == img.shape
    grid = prepare_nct(img, PRE, "real", nifti)
    assert grid["lung_ml"] > 1000  # whole lungs: litres of air-filled parenchyma
    body = np.asarray(img.dataobj) > -500
    body = np.stack([ndimage.binary_fill_holes(body[:, :, k]) for k in range(body.shape[2])], axis=2)
    assert not (m & ~body).any()  # the mask lies in the body (mediastinum, lungs), never in the air around it


@pytest.mark.skipif(not (SHARED / "dcm_qa_ct" / "In" / "GE").is_dir(), reason="../shared is absent")
def test_a_real_head_ct_is_refused_as_no_chest(scan, tmp_path, capsys):
    head = SHARED / "dcm_qa_ct" / "In" / "GE"
    rc = main(["predict", "--model", str(scan["model"]), "--nct", str(head), "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert rc == 1 and len(err) == 1 and ("no chest" in err[0] or "CT" in err[0]), err
    assert not (tmp_path / "o").exists()


def test_input_body_fills_axial_slices_in_any_voxel_order():
    hu = np.full((12, 10, 8), -1000.0, dtype=np.float32)  # RAS voxel order: axis 2 is axial
    hu[2:10, 2:8, 1:7] = 40.0
    hu[4:8, 4:6, 1:7] = -850.0  # a "lung" enclosed in every axial slice: inside
    hu[4:8, 4:6, 3] = 40.0
    ras = nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.0, 1.0]))
    want = np.zeros(hu.shape, dtype=bool)
    want[2:10, 2:8, 1:7] = True
    assert (input_body(ras, -500.0) == want).all()
    # the scan stored as (I, P, L) voxels: axis 0 is axial, a slice-wise fill along axis 2 would be wrong
    stored = np.ascontiguousarray(hu.transpose(2, 1, 0)[::-1, ::-1, ::-1])
    affine = np.array([[0, 0, -1.0, 11], [0, -1.0, 0, 9], [-2.0, 0, 0, 14], [0, 0, 0, 1]])
    got = input_body(nib.Nifti1Image(stored, affine), -500.0)
    assert (got == want.transpose(2, 1, 0)[::-1, ::-1, ::-1]).all()
    assert got.sum() == want.sum() == 8 * 6 * 6
