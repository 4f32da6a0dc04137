"""Benchmark one training step of the single and the dual pathway, and the patch loader against it.

Usage: ``.venv/bin/python benchmarks/train_step.py [--steps 5] [--threads N] [--json OUT]``

Prints, from one run: the step time (forward, Eq. 5 loss, backward, Adam step) of the single pathway
(variant ``nct``) and of the dual pathway (variant ``cpmn``) at the default CPU patch and batch (config.yaml)
and their ratio (goal: dual <= 2.1x single); the loader's patches/s (``PatchDataset`` over fake patients of
the phantom's preprocessed size, MONAI crops and augmentation) against the trainer's consumption
(batch / dual step time; goal >= 3x); the FLOPs of a step (``torch.utils.flop_counter``) over its time
against this machine's rate on one large conv3d (the ratio says how much of the CPU the step uses). With
CUDA also the bf16 dual step time and peak memory at the paper's 224x224x96 with batch 6 (halved until it
fits), with the paper's model section (config/paper.yaml).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from cpmn.data.dataset import PatchDataset
from cpmn.train import train_step
from cpmn.variants import build_variant

ROOT = Path(__file__).resolve().parents[1]


def fake_batch(size, batch, device):
    g = torch.Generator().manual_seed(0)
    b = {k: torch.rand(batch, 1, *size, generator=g) for k in ("ctpa", "nct")}
    mask = torch.zeros(batch, 1, *size)
    mask[
        0, :, size[0] // 2 - 4 : size[0] // 2 + 4, size[1] // 2 - 4 : size[1] // 2 + 4, size[2] // 2 - 3 :
    ] = 1
    b["mask"] = mask
    b["label"] = (mask.flatten(1).amax(1) > 0).float()
    return {k: v.to(device) for k, v in b.items()}


def step_time(variant, cfg, size, batch, steps, warmup, device, amp_dtype=None):
    """(median, min) seconds of one optimiser step and peak CUDA memory (GiB, NaN on CPU).

    The minimum is the better estimate on a machine shared with other jobs."""
    torch.manual_seed(0)
    model, loss_fn = build_variant(variant, cfg)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = fake_batch(size, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(model, loss_fn, opt, b, device, amp_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model, opt
    step_time.cpu_s = statistics.median(cpu)  # CPU seconds: robust to other jobs on the machine
    return statistics.median(times), min(times), peak


def step_flops(variant, cfg, size, batch) -> float:
    """FLOPs of one training step (forward + backward) from ``torch.utils.flop_counter`` (counts conv, matmul
    and the like; 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, loss_fn = build_variant(variant, cfg)
    b = fake_batch(size, batch, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        total, _ = loss_fn(model(b), b["mask"], b["label"])
        total.backward()
    return float(counter.get_total_flops())


def conv3d_rate(repeats: int = 5) -> tuple[float, float]:
    """The machine's conv3d rate (FLOP/s, best of ``repeats``) on one large layer: 32 -> 32 channels, 3^3
    kernel, batch 4 of 48^3 (the size of the network's first stages); and its FLOPs per call."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    x = torch.rand(4, 32, 48, 48, 48)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            conv(x)
        flops = float(counter.get_total_flops())
        conv(x)
        best = min(_timed(conv, x) for _ in range(repeats))
    return flops / best, flops


def _timed(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def loader_rate(size, n_samples=48, patients=4, shape=(64, 48, 41)):
    """Patches per second of ``PatchDataset`` (num_workers = 0) over fake preprocessed patients."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        pre, pat = Path(tmp, "pre"), Path(tmp, "pat")
        pre.mkdir()
        pat.mkdir()
        ids = []
        for k in range(patients):
            pid = f"b{k}"
            mask = np.zeros(shape, np.uint8)
            c = [n // 2 for n in shape]
            mask[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3] = k % 2
            vol = rng.random(shape, dtype=np.float32)
            np.savez_compressed(pre / f"{pid}.npz", nct=vol, ctpa=vol, mask=mask, label=np.array(k % 2))
            centres = rng.integers(0, shape, size=(24, 3))
            positive = np.zeros(24, bool)
            if k % 2:
                centres[:12] = c
                positive[:12] = True
            np.savez(pat / f"{pid}.npz", centres=centres, positive=positive, size=np.array(size))
            ids.append(pid)
        t0 = time.perf_counter()
        ds = PatchDataset(ids, pre, pat, patch_size=size, aug_prob=0.1)
        t_load = time.perf_counter() - t0
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=range(n_samples), num_workers=0)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        return n_samples / (time.perf_counter() - t0), t_load / patients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cpu = torch.device("cpu")
    size, batch = tuple(cfg["patches"]["size"]), int(cfg["train"]["batch_size"])
    res: dict[str, float] = {"threads": torch.get_num_threads()}
    res["single_s"], res["single_min_s"], _ = step_time("nct", cfg, size, batch, args.steps, args.warmup, cpu)
    res["single_cpu_s"] = step_time.cpu_s
    res["dual_s"], res["dual_min_s"], _ = step_time("cpmn", cfg, size, batch, args.steps, args.warmup, cpu)
    res["dual_cpu_s"] = step_time.cpu_s
    res["dual_over_single_cpu"] = res["dual_cpu_s"] / res["single_cpu_s"]
    res["dual_over_single"] = res["dual_s"] / res["single_s"]
    res["dual_over_single_min"] = res["dual_min_s"] / res["single_min_s"]
    res["single_step_gflop"] = step_flops("nct", cfg, size, batch) / 1e9
    res["dual_step_gflop"] = step_flops("cpmn", cfg, size, batch) / 1e9
    res["conv3d_gflop_per_s"], _ = (v / 1e9 for v in conv3d_rate())
    res["single_gflop_per_s"] = res["single_step_gflop"] / res["single_min_s"]
    res["dual_gflop_per_s"] = res["dual_step_gflop"] / res["dual_min_s"]
    res["single_over_conv3d"] = res["single_gflop_per_s"] / res["conv3d_gflop_per_s"]
    res["dual_over_conv3d"] = res["dual_gflop_per_s"] / res["conv3d_gflop_per_s"]
    res["single_patches_per_s"] = batch / res["single_min_s"]
    res["loader_patches_per_s"], res["npz_load_s_per_patient"] = loader_rate(size)
    res["trainer_patches_per_s"] = batch / res["dual_s"]
    res["loader_over_trainer"] = res["loader_patches_per_s"] / res["trainer_patches_per_s"]
    print(f"CPU ({res['threads']} threads), patch {size}, batch {batch}, median of {args.steps} steps:")
    print(f"  single pathway step  {res['single_s']:.3f} s (min {res['single_min_s']:.3f} s)")
    print(
        f"  dual pathway step    {res['dual_s']:.3f} s (min {res['dual_min_s']:.3f} s)  ratio"
        f" {res['dual_over_single']:.2f} (min/min {res['dual_over_single_min']:.2f}; goal <= 2.1)"
    )
    print(
        f"  CPU seconds per step: single {res['single_cpu_s']:.2f}, dual {res['dual_cpu_s']:.2f},"
        f" ratio {res['dual_over_single_cpu']:.2f}"
    )
    print(
        f"  loader {res['loader_patches_per_s']:.1f} patches/s vs trainer {res['trainer_patches_per_s']:.2f}"
        f" patches/s: {res['loader_over_trainer']:.1f}x (goal >= 3);"
        f" npz load {res['npz_load_s_per_patient']:.2f} s/patient"
    )
    print(
        f"  FLOPs per step: single {res['single_step_gflop']:.2f} GFLOP,"
        f" dual {res['dual_step_gflop']:.2f} GFLOP;"
        f" one large conv3d runs at {res['conv3d_gflop_per_s']:.1f} GFLOP/s on this machine"
    )
    print(
        f"  achieved: single {res['single_gflop_per_s']:.1f} GFLOP/s"
        f" ({100 * res['single_over_conv3d']:.0f}% of conv3d),"
        f" dual {res['dual_gflop_per_s']:.1f} GFLOP/s ({100 * res['dual_over_conv3d']:.0f}%);"
        f" single pathway {res['single_patches_per_s']:.1f} patches/s"
    )
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        big = (224, 224, 96)
        # the paper's pathway (EfficientNet-B0 ...) from config/paper.yaml, not the CPU default's plain-cnn
        paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
        paper_cfg = {**cfg, "model": {**cfg["model"], **paper["model"]}}
        for b in (6, 3, 2, 1):
            try:
                for v, key in (("nct", "cuda_single"), ("cpmn", "cuda_dual")):
                    t, _, peak = step_time(v, paper_cfg, big, b, args.steps, args.warmup, dev, dtype)
                    res[f"{key}_s"], res[f"{key}_peak_gib"] = t, peak
                res["cuda_batch"] = b
                break
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        print(f"CUDA {torch.cuda.get_device_name()} {dtype}, patch {big}, batch {res.get('cuda_batch')}:")
        for key in ("cuda_single", "cuda_dual"):
            if f"{key}_s" in res:
                print(f"  {key} step {res[f'{key}_s']:.3f} s, peak {res[f'{key}_peak_gib']:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
