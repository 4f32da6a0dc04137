"""The paper-scale GPU check: CPMN training steps at 224x224x96, batch 6, bf16 autocast; a sliding window.

``make gpu-check`` runs it on a CUDA machine (``python benchmarks/gpu_check.py --out gpu_check.json``). It
builds the ``cpmn`` variant of config/config.yaml + config/paper.yaml (Ω1 and Ω2: EfficientNet-B0
FlexibleUNet with BatchNorm, IFA on the paper's node count, IFD at full resolution) and trains it with
:func:`cpmn.train.train_step`, the trainer's own step (Adam, bf16 autocast on CUDA, losses in float32), on
a learnable synthetic batch: each sample is noise with, for half of the batch, a bright ellipsoid that is
both the mask and the label, so the losses must fall. Then one sliding-window inference
(:func:`cpmn.scoring.segment`) over a 320x320x128 volume. It prints and writes to ``--out``:

- seconds per step (median after ``--warmup`` steps), samples per second;
- peak GPU memory (``torch.cuda.max_memory_allocated``);
- FLOPs per step (``torch.utils.flop_counter`` on one step) and the achieved TFLOP/s, against the bf16 dense
  peak of the device where known (``--peak-tflops`` to give it);
- the losses of the first and last tenth of the steps (finite and falling is the check);
- the sliding window's seconds.

It stops after ``--steps`` steps or ``--max-seconds`` of training, whichever comes first, so that it ends
within 5 minutes on one H100. ``--device cpu`` with a small ``--patch`` and ``--batch`` runs the same code
on CPU (the test suite does that).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cpmn.config import fill_defaults, load_config
from cpmn.scoring import segment
from cpmn.train import autocast_dtype, train_step
from cpmn.variants import build_variant

ROOT = Path(__file__).resolve().parents[1]
#: dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched on the device name
BF16_PEAK = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM / HBM3
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def synthetic_batch(batch: int, patch: tuple[int, int, int], device: torch.device, seed: int = 0):
    """A learnable batch: noise, and in the first half of the samples a bright ellipsoid (mask and label)."""
    g = torch.Generator().manual_seed(seed)
    x, y, z = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in patch], indexing="ij")
    blob = ((x / 0.3) ** 2 + (y / 0.2) ** 2 + (z / 0.25) ** 2 < 1).float()
    label = (torch.arange(batch) < (batch + 1) // 2).float()
    mask = label[:, None, None, None, None] * blob[None, None]
    noise = 0.1 * torch.randn(batch, 1, *patch, generator=g)
    nct = 0.3 + noise + 0.15 * mask
    ctpa = 0.3 + noise + 0.5 * mask
    out = {"nct": nct, "ctpa": ctpa, "mask": mask, "label": label}
    return {k: v.to(device) for k, v in out.items()}


def device_peak(name: str) -> float | None:
    """The bf16 peak of a device name (first key of :data:`BF16_PEAK` it contains), else None."""
    for key, value in BF16_PEAK.items():
        if key in name:
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="cpmn")
    ap.add_argument("--patch", type=int, nargs=3, default=None, help="default: config/paper.yaml's")
    ap.add_argument("--batch", type=int, default=None, help="default: config/paper.yaml's (6)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=200.0)
    ap.add_argument("--window-volume", type=int, nargs=3, default=[320, 320, 128])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu for the CPU smoke run)", file=sys.stderr)
        return 2
    cfg = fill_defaults(load_config(ROOT / "config" / "config.yaml", ROOT / "config" / "paper.yaml"))
    patch = tuple(args.patch or cfg["patches"]["size"])
    batch = int(args.batch or cfg["train"]["batch_size"])
    torch.manual_seed(0)
    model, loss_fn = build_variant(args.variant, cfg)
    model, loss_fn = model.to(device), loss_fn.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["train"]["lr"]))
    amp = autocast_dtype(device, True)
    data = synthetic_batch(batch, patch, device)

    # FLOPs of one step (the counter runs the real step, which also warms up the kernels)
    with FlopCounterMode(display=False) as counter:
        train_step(model, loss_fn, opt, data, device, amp)
    flops = float(counter.get_total_flops())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        total, terms = train_step(model, loss_fn, opt, data, device, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(total.detach()))
        if time.perf_counter() - start > args.max_seconds:
            break
    steps = len(losses)
    timed = times[args.warmup :] or times
    sec = statistics.median(timed)
    tenth = max(1, steps // 10)
    first, last = statistics.mean(losses[:tenth]), statistics.mean(losses[-tenth:])
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (device_peak(name) if device.type == "cuda" else None)
    achieved = flops / sec / 1e12

    pathway = model.pathway("nct")
    volume = torch.rand(1, 1, *args.window_volume, device=device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        mask = segment(pathway, volume, patch, {"sw_batch_size": 2, "overlap": 0.25})
    if device.type == "cuda":
        torch.cuda.synchronize()
    window_s = time.perf_counter() - t0

    result = {
        "device": name,
        "variant": args.variant,
        "patch": list(patch),
        "batch": batch,
        "amp": str(amp).replace("torch.", "") if amp else "float32",
        "steps": steps,
        "seconds_per_step": sec,
        "samples_per_second": batch / sec,
        "peak_gpu_memory_gib": peak_mem,
        "flops_per_step": flops,
        "achieved_tflops": achieved,
        "peak_bf16_tflops": peak,
        "fraction_of_peak": achieved / peak if peak else None,
        "loss_first_tenth": first,
        "loss_last_tenth": last,
        "losses_finite": all(math.isfinite(v) for v in losses),
        "losses_falling": last < first,
        "last_terms": terms,
        "sliding_window_volume": list(args.window_volume),
        "sliding_window_seconds": window_s,
        "sliding_window_mask_shape": list(mask.shape),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for key, value in result.items():
        print(f"{key}: {value}")
    ok = result["losses_finite"] and result["losses_falling"]
    print("gpu_check: OK" if ok else "gpu_check: FAILED (losses not finite or not falling)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
