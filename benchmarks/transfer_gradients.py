"""How hard each transfer loss pulls on Ω2: per-term gradient norms on the NCT pathway's weights.

Issue 24 asks why the transfer (L_KL, L_alig, L_disc) does not lift Ω2 on the phantom benchmark. This measures
the mechanism directly. For a trained dual variant (``model.pt``) and, for comparison, the same variant at its
initialisation (``train.seed``), it draws ``--batches`` training batches exactly as training does
(:class:`cpmn.data.dataset.PatchDataset`, indices 0..), and for each batch computes the gradient on Ω2's
parameters of every weighted term of Eq. 5 separately:

- task: ``L_clas + L_seg`` of the NCT pathway;
- ``lambda1 * L_KL``, ``lambda2 * L_alig``, ``lambda3 * L_disc`` (the NCT pathway's part).

It reports the median over batches of ``|g_term| / |g_task|`` and of ``cos(g_term, g_task)``. A ratio near 0
means the term cannot steer Ω2 at the paper's λ, whatever its sign.

    python benchmarks/transfer_gradients.py --results results/benchmark --config config/config.yaml \\
        config/benchmark.yaml --variant cpmn --batches 8 --out docs/benchmark/synthetic/transfer_gradients.tsv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from cpmn.config import load_config
from cpmn.data.dataset import PatchDataset
from cpmn.data.split import read_splits
from cpmn.train import MODEL_DEFAULTS, TRAIN_DEFAULTS, _seed_everything
from cpmn.variants import build_loss, build_model, variant_entry

TERMS = ("L_KL", "L_alig", "L_disc")


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The gradient of ``loss`` on ``params`` as one vector (zeros where a parameter is not reached)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    pairs = zip(grads, params, strict=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in pairs])


def term_gradients(model, loss_fn, batch) -> dict[str, torch.Tensor]:
    """Ω2's gradient of the NCT task loss and of each weighted transfer term on one batch (train mode)."""
    params = [p for p in model.pathway("nct").parameters() if p.requires_grad]
    out = model(batch)
    o = out["nct"]
    task = loss_fn.clas(o.cls, batch["label"]) + loss_fn.seg_weight * loss_fn.seg(o.seg, batch["mask"])
    weighted = {
        "L_KL": loss_fn.lambda1 * loss_fn.kl(out["ctpa"].cls, o.cls),
        "L_alig": loss_fn.lambda2 * loss_fn.alig(out["ctpa"].enc, o.enc),
        "L_disc": loss_fn.lambda3 * loss_fn.disc(o.dec, batch["mask"]),
    }
    grads = {"task": flat_grad(task, params)}
    for name, value in weighted.items():
        grads[name] = flat_grad(value, params) if value.requires_grad else torch.zeros_like(grads["task"])
    return grads


def measure(model, loss_fn, dataset, batches: int, batch_size: int) -> dict[str, dict[str, float]]:
    """Median ratio and cosine of every transfer term against the task gradient over ``batches`` batches."""
    ratios: dict[str, list[float]] = {t: [] for t in TERMS}
    cosines: dict[str, list[float]] = {t: [] for t in TERMS}
    model.train()
    for b in range(batches):
        items = [dataset[b * batch_size + i] for i in range(batch_size)]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("ctpa", "nct", "mask", "label")}
        g = term_gradients(model, loss_fn, batch)
        norm_task = float(g["task"].norm())
        for t in TERMS:
            ratios[t].append(float(g[t].norm()) / max(norm_task, 1e-12))
            cosines[t].append(float(torch.nn.functional.cosine_similarity(g[t], g["task"], dim=0)))
    return {
        t: {"ratio": statistics.median(ratios[t]), "cosine": statistics.median(cosines[t])} for t in TERMS
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="the study's results folder (models/, splits.tsv, ...)")
    ap.add_argument("--config", nargs="+", default=["config/config.yaml"], help="the study's config files")
    ap.add_argument("--variant", nargs="+", default=["mls", "mls_ifa", "cpmn"])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--out", required=True, help="TSV to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(*args.config)
    res = Path(args.results)
    tcfg = {**TRAIN_DEFAULTS, **(cfg.get("train") or {})}
    model_cfg = {**MODEL_DEFAULTS, **(cfg.get("model") or {})}
    dataset = PatchDataset(
        read_splits(res / "splits.tsv")["train"],
        res / "preprocessed",
        res / "patches",
        patch_size=(cfg.get("patches") or {}).get("size", [64, 64, 32]),
        aug_prob=float(tcfg["aug_prob"]),
        seed=int(tcfg["seed"]),
        jitter=int(tcfg["jitter"]),
        pos_fraction=float(tcfg["pos_fraction"]),
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows = []
    for name in args.variant:
        entry = variant_entry(name, cfg)
        loss_fn = build_loss(entry, model_cfg)
        for state in ("init", "trained"):
            _seed_everything(int(tcfg["seed"]))
            model = build_model(entry, model_cfg)
            if state == "trained":
                ckpt = torch.load(res / "models" / name / "model.pt", map_location="cpu", weights_only=False)
                model.load_state_dict(ckpt["model"])
            stats = measure(model, loss_fn, dataset, args.batches, int(tcfg["batch_size"]))
            for t in TERMS:
                rows.append(
                    {
                        "variant": name,
                        "state": state,
                        "term": t,
                        **{k: f"{v:.4g}" for k, v in stats[t].items()},
                    }
                )
                print(name, state, t, rows[-1]["ratio"], rows[-1]["cosine"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        fh.write(f"# benchmarks/transfer_gradients.py, commit {commit}, {args.batches} batches per row\n")
        w = csv.DictWriter(fh, fieldnames=["variant", "state", "term", "ratio", "cosine"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
