"""What `channels_last_3d`, `torch.compile` and bf16 autocast do to a CPU training step, in one run.

Usage: ``.venv/bin/python benchmarks/step_options.py [--variant nct] [--steps 20] [--threads 1]
[--options eager bf16 ...] [--json OUT]``

Issue 24 asks to try them. For the variant at the demo's patch and batch (config/config.yaml), each option
trains the same model from the same weights on the same fixed batch:

- ``eager``: as the trainer runs today;
- ``channels_last_3d``: the model and the inputs in ``torch.channels_last_3d`` memory format;
- ``compile``: ``torch.compile`` of the model (inductor, the default mode); its first steps (compilation) are
  timed apart from the steady state;
- ``bf16``: the forward pass under ``torch.autocast("cpu", torch.bfloat16)``, as ``train.amp`` does on CUDA
  (the trainer does not do it on CPU); oneDNN runs bf16 convolutions natively on CPUs with AVX512-BF16 or AMX.
  It times the step only: in real training on this CPU it gave NaN weight gradients within 70 steps
  (docs/measurements.md §2).

It prints the median step time of each and its ratio to eager, and the largest difference of the loss over
the steps against eager (the options must train the same network, not another one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from train_step import fake_batch  # benchmarks/train_step.py, beside this script

from cpmn.train import train_step
from cpmn.variants import build_variant

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ("eager", "channels_last_3d", "compile", "bf16")


def run(option: str, variant: str, cfg: dict, steps: int, warmup: int) -> dict[str, object]:
    torch.manual_seed(0)
    model, loss_fn = build_variant(variant, cfg)
    model.train()
    b = fake_batch(tuple(cfg["patches"]["size"]), int(cfg["train"]["batch_size"]), torch.device("cpu"))
    if option == "channels_last_3d":
        model = model.to(memory_format=torch.channels_last_3d)
        b = {
            k: v.contiguous(memory_format=torch.channels_last_3d) if v.dim() == 5 else v for k, v in b.items()
        }
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    net = torch.compile(model) if option == "compile" else model
    amp = torch.bfloat16 if option == "bf16" else None
    times, losses = [], []
    t_start = time.perf_counter()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        total, _ = train_step(net, loss_fn, opt, b, torch.device("cpu"), amp)
        dt = time.perf_counter() - t0
        losses.append(float(total.detach()))
        if i == warmup - 1:
            first = time.perf_counter() - t_start
        if i >= warmup:
            times.append(dt)
    return {"median_s": statistics.median(times), "min_s": min(times), "warmup_s": first, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="nct")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS, help="eager always runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    chosen = ["eager", *(o for o in args.options if o != "eager")]
    res = {o: run(o, args.variant, cfg, args.steps, args.warmup) for o in chosen}
    base = res["eager"]
    print(
        f"{args.variant}, patch {cfg['patches']['size']}, batch {cfg['train']['batch_size']},"
        f" {args.threads} thread(s)"
    )
    for name, r in res.items():
        r["over_eager"] = r["median_s"] / base["median_s"]
        r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True))
        print(
            f"  {name:17s} step {r['median_s']:.3f} s (min {r['min_s']:.3f}), {r['over_eager']:.2f}x eager;"
            f" first {args.warmup} steps {r['warmup_s']:.1f} s;"
            f" max |L_total - eager| {r['max_loss_diff']:.2e}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"variant": args.variant, "threads": args.threads, **res}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
