"""``cpmn export-bundle``: a model folder as a MONAI bundle, for the ``monai.bundle`` tools.

``cpmn export-bundle --model results/models/cpmn/ --out bundles/cpmn_nct``

writes the bundle layout of the MONAI Bundle specification:

* ``configs/metadata.json``: versions (bundle, MONAI, PyTorch, NumPy, cpmn), the task, the input and output
  formats (``network_data_format``) and the model card (``cpmn_card``: preprocessing, threshold, training
  data);
* ``configs/inference.json``: ``network_def`` (a :class:`cpmn.model.Pathway` built with the trained
  settings), ``network``, a ``SlidingWindowInferer`` of the patch size, the patient ``score`` and its
  parameters, the ``threshold``, and the ``preprocessing`` settings a scan must be put through first
  (:func:`cpmn.data.preprocess.prepare_nct`);
* ``models/model.pt``: the state dict of the NCT pathway (Ω2 of a dual-pathway variant).

``monai.bundle.ConfigParser`` reads ``inference.json`` and instantiates the network; loading
``models/model.pt`` into it gives the pathway ``cpmn predict`` uses (tests/test_predict.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from cpmn import __version__, card
from cpmn.errors import InputError, report
from cpmn.variants import MODEL_DEFAULTS, baseline_spec, load_for_inference


def network_def(model_cfg: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The ``network_def`` of ``inference.json``: the trained pathway's class (:class:`cpmn.model.Pathway`, or
    a Table 2 baseline's from :mod:`cpmn.baselines`) with the trained settings."""
    m = {**MODEL_DEFAULTS, **model_cfg}
    spec = baseline_spec(entry, m)
    if spec:
        return {"_target_": f"{spec[0].__module__}.{spec[0].__name__}", **spec[1]}
    return {
        "_target_": "cpmn.model.Pathway",
        "backbone": entry["backbone"],
        "ifa_level": int(m["ifa_level"]),
        "bn_momentum": float(m["bn_momentum"]),
        "norm": str(m["norm"]),
        "decoder_channels": [int(c) for c in m["decoder_channels"]],
        "cls_level": int(m["cls_level"]),
        "cls_pool": str(m["cls_pool"]),
    }


def export_bundle(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the bundle of ``model_dir`` (weights and card) to ``out``; returns ``out``. The folder appears
    whole or not at all."""
    model_card = card.read_card(model_dir)
    weights = Path(model_dir) / "model.pt"
    if not weights.is_file():
        raise InputError(None, weights, "the model folder holds no weights (model.pt)")
    try:
        pathway, phase, entry = load_for_inference(weights)
    except Exception as err:
        raise InputError(None, weights, f"cannot load the trained model ({err})") from err
    if phase != "nct":
        raise InputError(None, weights, f"the model reads {phase.upper()}; bundles are for NCT models")
    patch = [int(v) for v in model_card["patch_size"]]
    inference = {
        "imports": ["$import torch", "$import cpmn.model", "$import cpmn.baselines"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(model_card["model_cfg"], entry),
        "network": "$@network_def.to(@device)",
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": patch,
            "sw_batch_size": int(model_card["infer"]["sw_batch_size"]),
            "overlap": float(model_card["infer"]["overlap"]),
            "mode": "gaussian",
        },
        "patch_size": patch,
        "score": model_card["infer"]["score"],
        "seg_volume_half_ml": float(model_card["infer"]["seg_volume_half_ml"]),
        "threshold": model_card["threshold"],
        "preprocessing": model_card["preprocess"],
    }
    metadata = {
        "version": __version__,
        "changelog": {__version__: f"exported from {model_card['variant']} ({model_card['config_digest']})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"cpmn-pe": __version__},
        "task": "Pulmonary embolism identification and segmentation on non-contrast chest CT (CPMN)",
        "description": (
            "The NCT pathway of a cpmn-pe model. Input: an NCT volume put through cpmn's preprocessing"
            " (canonical grid, spacing, NCT HU window scaled to [0, 1], body crop). Output: 2-class embolus"
            " segmentation logits and, through Pathway.classify, the classifier logit."
        ),
        "authors": "cpmn-pe",
        "copyright": "see the cpmn-pe repository",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", "1": "embolus"},
                }
            },
        },
        "cpmn_card": model_card,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        (stage / "configs").mkdir()
        (stage / "models").mkdir()
        (stage / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (stage / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
        torch.save(pathway.state_dict(), stage / "models" / "model.pt")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model folder: results/models/<variant>/")
    parser.add_argument("--out", required=True, help="the bundle folder to write")


def run(args: argparse.Namespace) -> int:
    try:
        out = export_bundle(args.model, args.out)
    except InputError as err:
        return report(err)
    print(f"MONAI bundle -> {out}")
    return 0
