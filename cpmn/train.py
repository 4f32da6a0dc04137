"""Train one variant (single or dual pathway) on balanced patches: per-epoch checkpoints, exact resume.

``cpmn train --variant V --splits S --preprocessed-dir D --patches-dir D --out-dir results/models/V
[--config FILE] [--params JSON] [--max-steps N] [--threads N]``; ``--params`` carries
``{model, train, patches, variants}``. The work is done by :func:`train_variant`.

Optimiser Adam (``train.lr`` = 1e-3), cosine annealing per step to ``train.lr_min`` = 1e-5 over
``epochs × steps_per_epoch`` steps, batch ``train.batch_size``. On CUDA with ``train.amp`` the forward pass
runs under ``torch.autocast`` in bf16 where the GPU supports it (the losses are computed in float32); the
CPU path runs in float32 with ``torch.use_deterministic_algorithms``, so a fixed seed gives identical
weights (bf16 on the CPU gave NaN weight gradients, docs/measurements.md §2). An epoch whose mean
``L_total`` is not finite stops the run with :class:`FloatingPointError`, and no ``model.pt`` is left.
After every epoch: validation (patient-level AUC on the ``val`` split with the score that inference reports,
``infer.score``: :func:`cpmn.scoring.patient_score`), a row of ``train_log.tsv``,
``last.pt`` (model, optimiser, scheduler, python/numpy/torch RNG states and the sampler position) and, when
the validation AUC improves, ``model.pt`` (``last.pt`` keeps a copy of it too). A run started again over
an existing ``last.pt`` of the same settings *and the same data* (ordered train/val ids and a digest of
their preprocessed volumes and patch banks, :func:`data_fingerprint`) resumes from it and ends with the same
weights as an uninterrupted run; a finished one only rewrites a removed ``model.pt``. A checkpoint of other
settings or other data is never resumed: training starts afresh and says why in one line.

Under ``torchrun --nproc_per_node N cpmn train ...`` (DDP; NCCL on CUDA, one GPU per process, gloo on CPU)
each process draws its own ``batch_size / N`` samples of every step (:class:`~cpmn.data.dataset.StepShard`),
the gradients are averaged, and the result equals one process with the whole batch up to floating-point
summation order (the losses are means over samples; ``L_disc``'s batch centres and BatchNorm statistics are
per process, as in any DDP run). Only rank 0 validates and writes ``model.pt``, ``last.pt`` and the log;
every rank resumes from ``last.pt``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from cpmn import scoring
from cpmn.config import add_config_arguments, resolve, schema_defaults
from cpmn.data.dataset import PatchDataset, StepShard, load_patient
from cpmn.data.split import read_splits
from cpmn.errors import InputError, atomic_path, report
from cpmn.evaluate.metrics import dice as mask_dice
from cpmn.losses import TERMS
from cpmn.variants import (
    MODEL_DEFAULTS,
    build_loss,
    build_model,
    inference_phase,
    trains_segmentation,
    variant_entry,
    variant_score,
)

#: the ``train:`` and ``patches:`` sections' defaults, from the config schema (their one source)
TRAIN_DEFAULTS: dict[str, Any] = schema_defaults("train")
PATCH_DEFAULTS: dict[str, Any] = schema_defaults("patches")
LOG_COLUMNS = ("epoch", *TERMS, "lr", "val_auc", "val_dice", "seconds")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but CUDA is not available")
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 on CUDA with AMP where supported, else None (float32)."""
    if amp and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def distributed_setup(device: str = "auto") -> tuple[int, int, bool]:
    """``(rank, world_size, initialised_here)`` under torchrun (``WORLD_SIZE`` > 1), else ``(0, 1, False)``.

    Starts the process group when torchrun's environment asks for one and none exists: NCCL on CUDA, gloo
    on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    dist = torch.distributed
    here = False
    if not dist.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
        here = True
    return dist.get_rank(), dist.get_world_size(), here


def distributed_teardown(initialised_here: bool) -> None:
    """Wait for every rank, then end the process group if :func:`distributed_setup` started it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if initialised_here:
            torch.distributed.destroy_process_group()


def train_step(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step of Eq. 5: forward (autocast when ``amp_dtype``), ``L_total``, backward, step.

    ``batch`` is already on ``device``. Returns ``(L_total, terms)``. The benchmark times exactly this.
    """
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outputs = model(batch)
    total, terms = loss_fn(outputs, batch["mask"], batch["label"])
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return total, terms


def patient_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC (scikit-learn) of patient scores; NaN when only one class is present."""
    if len(set(int(v) for v in labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _save(obj: Mapping[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(dict(obj), tmp)


def data_fingerprint(
    train_ids: Sequence[str], val_ids: Sequence[str], preprocessed_dir: str | Path, patches_dir: str | Path
) -> dict[str, Any]:
    """What a checkpoint was trained on: the ordered train and validation ids and a BLAKE2b digest of
    their preprocessed volumes and (train) patch banks, in that order. A checkpoint whose record differs
    is never resumed: the same settings on another cohort would continue on a different set of patients.
    """
    h = hashlib.blake2b(digest_size=16)
    files = [Path(preprocessed_dir) / f"{pid}.npz" for pid in (*train_ids, *val_ids)]
    files += [Path(patches_dir) / f"{pid}.npz" for pid in train_ids]
    for path in files:
        h.update(path.name.encode() + b"\0")
        try:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            h.update(b"<missing>")  # the dataset reports it by name below
    return {"train_ids": list(train_ids), "val_ids": list(val_ids), "digest": h.hexdigest()}


def _data_change(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """One phrase saying how the data of a checkpoint differ from the data now."""
    if not old:
        return "it records no training data"
    parts = []
    for key, name in (("train_ids", "train"), ("val_ids", "validation")):
        before, now = list(old.get(key, [])), list(new[key])
        if before != now:
            gone, added = sorted(set(before) - set(now)), sorted(set(now) - set(before))
            what = [f"-{', '.join(gone)}" if gone else "", f"+{', '.join(added)}" if added else ""]
            detail = " ".join(w for w in what if w) or "order changed"
            parts.append(f"{name} ids changed ({len(before)} -> {len(now)}: {detail})")
    if not parts and old.get("digest") != new["digest"]:
        parts.append("the preprocessed volumes or patch banks changed")
    return "; ".join(parts)


def train_variant(
    variant: str,
    splits: str | Path,
    preprocessed_dir: str | Path,
    patches_dir: str | Path,
    out_dir: str | Path,
    cfg: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    resume: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``variant`` and write ``model.pt``, ``last.pt`` and ``train_log.tsv`` into ``out_dir``.

    ``cfg`` holds the ``model``, ``train``, ``patches``, ``variants`` and ``infer`` sections (defaults as in
    config/config.yaml for missing keys; ``infer`` gives the validation score, see
    :func:`cpmn.scoring.patient_score`). ``max_steps`` stops the run before optimiser step
    ``max_steps + 1`` without writing anything more, as a kill would (the last epoch checkpoint stays);
    running again with ``resume=True`` continues from ``last.pt``. Returns a summary dict (``status``
    ``"done"`` or ``"stopped"``, ``step``, ``best_val_auc``, ``rows``).
    """
    cfg = dict(cfg or {})
    entry = variant_entry(variant, cfg)
    model_cfg = {**MODEL_DEFAULTS, **(cfg.get("model") or {})}
    tcfg = {**TRAIN_DEFAULTS, **(cfg.get("train") or {})}
    pcfg = {**PATCH_DEFAULTS, **(cfg.get("patches") or {})}
    segments = trains_segmentation(entry)

    # the validation score: infer.score or the variant's own (a bad pairing fails here; `cpmn train` names it)
    icfg = variant_score(entry, {**scoring.DEFAULTS, **(cfg.get("infer") or {})})
    patch_size = [int(s) for s in pcfg["size"]]
    if min(patch_size) < 32:
        raise ValueError(f"patches.size {patch_size}: every axis must be >= 32 (the encoder's stride)")
    out_dir = Path(out_dir)
    epochs, spe, bs = int(tcfg["epochs"]), int(tcfg["steps_per_epoch"]), int(tcfg["batch_size"])
    total_steps = epochs * spe
    fingerprint = json.dumps(
        {
            "variant": entry,
            "model": model_cfg,
            "train": {**tcfg, "device": None},
            "patches": pcfg,
            "val_score": {k: icfg[k] for k in ("score", "seg_volume_half_ml", "overlap")},
        },
        sort_keys=True,
        default=str,
    )

    parts = read_splits(splits)
    train_ids, val_ids = parts.get("train", []), parts.get("val", [])
    if not train_ids:
        raise InputError(None, splits, "no patients in the train split")
    phase = inference_phase(entry)
    val_data = []
    for pid in val_ids:
        vol = load_patient(pid, preprocessed_dir)
        if int(vol["label"]) not in (0, 1):
            raise InputError(pid, Path(preprocessed_dir) / f"{pid}.npz", "label must be 0 or 1")
        val_data.append((pid, vol[phase], int(vol["label"]), vol.get("spacing"), vol["mask"]))
    dataset = PatchDataset(
        train_ids,
        preprocessed_dir,
        patches_dir,
        patch_size=patch_size,
        aug_prob=float(tcfg["aug_prob"]),
        seed=int(tcfg["seed"]),
        jitter=int(tcfg["jitter"]),
        pos_fraction=float(tcfg["pos_fraction"]),
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, own_group = distributed_setup(str(tcfg["device"]))
    if bs % world:
        raise ValueError(f"train.batch_size {bs} is not divisible by the {world} processes of torchrun")
    device = resolve_device(str(tcfg["device"]))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(device, bool(tcfg["amp"]))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False

    _seed_everything(int(tcfg["seed"]))
    model = build_model(entry, model_cfg).to(device)
    fmt = torch.channels_last_3d if tcfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    loss_fn = build_loss(entry, model_cfg).to(device)
    # DDP averages the ranks' gradients of their B / N samples: the gradient of the mean over all B
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=not segments)
    opt = torch.optim.Adam(model.parameters(), lr=float(tcfg["lr"]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=float(tcfg["lr_min"]))

    data = data_fingerprint(train_ids, val_ids, preprocessed_dir, patches_dir)
    start_epoch, step, best_auc, rows, best_state = 0, 0, float("nan"), [], None
    last_path, model_path, log_path = out_dir / "last.pt", out_dir / "model.pt", out_dir / "train_log.tsv"
    if resume and last_path.is_file():
        try:
            ckpt = torch.load(last_path, map_location=device, weights_only=False)
            if not isinstance(ckpt, dict):
                raise TypeError(f"holds a {type(ckpt).__name__}, not a checkpoint")
        except Exception as err:  # a truncated or foreign file: torch raises assorted types
            print(f"WARNING {last_path}: cannot resume ({type(err).__name__}); training from scratch")
            ckpt = {}
        if ckpt and ckpt.get("fingerprint") != fingerprint:
            print(f"{last_path}: settings changed since this checkpoint; training from scratch")
        elif ckpt and ckpt.get("data") != data:
            why = _data_change(ckpt.get("data"), data)
            print(f"{last_path}: trained on other data, {why}; training from scratch")
        elif ckpt:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"])
            start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
            best_auc, rows = float(ckpt["best_val_auc"]), list(ckpt["log"])
            best_state = ckpt.get("best")
            print(f"{last_path}: resuming after epoch {start_epoch}/{epochs}")

    meta = {"variant_name": variant, "variant": entry, "model_cfg": model_cfg, "patch_size": patch_size}
    pin = device.type == "cuda"
    for epoch in range(start_epoch, epochs):
        loader = DataLoader(
            dataset,
            batch_size=bs // world,
            sampler=StepShard(epoch * spe, (epoch + 1) * spe, bs, rank, world),
            num_workers=int(tcfg["num_workers"]),
            pin_memory=pin,
            generator=torch.Generator().manual_seed(0),  # keeps the global torch RNG untouched
        )
        model.train()
        sums = dict.fromkeys(TERMS, 0.0)
        first_bad: int | None = None  # the first step of this process whose L_total is not finite
        t0 = time.perf_counter()
        # disable=None: tqdm draws only on a terminal; a rule's log file gets the per-epoch lines alone
        bar = tqdm(
            loader,
            total=spe,
            desc=f"{variant} {epoch + 1}/{epochs}",
            disable=None if progress else True,
            leave=False,
        )
        for batch in bar:
            if max_steps is not None and step >= max_steps:
                bar.close()
                distributed_teardown(own_group)
                return {"status": "stopped", "step": step, "best_val_auc": best_auc, "rows": rows}
            batch = {
                k: v.to(
                    device, non_blocking=pin, memory_format=fmt if v.dim() == 5 else torch.preserve_format
                )
                for k, v in batch.items()
            }
            total, terms = train_step(net, loss_fn, opt, batch, device, amp_dtype)
            sched.step()
            step += 1
            for k in TERMS:
                sums[k] += terms[k]
            if first_bad is None and not math.isfinite(terms["L_total"]):
                first_bad = step
            bar.set_postfix(loss=f"{terms['L_total']:.4f}")
        bar.close()
        if world > 1:  # the epoch's mean terms over every rank's samples, as one process would log them
            means = torch.tensor([sums[k] for k in TERMS], dtype=torch.float64)
            torch.distributed.all_reduce(means)
            sums = {k: float(v) / world for k, v in zip(TERMS, means, strict=True)}
        if not math.isfinite(sums["L_total"]):  # every rank sees the same all-reduced sum: all stop together
            distributed_teardown(own_group)
            if rank == 0:
                model_path.unlink(missing_ok=True)
            where = f", first at step {first_bad}" if first_bad is not None else " (on another rank)"
            raise FloatingPointError(
                f"L_total is not finite in epoch {epoch + 1}{where}; no model is written"
                f" (the last finite epoch's checkpoint {last_path.name} is kept)"
            )
        if rank > 0:  # rank 0 validates and writes; the others go on to the next epoch's first all-reduce
            continue

        pathway = model.pathway(phase)
        scores, dices = [], []
        for _, v, lab, sp, ref in val_data:
            score, mask = scoring.patient_score(pathway, v, sp, patch_size, icfg, device)
            scores.append(score)
            if lab == 1 and segments:
                if mask is None:  # a score that needs no mask: segment for the curve's Dice only
                    mask = scoring.predict_mask(pathway, v, patch_size, icfg, device)
                dices.append(mask_dice(np.asarray(mask), ref))
        auc = patient_auc([d[2] for d in val_data], scores)
        dice = float(np.nanmean(dices)) if dices and not np.isnan(dices).all() else float("nan")
        row = {"epoch": epoch + 1, **{k: sums[k] / spe for k in TERMS}}
        row.update(
            lr=float(sched.get_last_lr()[0]), val_auc=auc, val_dice=dice, seconds=time.perf_counter() - t0
        )
        rows.append(row)
        # Ties go to the later epoch: on a small validation split the AUC often repeats, and the later
        # checkpoint has seen more data.
        improved = (not math.isnan(auc) and (math.isnan(best_auc) or auc >= best_auc)) or (
            math.isnan(best_auc) and math.isnan(auc)
        )
        if improved or best_state is None:
            best_auc = auc if improved else best_auc
            weights = copy.deepcopy(model.state_dict())
            best_state = {**meta, "model": weights, "epoch": epoch + 1, "val_auc": auc}
            _save(best_state, model_path)
        elif not model_path.is_file():
            _save(best_state, model_path)
        _save(
            {
                **meta,
                "fingerprint": fingerprint,
                "data": data,
                "best": best_state,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": _rng_state(),
                "epoch": epoch + 1,
                "step": step,
                "sampler_position": step * bs,
                "best_val_auc": best_auc,
                "log": copy.deepcopy(rows),
            },
            last_path,
        )
        _write_log(log_path, rows)
        if progress:
            print(f"{variant} epoch {epoch + 1}/{epochs}: L_total {row['L_total']:.4f} val_auc {auc:.3f}")
    distributed_teardown(own_group)
    if rank > 0:
        return {"status": "done", "step": step, "best_val_auc": best_auc, "rows": rows}
    if not model_path.is_file():
        # a finished checkpoint resumed after model.pt was removed (Snakemake deletes a rerun job's outputs)
        if best_state is None:
            raise InputError(None, last_path, "finished checkpoint holds no best model; delete it and rerun")
        _save(best_state, model_path)
    if not log_path.is_file():
        _write_log(log_path, rows)
    return {"status": "done", "step": step, "best_val_auc": best_auc, "rows": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", required=True, help="variant name (an entry of the variants section)")
    parser.add_argument("--splits", required=True, help="splits TSV (patient_id, split)")
    parser.add_argument("--preprocessed-dir", required=True, help="folder of {pid}.npz preprocessed volumes")
    parser.add_argument("--patches-dir", required=True, help="folder of {pid}.npz patch banks")
    parser.add_argument("--out-dir", required=True, help="output folder (model.pt, last.pt, train_log.tsv)")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop before this many steps (simulates a kill)"
    )
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = train_variant(
            args.variant,
            args.splits,
            args.preprocessed_dir,
            args.patches_dir,
            args.out_dir,
            cfg,
            max_steps=args.max_steps,
            resume=not args.no_resume,
            progress=not args.no_progress,
        )
    except InputError as err:
        return report(err)
    except (KeyError, ValueError, FloatingPointError) as err:
        print(f"ERROR variant {args.variant}: {err}", file=sys.stderr)
        return 1
    auc = summary["best_val_auc"]
    print(f"{args.variant}: {summary['status']} after {summary['step']} steps, best val AUC {auc:.3f}")
    return 0
