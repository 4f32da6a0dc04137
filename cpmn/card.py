"""The model card: what a trained model folder needs to be used on its own (``card.json``).

``cpmn card --model-dir results/models/<variant> --stats results/stats.json --splits results/splits.tsv
--params JSON`` (the workflow's ``model_card`` rule) writes ``results/models/<variant>/card.json`` beside the
weights (``model.pt``). It holds:

* ``variant``, the variant entry and the model config (from ``model.pt``) and the patch size;
* ``convert``, ``preprocess`` and ``infer`` settings of the study (``cpmn predict`` reads a scan with them);
* ``preprocess_contract``: :data:`cpmn.data.preprocess.CONTRACT` when it was trained; a package of another
  contract refuses the folder;
* ``threshold``: the operating point chosen on the validation split by ``cpmn evaluate`` (value, method,
  the split and its size);
* ``training_data``: patients per split and class, the best epoch and its validation AUC, the data digest
  of ``last.pt`` where present;
* ``cpmn_version`` and ``config_digest`` (SHA-256 of the settings above, 16 hex digits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cpmn import __version__, scoring
from cpmn.config import add_config_arguments, resolve
from cpmn.data.preprocess import CONTRACT
from cpmn.errors import InputError, atomic_path, report
from cpmn.variants import variant_score

CARD = "card.json"
#: the config sections a card copies
SECTIONS = ("convert", "preprocess", "infer")


def config_digest(settings: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``settings`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _torch_load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def build_card(
    model_dir: str | os.PathLike,
    stats: dict[str, Any],
    splits: pd.DataFrame,
    cfg: dict[str, Any],
) -> dict[str, Any]:
    """The card of one model folder from its ``model.pt``, the study's ``stats.json`` and splits, and the
    config sections :data:`SECTIONS`. Raises :class:`InputError` when the weights or the variant's
    threshold are missing."""
    model_dir = Path(model_dir)
    weights = model_dir / "model.pt"
    if not weights.is_file():
        raise InputError(None, weights, "no weights (model.pt)")
    ckpt = _torch_load(weights)
    variant = str(ckpt["variant_name"])
    entry = (stats.get("variants") or {}).get(variant)
    threshold = (entry or {}).get("threshold")
    if not threshold or threshold.get("value") is None:
        raise InputError(None, "stats.json", f"no threshold for variant {variant!r}")
    infer_cfg = variant_score(ckpt["variant"], {**scoring.DEFAULTS, **(cfg.get("infer") or {})})
    settings = {
        "variant": variant,
        "entry": ckpt["variant"],
        "model_cfg": ckpt["model_cfg"],
        "patch_size": [int(v) for v in ckpt["patch_size"]],
        "convert": cfg.get("convert") or {},
        "preprocess": cfg.get("preprocess") or {},
        "infer": {k: infer_cfg[k] for k in ("score", "seg_volume_half_ml", "overlap", "sw_batch_size")},
        "preprocess_contract": CONTRACT,
    }
    counts = {
        str(s): {"patients": int(len(g)), "pe": int((g["label"] == 1).sum()) if "label" in g else None}
        for s, g in splits.groupby("split")
    }
    data: dict[str, Any] = {
        "splits": counts,
        "best_epoch": int(ckpt.get("epoch", 0)),
        "best_val_auc": float(ckpt.get("val_auc", float("nan"))),
    }
    last = model_dir / "last.pt"
    if last.is_file():
        data["digest"] = (_torch_load(last).get("data") or {}).get("digest")
    return {
        **settings,
        "threshold": {k: threshold.get(k) for k in ("value", "method", "chosen_on", "n_val")},
        "training_data": data,
        "cpmn_version": __version__,
        "config_digest": config_digest(settings),
    }


def read_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The card of a model folder, checked: it exists, holds a threshold and was written under this
    package's preprocessing contract. Raises :class:`InputError` naming the file otherwise."""
    path = Path(model_dir) / CARD
    if not Path(model_dir).is_dir():
        raise InputError(None, model_dir, "not a model folder")
    if not path.is_file():
        raise InputError(
            None, path, "the model folder holds no card.json (the workflow's model_card rule writes it)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(None, path, f"cannot read the model card ({err})") from err
    threshold = data.get("threshold") or {}
    if threshold.get("value") is None:
        raise InputError(None, path, "the model card holds no stored threshold")
    if data.get("preprocess_contract") != CONTRACT:
        raise InputError(
            None,
            path,
            f"the model was trained with preprocessing contract {data.get('preprocess_contract')!r};"
            f" this cpmn {__version__} reads contract {CONTRACT!r}",
        )
    missing = [k for k in ("variant", "convert", "preprocess", "infer", "patch_size") if k not in data]
    if missing:
        raise InputError(None, path, f"the model card lacks {', '.join(missing)}")
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, help="results/models/<variant>/")
    parser.add_argument("--stats", required=True, help="results/stats.json (the thresholds)")
    parser.add_argument("--splits", required=True, help="results/splits.tsv")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    try:
        try:
            stats = json.loads(Path(args.stats).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(None, args.stats, f"cannot read ({err})") from err
        splits = pd.read_csv(args.splits, sep="\t", dtype={"patient_id": str})
        data = build_card(args.model_dir, stats, splits, {k: cfg.get(k) for k in SECTIONS})
    except InputError as err:
        return report(err)
    with atomic_path(Path(args.model_dir) / CARD) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    thr = float(data["threshold"]["value"])
    print(f"{data['variant']}: card.json (threshold {thr:.3f}, config digest {data['config_digest']})")
    return 0
