"""The paper's FUMPE experiment: a single-pathway 2D segmentation network trained on CTPA slices.

The network is MONAI ``FlexibleUNet(backbone, spatial_dims=2)`` without the classification head, trained
with the pathway's L_seg (focal + batch Dice) on axial slices ``(B, 1, rows, columns)`` of the training
patients (a slice with embolus with probability ``pos_fraction``, else any slice; a random ``crop``, centred
near an embolus voxel on positive slices). Each test patient is segmented slice by slice and scored by its
3D Dice against the FUMPE mask; ``results/tables/fumpe_dice.tsv`` holds the Dice per patient and the mean
with a patient-bootstrap 95% CI. The train/test partition is the config's ``fumpe.train`` / ``fumpe.test``.

    cpmn fumpe train --root FUMPE --out results/fumpe --params '{...fumpe section...}'
    cpmn fumpe evaluate --root FUMPE --model results/fumpe/model.pt --out results/tables/fumpe_dice.tsv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import FlexibleUNet
from tqdm import tqdm

from cpmn.config import add_config_arguments, resolve, schema_defaults
from cpmn.data.fumpe import read_fumpe_patient
from cpmn.errors import InputError, atomic_path, report
from cpmn.evaluate.metrics import dice
from cpmn.losses import L_seg
from cpmn.stats import bootstrap_ci
from cpmn.train import resolve_device

#: the ``fumpe:`` section's defaults, from the config schema
DEFAULTS: dict[str, Any] = schema_defaults("fumpe")
COLUMNS = ("patient_id", "dice", "ci_low", "ci_high", "reference_voxels", "predicted_voxels")


def window(hu: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """HU -> [0, 1] (clip to the window, then scale), float32."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def build_network(backbone: str, bn_momentum: float | None = 0.1) -> FlexibleUNet:
    """``FlexibleUNet(in 1, out 2, backbone, spatial_dims=2)``: ``(B, 1, H, W)`` -> ``(B, 2, H, W)`` logits,
    ``H`` and ``W`` multiples of 32. ``bn_momentum`` replaces the momentum of every BatchNorm (MONAI's
    EfficientNet has 0.01; see :class:`cpmn.model.Pathway`), None keeps it."""
    net = FlexibleUNet(in_channels=1, out_channels=2, backbone=backbone, spatial_dims=2, pretrained=False)
    if bn_momentum is not None:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = float(bn_momentum)
    return net


def _load(root: Path, ids: Sequence[str], hu_window: Sequence[float]) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for pid in ids:
        hu, mask, _ = read_fumpe_patient(root, pid)
        if not mask.any():
            raise InputError(
                pid, root / "GroundTruth" / f"{pid}.mat", "empty mask (FUMPE patients all have PE)"
            )
        out[pid] = {"img": window(hu, hu_window).astype(np.float16), "mask": mask}
    return out


def _crop(img: np.ndarray, mask: np.ndarray, centre: tuple[int, int], size: Sequence[int]):
    """A ``size`` crop of one slice around ``centre`` (zero padding outside the image)."""
    out_i = np.zeros(tuple(size), np.float32)
    out_m = np.zeros(tuple(size), np.float32)
    lo = [int(c) - s // 2 for c, s in zip(centre, size, strict=True)]
    src = tuple(slice(max(lo[a], 0), min(lo[a] + size[a], img.shape[a])) for a in range(2))
    dst = tuple(slice(src[a].start - lo[a], src[a].stop - lo[a]) for a in range(2))
    out_i[dst] = img[src]
    out_m[dst] = mask[src]
    return out_i, out_m


def sample_batch(
    data: Mapping[str, Mapping[str, np.ndarray]], cfg: Mapping[str, Any], rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """One training batch: ``image`` ``(B, 1, h, w)`` and ``mask`` ``(B, 1, h, w)`` of ``crop`` (h, w)."""
    ids = sorted(data)
    size = [int(v) for v in cfg["crop"]]
    imgs, masks = [], []
    for _ in range(int(cfg["batch_size"])):
        d = data[ids[rng.integers(len(ids))]]
        if rng.random() < float(cfg["pos_fraction"]):
            vox = np.argwhere(d["mask"])
            r, c, k = vox[rng.integers(len(vox))]
            jitter = rng.integers(-size[0] // 4, size[0] // 4 + 1, size=2)
            centre = (int(r + jitter[0]), int(c + jitter[1]))
        else:
            k = int(rng.integers(d["img"].shape[2]))
            centre = (int(rng.integers(d["img"].shape[0])), int(rng.integers(d["img"].shape[1])))
        i, m = _crop(d["img"][:, :, k], d["mask"][:, :, k], centre, size)
        if rng.random() < 0.5:  # left-right flip
            i, m = i[:, ::-1], m[:, ::-1]
        imgs.append(i.copy())
        masks.append(m.copy())
    return {
        "image": torch.from_numpy(np.stack(imgs))[:, None],
        "mask": torch.from_numpy(np.stack(masks))[:, None],
    }


def train_fumpe(
    root: str | Path, out_dir: str | Path, cfg: Mapping[str, Any] | None = None, progress: bool = False
):
    """Train the 2D network on ``cfg["train"]``'s patients; writes ``model.pt`` and ``train_log.tsv``.

    Returns ``{"steps", "seconds", "first_loss", "last_loss"}`` (the last two: means over the first and the
    last tenth of the steps).
    """
    c = {**DEFAULTS, **(cfg or {})}
    root, out_dir = Path(root), Path(out_dir)
    overlap = sorted(set(c["train"]) & set(c["test"]))
    if overlap:
        raise InputError(None, "fumpe config", f"patients in both train and test: {overlap}")
    data = _load(root, c["train"], c["hu_window"])
    torch.manual_seed(int(c["seed"]))
    rng = np.random.default_rng(int(c["seed"]))
    dev = resolve_device(str(c["device"]))
    net = build_network(str(c["backbone"]), c["bn_momentum"]).to(dev)
    loss_fn = L_seg(dice=True)
    steps = int(c["steps"])
    opt = torch.optim.Adam(net.parameters(), lr=float(c["lr"]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=float(c["lr"]) / 100)
    losses = []
    t0 = time.perf_counter()
    net.train()
    for _ in tqdm(range(steps), disable=not progress, desc="fumpe train"):
        b = sample_batch(data, c, rng)
        loss = loss_fn(net(b["image"].to(dev)), b["mask"].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    tenth = max(1, steps // 10)
    summary = {
        "steps": steps,
        "seconds": seconds,
        "first_loss": float(np.mean(losses[:tenth])),
        "last_loss": float(np.mean(losses[-tenth:])),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "train_log.tsv") as tmp:
        tmp.write_text("step\tL_seg\n" + "".join(f"{i + 1}\t{v:.6f}\n" for i, v in enumerate(losses)))
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save({"model": net.state_dict(), "cfg": c, "summary": summary}, tmp)
    return summary


@torch.no_grad()
def segment_volume(net: torch.nn.Module, img: np.ndarray, batch: int = 8) -> np.ndarray:
    """``(rows, columns, slices)`` image in [0, 1] -> bool mask, slice by slice (each slice zero-padded to
    multiples of 32 and cropped back)."""
    dev = next(net.parameters()).device
    r, c, n = img.shape
    pr, pc = -r % 32, -c % 32
    out = np.zeros(img.shape, bool)
    for k0 in range(0, n, batch):
        sl = np.moveaxis(img[:, :, k0 : k0 + batch].astype(np.float32), 2, 0)  # (b, rows, cols)
        x = torch.from_numpy(np.pad(sl, ((0, 0), (0, pr), (0, pc))))[:, None].to(dev)
        pred = net(x).argmax(1)[:, :r, :c].cpu().numpy().astype(bool)
        out[:, :, k0 : k0 + batch] = np.moveaxis(pred, 0, 2)
    return out


def evaluate_fumpe(
    root: str | Path, model: str | Path, out_tsv: str | Path, bootstrap: int = 1000
) -> list[dict]:
    """Dice per test patient of ``model`` and the mean with a 95% bootstrap CI, written to ``out_tsv``."""
    ckpt = torch.load(model, map_location="cpu", weights_only=False)
    c = ckpt["cfg"]
    net = build_network(str(c["backbone"]))
    net.load_state_dict(ckpt["model"])
    net.eval()
    rows = []
    for pid in c["test"]:
        hu, mask, _ = read_fumpe_patient(root, pid)
        pred = segment_volume(net, window(hu, c["hu_window"]))
        rows.append(
            {
                "patient_id": pid,
                "dice": dice(pred, mask),
                "ci_low": "",
                "ci_high": "",
                "reference_voxels": int(mask.sum()),
                "predicted_voxels": int(pred.sum()),
            }
        )
    d = np.array([r["dice"] for r in rows], float)
    d = np.where(np.isnan(d), 0.0, d)  # a FUMPE patient always has emboli: an empty prediction scores 0
    ci = bootstrap_ci(lambda idx: d[idx].mean(axis=1), len(d), n_resamples=int(bootstrap), seed=0)
    rows.append(
        {
            "patient_id": "mean",
            "dice": ci.estimate,
            "ci_low": ci.ci[0],
            "ci_high": ci.ci[1],
            "reference_voxels": int(sum(r["reference_voxels"] for r in rows)),
            "predicted_voxels": int(sum(r["predicted_voxels"] for r in rows)),
        }
    )
    with atomic_path(out_tsv) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: (f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else v) for k, v in r.items()}
            )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("train", "evaluate"))
    parser.add_argument("--root", required=True, help="FUMPE folder (CT_scans/, GroundTruth/)")
    parser.add_argument("--out", required=True, help="train: model folder | evaluate: the Dice table (.tsv)")
    parser.add_argument("--model", help="evaluate: the trained model.pt")
    parser.add_argument("--bootstrap", type=int, default=1000, help="evaluate: bootstrap resamples of the CI")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--progress", action="store_true")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(int(args.threads))
    try:
        if args.action == "train":
            cfg = resolve(args, "fumpe")
            s = train_fumpe(args.root, args.out, cfg, progress=args.progress)
            print(json.dumps(s))
        else:
            if not args.model:
                raise InputError(None, "--model", "evaluate needs --model")
            rows = evaluate_fumpe(args.root, args.model, args.out, args.bootstrap)
            m = rows[-1]
            print(
                f"FUMPE Dice {100 * m['dice']:.1f}% "
                f"(95% CI {100 * m['ci_low']:.1f}-{100 * m['ci_high']:.1f}), n={len(rows) - 1}"
            )
    except InputError as err:
        return report(err)
    return 0
