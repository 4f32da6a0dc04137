"""Table 2's variants at the paper's scale on the CPU: one training step, then inference and Grad-CAM.

Usage: ``.venv/bin/python benchmarks/paper_baselines.py dml nnunet_joint swinunetr_joint [--threads 2]``

``config/paper.yaml`` over ``config/config.yaml`` (224 x 224 x 96 patches at 1.5 x 1.5 x 3 mm). Per variant it
prints the seconds of one training step at batch 1, the seconds of the sliding-window mask, the centre score
and Grad-CAM on a 240 x 230 x 110 volume (bigger than one patch), the loss terms (finite or not), the mask
and CAM shapes and the process's peak RSS so far (docs/measurements.md §5).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from cpmn import infer, scoring
from cpmn.config import deep_merge, load_yaml
from cpmn.train import train_step
from cpmn.variants import build_variant


def run_one(name: str, cfg: dict) -> dict:
    patch = tuple(cfg["patches"]["size"])
    torch.manual_seed(0)
    model, loss_fn = build_variant(name, cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randn(1, 1, *patch, generator=g) for k in ("ctpa", "nct")}
    batch["mask"] = torch.zeros(1, 1, *patch)
    batch["mask"][0, 0, 100:110, 100:110, 40:46] = 1
    batch["label"] = torch.tensor([1.0])
    t = time.perf_counter()
    model.train()
    _, terms = train_step(model, loss_fn, opt, batch, torch.device("cpu"), None)
    step = time.perf_counter() - t
    pathway = model.pathway("nct").eval()
    vol = np.random.default_rng(0).random((240, 230, 110)).astype(np.float32)
    t = time.perf_counter()
    p = {**scoring.DEFAULTS, "sw_batch_size": 1}
    seg, mask = scoring.patient_score(pathway, vol, (1.5, 1.5, 3.0), patch, {**p, "score": "seg_volume"})
    centre, _ = scoring.patient_score(pathway, vol, None, patch, {**p, "score": "centre"})
    cam = infer.grad_cam(pathway, vol, patch, p)
    return {
        "step_s": round(step, 1),
        "infer_cam_s": round(time.perf_counter() - t, 1),
        "terms": {k: round(v, 4) for k, v in terms.items()},
        "finite": bool(all(np.isfinite(v) for v in terms.values())),
        "mask": list(mask.shape),
        "cam": list(cam.shape),
        "cam_range": [float(cam.min()), float(cam.max())],
        "centre": centre,
        "seg_volume": seg,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = deep_merge(load_yaml("config/config.yaml"), load_yaml("config/paper.yaml"))
    for name in args.variants:
        print(name, json.dumps(run_one(name, cfg)), flush=True)


if __name__ == "__main__":
    main()
