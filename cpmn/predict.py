"""``cpmn predict``: one new NCT scan through a trained model folder.

``cpmn predict --model results/models/cpmn/ --nct <DICOM folder | NIfTI> --out DIR``

The model folder describes itself (:mod:`cpmn.card`): ``model.pt`` (the weights) and ``card.json`` (the
conversion, preprocessing and inference settings, the threshold chosen on validation, the training data's
summary, the package version). The scan goes through the pipeline's own code, in the workflow's order:

1. a DICOM folder is converted with dcm2niix after the series picking of ``cpmn convert``
   (:func:`cpmn.data.convert.convert_patient`, NCT phase only); a NIfTI is read as it is;
2. :func:`cpmn.data.preprocess.prepare_nct` puts it on the training grid (canonical orientation, spacing, the
   NCT window, body crop) and checks that the field of view holds a chest (air-filled lungs in the body);
3. the patient probability comes from :func:`cpmn.scoring.patient_score` with the model's score, the mask from
   :func:`cpmn.scoring.predict_mask` (kept inside the slice-wise filled body: lungs and mediastinum), the CAM
   from :func:`cpmn.infer.grad_cam`.

``DIR`` receives ``report.json`` (probability, the decision at the stored threshold, the embolus volume in
mL, the largest component's centroid in world mm and its slice index, the model's name, version and config
digest, the run time), ``mask.nii.gz`` on the input's own grid and ``cam.png`` (the axial slice with the most
predicted embolus: CAM overlay and mask contour). Everything is written to a staging folder first: a failure
leaves no partial output, and a bad input is one ``ERROR`` line that names the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from cpmn import __version__, card, infer, scoring
from cpmn.data.convert import convert_patient
from cpmn.data.niftiio import load_nifti
from cpmn.data.preprocess import filled_body, prepare_nct, to_original_grid
from cpmn.errors import InputError, report
from cpmn.evaluate.figures import cam_overview
from cpmn.train import resolve_device
from cpmn.variants import load_for_inference

#: files ``predict`` writes into ``--out``
OUTPUTS = ("report.json", "mask.nii.gz", "cam.png")
#: the id used in messages for the one scan
SCAN_ID = "scan"


def _step(i: int, text: str) -> float:
    """One progress line on the console (stderr) for a slow step; returns the time it started."""
    print(f"[{i}/4] {text}", file=sys.stderr, flush=True)
    return time.perf_counter()


def read_scan(
    path: str | os.PathLike, work: Path, convert_params: dict[str, Any]
) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """The NCT image of ``path`` and a description of where it came from.

    A folder is DICOM: its series are scanned and the NCT is picked as in ``cpmn convert``. A ``.nii`` or
    ``.nii.gz`` file is read as it is. Anything else is read as a single DICOM file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(SCAN_ID, path, "not found")
    if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
        return load_nifti(path, SCAN_ID, "NCT"), {"path": str(path), "kind": "nifti"}
    dicom_dirs = [path]
    if path.is_file():
        single = work / "dicom"
        single.mkdir()
        os.symlink(path.resolve(), single / path.name)
        dicom_dirs = [single]
    try:
        qc = convert_patient(dicom_dirs, work / "nifti", SCAN_ID, convert_params, phases=("nct",))
    except InputError as err:  # name the user's file, not the staging folder it was linked into
        if err.path.startswith(str(work)):
            raise InputError(SCAN_ID, path, err.reason) from err
        raise
    chosen = qc["chosen"]["nct"]
    img = load_nifti(work / "nifti" / "nct.nii.gz", SCAN_ID, "NCT")
    source = {
        "path": str(path),
        "kind": "dicom",
        "series": chosen["series"],
        "series_number": chosen["series_number"],
        "description": chosen["description"],
        "reason": chosen["reason"],
    }
    return img, source


def input_body(img: nib.Nifti1Image, threshold_hu: float) -> np.ndarray:
    """The filled body of ``img`` on its own grid, in its own voxel order: bool of ``img.shape``.

    Voxels above ``threshold_hu``, each axial slice's holes filled (lungs and airways inside), the axial
    slices taken in the canonical (RAS) orientation whatever the stored voxel order.
    """
    own = io_orientation(img.affine)
    ras = axcodes2ornt(("R", "A", "S"))
    hu = apply_orientation(np.asarray(img.dataobj, dtype=np.float32), ornt_transform(own, ras))
    return apply_orientation(filled_body(hu > threshold_hu), ornt_transform(ras, own)).astype(bool)


def largest_component(mask: np.ndarray, affine: np.ndarray) -> dict[str, Any] | None:
    """The largest 26-connected component of ``mask`` ``(X, Y, Z)`` (input grid): its voxel count, volume
    (mL), centroid in voxel and world coordinates (mm, the NIfTI's RAS+ world) and its axial slice index
    (the rounded centroid's third voxel index). None for an empty mask."""
    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    k = int(np.argmax(sizes)) + 1
    centroid = np.asarray(ndimage.center_of_mass(labels == k), dtype=float)
    world = affine[:3, :3] @ centroid + affine[:3, 3]
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    return {
        "components": int(n),
        "voxels": int(sizes[k - 1]),
        "volume_ml": round(float(sizes[k - 1]) * voxel_ml, 3),
        "centroid_voxel": [round(float(c), 2) for c in centroid],
        "centroid_world_mm": [round(float(c), 2) for c in world],
        "slice_index": int(round(float(centroid[2]))),
    }


def predict_scan(
    model_dir: str | os.PathLike,
    nct: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run one scan through the model folder and write :data:`OUTPUTS` into ``out_dir``; returns the report.

    Raises:
        InputError: a model folder without weights, card or threshold, or of another preprocessing
            contract; an input that is not CT, holds no usable series, or shows no chest.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    model_card = card.read_card(model_dir)
    weights = Path(model_dir) / "model.pt"
    if not weights.is_file():
        raise InputError(None, weights, "the model folder holds no weights (model.pt)")
    try:
        pathway, phase, entry = load_for_inference(weights, device)
    except Exception as err:  # a truncated or foreign checkpoint
        raise InputError(None, weights, f"cannot load the trained model ({err})") from err
    if phase != "nct":
        raise InputError(None, weights, f"the model reads {phase.upper()}; predict needs a model of the NCT")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        t = _step(1, f"reading {nct}")
        img, source = read_scan(nct, stage, model_card["convert"])
        timings = {"read_s": time.perf_counter() - t}

        t = _step(2, "preprocessing (canonical grid, spacing, window, body crop)")
        grid = prepare_nct(img, model_card["preprocess"], SCAN_ID, nct)
        timings["preprocess_s"] = time.perf_counter() - t

        t = _step(3, f"scoring ({model_card['infer']['score']}) and segmenting")
        patch = tuple(int(v) for v in model_card["patch_size"])
        params = {**scoring.DEFAULTS, **model_card["infer"]}
        prob, mask = scoring.patient_score(pathway, grid["nct"], grid["spacing"], patch, params, device)
        if mask is None:
            mask = scoring.predict_mask(pathway, grid["nct"], patch, params, device)
        # a mask in the air around the patient is no finding: keep the body, lungs and mediastinum included
        mask = (mask.cpu().numpy() > 0) & grid["body_filled"]
        mask = mask.astype(np.uint8)
        timings["score_s"] = time.perf_counter() - t

        t = _step(4, "Grad-CAM and outputs")
        heat = infer.grad_cam(pathway, grid["nct"], patch, params, device)
        z = int(np.argmax(mask.sum(axis=(0, 1)))) if mask.any() else None
        cam_overview(
            grid["nct"],
            heat,
            grid["spacing"],
            stage / "cam.png",
            f"{Path(nct).name}: p = {prob:.3f} ({model_card['variant']})",
            mask=mask,
            z=z,
        )
        # the coarse grid's body, brought back by nearest neighbour, overhangs the skin by up to half a
        # coarse voxel: keep the input grid's own filled body too
        on_input = to_original_grid(mask, grid, order=0).astype(np.uint8)
        on_input &= input_body(img, float(grid["body_threshold_hu"])).astype(np.uint8)
        affine = np.asarray(grid["orig_affine"], dtype=float)
        nib.save(nib.Nifti1Image(on_input, affine), stage / "mask.nii.gz")
        voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
        threshold = model_card["threshold"]
        result = {
            "probability": round(float(prob), 6),
            "score": params["score"],
            "threshold": threshold,
            "decision": "PE" if prob >= float(threshold["value"]) else "no PE",
            "embolus_volume_ml": round(float(on_input.sum()) * voxel_ml, 3),
            "largest_component": largest_component(on_input, affine),
            "input": {
                **source,
                "shape": [int(v) for v in img.shape],
                "spacing_mm": [round(float(v), 4) for v in img.header.get_zooms()[:3]],
            },
            "model": {
                "name": model_card["variant"],
                "folder": str(model_dir),
                "cpmn_version": model_card["cpmn_version"],
                "config_digest": model_card["config_digest"],
            },
            "cpmn_version": __version__,
            "device": str(device),
            "run_time_s": None,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        result["run_time_s"] = round(time.perf_counter() - t0, 3)
        (stage / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            os.replace(stage / name, out_dir / name)
        return result
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model folder: results/models/<variant>/")
    parser.add_argument("--nct", required=True, help="the NCT scan: a DICOM folder, a DICOM file or a NIfTI")
    parser.add_argument("--out", required=True, help="output folder (report.json, mask.nii.gz, cam.png)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = predict_scan(args.model, args.nct, args.out, resolve_device(args.device))
    except InputError as err:
        return report(err)
    print(
        f"{result['decision']}: probability {result['probability']:.3f} (threshold"
        f" {float(result['threshold']['value']):.3f}), embolus {result['embolus_volume_ml']:.1f} mL,"
        f" {result['run_time_s']:.1f} s -> {args.out}"
    )
    return 0
