"""Peak CPU memory and time of one fp32 training step at the paper's scale (no GPU needed).

The paper's pathway (config/paper.yaml's ``model`` section: EfficientNet-B0 FlexibleUNet, BatchNorm) on a
224x224x96 patch, batch 1 by default: forward, the Eq. 5 loss of the variant and backward, on random input
with a small embolus block. Peak memory is the process's maximum resident set size (``ru_maxrss``), which on
CPU bounds the activations a GPU would hold in fp32 at the same batch.

    .venv/bin/python benchmarks/paper_memory.py [--variant cpmn] [--batch 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
import yaml

from cpmn.variants import build_variant

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--variant", default="cpmn", help="variant of config/config.yaml (cpmn: dual, nct: single)"
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    cfg["model"].update(paper["model"])
    torch.manual_seed(0)
    model, loss_fn = build_variant(args.variant, cfg)
    size = tuple(paper["patches"]["size"])
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
