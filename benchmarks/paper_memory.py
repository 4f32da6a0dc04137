"""Peak CPU memory and time of one fp32 training step at the paper's scale, and its FLOPs (no GPU needed).

The paper's pathway (config/paper.yaml's ``model`` section: EfficientNet-B0 FlexibleUNet, BatchNorm) on a
224x224x96 patch, batch 1 by default: forward, the Eq. 5 loss of the variant and backward, on random input
with a small embolus block. Peak memory is the process's maximum resident set size (``ru_maxrss``), which on
CPU bounds the activations a GPU would hold in fp32 at the same batch.

FLOPs: the same forward and backward of the network on PyTorch's ``meta`` device under
``torch.utils.flop_counter.FlopCounterMode`` (shapes only, nothing computed; the losses' own FLOPs are
negligible beside the convolutions and are left out). From them, the hours of ``config/paper.yaml``'s schedule
(``epochs x steps_per_epoch`` steps at ``batch_size``) at each sustained throughput of ``--tflops``: an
estimate for a GPU, not a GPU measurement.

    .venv/bin/python benchmarks/paper_memory.py [--variant cpmn] [--batch 1] [--threads 2]
    .venv/bin/python benchmarks/paper_memory.py --flops-only [--tflops 40 100 200]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from cpmn.variants import build_variant

ROOT = Path(__file__).resolve().parents[1]


def step_flops(variant: str, cfg: dict, size: tuple[int, ...]) -> float:
    """FLOPs of one forward + backward of ``variant``'s network on one patch of ``size`` (meta device)."""
    model, _ = build_variant(variant, cfg)
    model = model.to("meta")
    x = {k: torch.empty(1, 1, *size, device="meta") for k in ("ctpa", "nct")}
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        sum(o.seg.float().sum() + o.cls.float().sum() for o in out.values()).backward()
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--variant", default="cpmn", help="variant of config/config.yaml (cpmn: dual, nct: single)"
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flops-only", action="store_true", help="skip the (slow, ~12 GiB) CPU step")
    ap.add_argument(
        "--tflops",
        type=float,
        nargs="+",
        default=[40.0, 100.0, 200.0],
        help="sustained training throughputs (TFLOP/s) to convert the paper's schedule into hours",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    cfg["model"].update(paper["model"])
    size = tuple(paper["patches"]["size"])
    t = paper["train"]
    steps, bs = int(t["epochs"]) * int(t["steps_per_epoch"]), int(t["batch_size"])
    for v in ("nct", "cpmn"):
        f = step_flops(v, cfg, size)
        total = f * bs * steps
        hours = ", ".join(f"{total / (tf * 1e12) / 3600:.1f} h at {tf:g} TFLOP/s" for tf in args.tflops)
        print(
            f"{v}: {f / 1e12:.2f} TFLOP per patch (forward + backward, {size});"
            f" {steps} steps x batch {bs} = {total / 1e18:.2f} EFLOP: {hours}"
        )
    if args.flops_only:
        return
    torch.manual_seed(0)
    model, loss_fn = build_variant(args.variant, cfg)
    batch = {k: torch.rand(args.batch, 1, *size) for k in ("ctpa", "nct")}
    batch["mask"] = torch.zeros(args.batch, 1, *size)
    batch["mask"][..., 100:120, 100:120, 40:50] = 1.0
    batch["label"] = torch.ones(args.batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    total, _ = loss_fn(model(batch), batch["mask"], batch["label"])
    total.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"{args.variant}, {paper['model']['backbone']}, patch {size}, batch {args.batch}, fp32 CPU"
        f" ({args.threads} threads): one step {seconds:.1f} s,"
        f" peak RSS {peak:.1f} GiB (before {before:.1f} GiB)"
    )


if __name__ == "__main__":
    main()
