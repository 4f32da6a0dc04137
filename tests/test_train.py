"""Dataset, trainer, resume and variants on two tiny fake patients (P = 32^3, the smallest the net takes)."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cpmn import train as train_mod
from cpmn.data.dataset import PatchDataset
from cpmn.errors import InputError
from cpmn.model import PathwayOutput
from cpmn.scoring import centre_patch_score
from cpmn.train import train_variant
from cpmn.variants import build_variant, load_for_inference

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (40, 40, 24)
P = [32, 32, 32]


def _config(**train):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    # the Table 2 baseline lives in the paper-scale overlay
    cfg["variants"].update(yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["variants"])
    cfg["patches"]["size"] = P
    cfg["train"].update({"epochs": 2, "steps_per_epoch": 2, "batch_size": 2, "device": "cpu", **train})
    return cfg


def test_dataset_crop_is_centred_and_padded(cohort, tmp_path):
    vol = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    np.savez(tmp_path / "q.npz", nct=vol, ctpa=vol + 1, mask=np.zeros(SHAPE, np.uint8), label=np.array(0))
    bank = tmp_path / "bank"
    bank.mkdir()
    np.savez(bank / "q.npz", centres=np.array([[2, 3, 4]]), positive=np.array([False]), size=np.array(P))
    ds = PatchDataset(["q"], tmp_path, bank, patch_size=P, aug_prob=0.0, jitter=0)
    s = ds[0]
    assert s["nct"].shape == (1, 32, 32, 32)
    # the bank centre (2, 3, 4) sits at the patch centre P // 2 = (16, 16, 16)
    assert float(s["nct"][0, 16, 16, 16]) == vol[2, 3, 4]
    assert float(s["ctpa"][0, 16, 16, 16]) == vol[2, 3, 4] + 1
    assert float(s["nct"][0, 14, 13, 12]) == vol[0, 0, 0]
    # the part outside the volume is zero padding: x < 14, y < 13, z < 12
    assert float(s["nct"][0, :14].abs().sum()) == 0.0
    assert float(s["nct"][0, :, :13].abs().sum()) == 0.0
    assert float(s["nct"][0, :, :, :12].abs().sum()) == 0.0


def test_dataset_balanced_and_deterministic(cohort):
    ds = PatchDataset(["p0", "p1"], cohort["pre"], cohort["pat"], patch_size=P, aug_prob=0.5, seed=3)
    samples = [ds[i] for i in range(60)]
    pos = np.mean([float(s["positive"]) for s in samples])
    assert 0.3 < pos < 0.7  # one positive centre among five, drawn half of the time
    # positive draws hold the embolus (jitter 4 < half the block), so their patch label is 1
    assert all(float(s["label"]) == 1.0 for s in samples if float(s["positive"]) == 1.0)
    again = ds[17]
    assert all(torch.equal(again[k], samples[17][k]) for k in again)
    other = PatchDataset(["p0", "p1"], cohort["pre"], cohort["pat"], patch_size=P, aug_prob=0.5, seed=4)
    assert not all(torch.equal(other[i]["nct"], samples[i]["nct"]) for i in range(5))


class _MeanNet(torch.nn.Module):
    """Stub pathway: cls = logit(mean of the input), so the score is the fraction of ones in the patch."""

    def forward(self, x):
        return PathwayOutput(seg=x, cls=self.classify(x), enc=x, dec=x)

    def classify(self, x):
        m = x.mean().clamp(1e-6, 1 - 1e-6)
        return torch.log(m / (1 - m)).reshape(1)


def test_centre_patch_score_pads_and_crops():
    net = _MeanNet()
    # a 10^3 volume of ones is smaller than P: zero padding -> 1000 / 32^3
    small = np.ones((10, 10, 10), np.float32)
    assert centre_patch_score(net, small, P) == pytest.approx(1000 / 32**3, rel=1e-5)
    # a 64^3 volume with ones in x < 32: the centre window x 16..47 holds 16 of 32 x-planes of ones
    big = np.zeros((64, 64, 64), np.float32)
    big[:32] = 1.0
    assert centre_patch_score(net, big, P) == pytest.approx(0.5, rel=1e-5)


def test_a_few_steps_drive_the_loss_down(cohort):
    torch.manual_seed(0)
    cfg = _config()
    model, loss_fn = build_variant("nct", cfg)
    ds = PatchDataset(["p0", "p1"], cohort["pre"], cohort["pat"], patch_size=P, aug_prob=0.0, jitter=0)
    samples = [ds[i] for i in range(12)]
    pos = next(x for x in samples if x["label"] == 1)
    neg = next(x for x in samples if x["label"] == 0)
    batch = torch.utils.data.default_collate([pos, neg])  # one patch with the embolus, one without
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        total, terms = loss_fn(model(batch), batch["mask"], batch["label"])
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(terms)
    # L_clas and the focal part fall fast; the Dice part of L_seg (1 - Dice, near 1 at the start) more slowly
    assert losses[-1]["L_clas"] < 0.7 * losses[0]["L_clas"]
    assert losses[-1]["L_total"] < losses[0]["L_total"] - 0.2


def _weights(path):
    return torch.load(path, weights_only=False)["model"]


def _run(cohort, out, cfg, variant="nct", **kw):
    return train_variant(variant, cohort["splits"], cohort["pre"], cohort["pat"], out, cfg, **kw)


def _count_steps(monkeypatch):
    """Count the optimiser steps that train_variant runs (a run that ignored last.pt would end with the same
    weights, as samples depend only on (seed, i): the count is what proves the resume)."""
    calls = []
    real = train_mod.train_step

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "train_step", counted)
    return calls


@pytest.mark.parametrize("variant", ["nct", "cpmn"])
def test_resumed_run_does_only_the_remaining_steps(cohort, tmp_path, monkeypatch, capsys, variant):
    cfg = _config()
    straight = _run(cohort, tmp_path / "a", cfg, variant=variant)
    _run(cohort, tmp_path / "b", cfg, variant=variant, max_steps=3)  # last.pt after epoch 1 (step 2)
    calls = _count_steps(monkeypatch)
    resumed = _run(cohort, tmp_path / "b", cfg, variant=variant)
    assert len(calls) == 2 and resumed["step"] == 4  # epoch 2 only
    wa, wb = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert straight["rows"][1]["L_total"] == pytest.approx(resumed["rows"][1]["L_total"], rel=1e-6)
    # other settings: the checkpoint is refused and training restarts from step 0 (4 steps)
    calls.clear()
    capsys.readouterr()
    _run(cohort, tmp_path / "b", _config(lr=5e-4), variant=variant)
    assert (
        len(calls) == 4
        and "settings changed since this checkpoint; training from scratch" in capsys.readouterr().out
    )


def test_a_non_finite_loss_stops_training_and_writes_no_model(cohort, tmp_path, monkeypatch, capsys):
    """A NaN patch at the third optimiser step (epoch 2 of 2 x 2 steps) reaches L_total through the real
    model and loss: the run stops at the end of that epoch with one line that names the epoch and the step,
    ``model.pt`` of epoch 1 is removed, and ``last.pt`` stays at epoch 1 (as the NaN run of CPU bf16
    autocast in docs/measurements.md would otherwise have written a model that scores every patient NaN)."""
    calls = []
    real = train_mod.train_step

    def poisoned(model, loss_fn, opt, batch, *args):
        calls.append(1)
        if len(calls) == 3:
            batch = {**batch, "nct": torch.full_like(batch["nct"], float("nan"))}
        return real(model, loss_fn, opt, batch, *args)

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    out = tmp_path / "m"
    with pytest.raises(FloatingPointError, match=r"epoch 2, first at step 3; no model is written"):
        _run(cohort, out, _config())
    assert len(calls) == 4 and not (out / "model.pt").exists()
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 1

    from cpmn.cli import main

    calls.clear()
    capsys.readouterr()
    args = ["train", "--variant", "nct", "--splits", str(cohort["splits"]), "--preprocessed-dir"]
    args += [str(cohort["pre"]), "--patches-dir", str(cohort["pat"]), "--out-dir", str(tmp_path / "cli")]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config()))
    assert main([*args, "--config", str(cfg_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ERROR variant nct: L_total is not finite in epoch 2, first at step 3")


def test_resume_after_kill_equals_straight_run(cohort, tmp_path):
    cfg = _config()
    straight = _run(cohort, tmp_path / "a", cfg)
    assert straight["status"] == "done" and straight["step"] == 4
    stopped = _run(cohort, tmp_path / "b", cfg, max_steps=3)  # killed in the middle of epoch 2
    assert stopped["status"] == "stopped" and stopped["step"] == 3
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"] == 2
    resumed = _run(cohort, tmp_path / "b", cfg)
    assert resumed["status"] == "done" and resumed["step"] == 4
    wa, wb = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the log: two epochs, same losses, lr annealed to lr_min at the last step
    with open(tmp_path / "b" / "train_log.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert list(rows[0]) == [
        "epoch",
        "L_clas",
        "L_seg",
        "L_KL",
        "L_alig",
        "L_disc",
        "L_mutual",
        "L_total",
        "lr",
        "val_auc",
        "val_dice",
        "seconds",
    ]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["lr"]) == pytest.approx(1e-5)
    # cosine after 2 of 4 steps: lr_min + (lr - lr_min) / 2
    assert float(rows[0]["lr"]) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2, rel=1e-4)
    for a, b in zip(straight["rows"], resumed["rows"], strict=True):
        assert a["L_total"] == pytest.approx(b["L_total"], rel=1e-6)
    pathway, phase, _ = load_for_inference(tmp_path / "b" / "model.pt", "cpu")
    assert phase == "nct"
    assert torch.equal(pathway.unet.encoder.stages[0][0].weight, _weights(tmp_path / "b" / "model.pt")[STEM])


STEM = "net.unet.encoder.stages.0.0.weight"


@pytest.mark.parametrize(
    ("val_scores", "aucs", "best_epoch"),
    [
        # (p0 = PE, p1 = normal) per epoch; a tie goes to the later epoch
        ([(0.5, 0.5), (0.9, 0.1), (0.1, 0.9), (0.8, 0.2)], [0.5, 1.0, 0.0, 1.0], 4),
        ([(0.9, 0.1), (0.1, 0.9)], [1.0, 0.0], 1),
        ([(0.1, 0.9), (0.5, 0.5), (0.3, 0.7)], [0.0, 0.5, 0.0], 2),
    ],
)
def test_model_pt_is_the_best_validation_epoch(cohort, tmp_path, monkeypatch, val_scores, aucs, best_epoch):
    """Scripted validation scores: train_log's val_auc follows them and model.pt is the epoch of the best
    AUC (the later one on a tie), holding that epoch's weights."""
    import cpmn.scoring

    scripted = iter(s for epoch in val_scores for s in epoch)
    monkeypatch.setattr(cpmn.scoring, "patient_score", lambda *a, **k: (next(scripted), None))
    cfg = _config(epochs=len(val_scores), steps_per_epoch=1)
    summary = _run(cohort, tmp_path / "m", cfg, progress=False)
    with open(tmp_path / "m" / "train_log.tsv") as fh:
        assert [float(r["val_auc"]) for r in csv.DictReader(fh, delimiter="\t")] == aucs
    best = torch.load(tmp_path / "m" / "model.pt", weights_only=False)
    assert best["epoch"] == best_epoch and best["val_auc"] == max(aucs)
    assert summary["best_val_auc"] == max(aucs)
    last = _weights(tmp_path / "m" / "last.pt")
    same = all(torch.equal(best["model"][k], last[k]) for k in last)
    assert same == (best_epoch == len(val_scores))


def test_val_dice_is_the_mean_over_validation_pe_patients(cohort, tmp_path, monkeypatch):
    """val_dice of train_log: Dice of the mask the validation score produced against the annotation,
    over the PE patients of the validation split (p0 here); half the embolus predicted -> 2/3."""
    import cpmn.scoring

    with np.load(cohort["pre"] / "p0.npz") as z:
        ref = z["mask"].copy()
    half = ref.copy()
    half[:20] = 0  # the block spans x 16:24: keep 20:24, half of it
    monkeypatch.setattr(cpmn.scoring, "patient_score", lambda *a, **k: (0.5, torch.from_numpy(half)))
    _run(cohort, tmp_path / "d", _config(epochs=1, steps_per_epoch=1), progress=False)
    with open(tmp_path / "d" / "train_log.tsv") as fh:
        row = next(csv.DictReader(fh, delimiter="\t"))
    assert float(row["val_dice"]) == pytest.approx(2 / 3, rel=1e-5)


def test_seed_determinism_and_inference_pathway(cohort, tmp_path):
    cfg = _config(epochs=1, steps_per_epoch=1)
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        cfg["train"]["seed"] = seed
        _run(cohort, tmp_path / name, cfg, variant="cpmn")
        runs[name] = _weights(tmp_path / name / "last.pt")
    key = "net.omega2.unet.encoder.stages.0.0.weight"
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"][key], runs["c"][key])
    # inference uses Ω2 on NCT, with the weights of model.pt
    pathway, phase, _ = load_for_inference(tmp_path / "a" / "model.pt", "cpu")
    assert phase == "nct"
    stem = pathway.unet.encoder.stages[0][0].weight
    assert torch.equal(stem, runs["a"][key])
    assert not torch.equal(stem, runs["a"]["net.omega1.unet.encoder.stages.0.0.weight"])
    assert pathway(torch.zeros(1, 1, *P)).seg.shape == (1, 2, *P)


def test_every_variant_builds_and_runs_one_step(cohort):
    cfg = _config()
    ds = PatchDataset(["p0", "p1"], cohort["pre"], cohort["pat"], patch_size=P, aug_prob=0.0)
    batch = torch.utils.data.default_collate([ds[i] for i in range(2)])
    names = set(cfg["variants"])
    assert {
        "ctpa",
        "nct",
        "mls",
        "mls_ifa",
        "cpmn",
        "nct_cls",
        "dml",
        "nnunet_joint",
        "swinunetr_joint",
    } <= names
    for name in sorted(names):
        torch.manual_seed(0)
        model, loss_fn = build_variant(name, cfg)
        entry = cfg["variants"][name]
        assert model.phases == tuple(p for p in ("ctpa", "nct") if p in entry["pathways"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        total, t = loss_fn(model(batch), batch["mask"], batch["label"])
        opt.zero_grad()
        total.backward()
        opt.step()
        assert math.isfinite(t["L_total"])
        w = entry.get("seg_weight", 1.0)
        lam = {k: entry.get(k, 0.0) for k in ("lambda1", "lambda2", "lambda3", "mutual_kl")}
        combo = t["L_clas"] + w * t["L_seg"] + lam["lambda1"] * t["L_KL"] + lam["mutual_kl"] * t["L_mutual"]
        combo += lam["lambda2"] * t["L_alig"] + lam["lambda3"] * t["L_disc"]
        assert t["L_total"] == pytest.approx(combo, rel=1e-5), name
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, name
        if name == "nct_cls":  # classification only: the segmentation head gets no gradient
            head = model.pathway("nct").unet.segmentation_head[0].weight
            assert head.grad is None or not head.grad.abs().any()


def test_dual_variants_transfer_to_omega2_only(cohort):
    """Every dual variant with λ1 or λ2 > 0 logs a non-zero L_KL / L_alig, and in a full step (forward, Eq. 5,
    backward) Ω1's gradients are exactly those of the same variant with λ1 = λ2 = 0: the transfer reaches Ω2
    alone, while Ω2's gradients do change."""
    cfg = _config()
    ds = PatchDataset(["p0", "p1"], cohort["pre"], cohort["pat"], patch_size=P, aug_prob=0.0)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    duals = [
        n
        for n, e in cfg["variants"].items()
        if len(e["pathways"]) == 2 and (e.get("lambda1") or e.get("lambda2"))
    ]
    assert {"mls", "mls_ifa", "cpmn"} <= set(duals)
    for name in duals:
        grads = {}
        for tag, over in (("with", {}), ("without", {"lambda1": 0.0, "lambda2": 0.0})):
            c = copy.deepcopy(cfg)
            c["variants"][name].update(over)
            torch.manual_seed(0)
            model, loss_fn = build_variant(name, c)
            total, terms = loss_fn(model(batch), batch["mask"], batch["label"])
            total.backward()
            grads[tag] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            if tag == "with":
                entry = cfg["variants"][name]
                assert entry["lambda1"] == 0 or terms["L_KL"] > 0, name
                assert entry["lambda2"] == 0 or terms["L_alig"] > 0, name
        omega1 = [k for k in grads["with"] if k.startswith("net.omega1.")]
        omega2 = [k for k in grads["with"] if k.startswith("net.omega2.")]
        assert omega1 and omega2
        assert all(torch.allclose(grads["with"][k], grads["without"][k], atol=1e-7) for k in omega1), name
        assert any(not torch.allclose(grads["with"][k], grads["without"][k]) for k in omega2), name


def test_missing_input_names_patient_and_file(cohort, tmp_path):
    splits = tmp_path / "splits.tsv"
    splits.write_text("patient_id\tsplit\np0\ttrain\npX\ttrain\n")
    with pytest.raises(InputError, match=r"patient pX: .*pX\.npz: preprocessed volume not found"):
        train_variant("nct", splits, cohort["pre"], cohort["pat"], tmp_path / "out", _config())
    assert not (tmp_path / "out").exists()


def test_a_renamed_split_is_an_error_not_an_empty_validation(tmp_path):
    splits = tmp_path / "splits.tsv"
    splits.write_text("patient_id\tsplit\np0\ttrain\np1\tvalidation\n")
    with pytest.raises(InputError, match=r"patient p1: .*splits.tsv: row 2: split 'validation' is not train"):
        train_mod.read_splits(splits)
    splits.write_bytes(b"patient_id\tsplit\np\xe90\ttrain\n")  # Latin-1, e.g. saved from a spreadsheet
    with pytest.raises(
        InputError, match=r"splits.tsv: not UTF-8 text \(invalid continuation byte at byte 18\)"
    ):
        train_mod.read_splits(splits)


def test_a_corrupt_last_pt_is_a_fresh_start_not_a_crash(cohort, tmp_path, capsys):
    cfg = _config()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    res = _run(cohort, tmp_path / "m", cfg)
    assert res["status"] == "done" and res["step"] == 4
    assert f"WARNING {tmp_path / 'm' / 'last.pt'}: cannot resume" in capsys.readouterr().out
    assert torch.load(tmp_path / "m" / "last.pt", weights_only=False)["step"] == 4


def test_a_finished_checkpoint_rewrites_a_removed_model_pt(cohort, tmp_path, capsys):
    """Snakemake deletes model.pt before rerunning train; a finished last.pt of the same settings and data
    restores the best epoch's model.pt without training again (it used to end with no model.pt)."""
    cfg = _config()
    _run(cohort, tmp_path / "m", cfg)
    best = _weights(tmp_path / "m" / "model.pt")
    (tmp_path / "m" / "model.pt").unlink()
    capsys.readouterr()
    again = _run(cohort, tmp_path / "m", cfg)
    assert again["status"] == "done" and again["step"] == 4 and len(again["rows"]) == 2
    assert "resuming after epoch 2/2" in capsys.readouterr().out
    restored = _weights(tmp_path / "m" / "model.pt")
    assert restored.keys() == best.keys() and all(torch.equal(restored[k], best[k]) for k in best)


def test_a_checkpoint_of_other_data_is_never_resumed(cohort, tmp_path, capsys):
    """A half-trained last.pt from another split (or changed volumes) is a fresh start, said in one line,
    and ends with the weights of a run that never saw the old checkpoint."""
    cfg = _config()
    other = tmp_path / "other_splits.tsv"
    other.write_text("patient_id\tsplit\np0\ttrain\np1\ttrain\np1\tval\n")  # p0 left out of val
    _run(cohort, tmp_path / "m", cfg, max_steps=3)
    capsys.readouterr()
    res = train_variant("nct", other, cohort["pre"], cohort["pat"], tmp_path / "m", cfg)
    out = capsys.readouterr().out
    assert res["status"] == "done" and res["step"] == 4
    assert "trained on other data, validation ids changed (2 -> 1: -p0); training from scratch" in out
    fresh = train_variant("nct", other, cohort["pre"], cohort["pat"], tmp_path / "f", cfg)
    assert fresh["step"] == 4
    a, b = _weights(tmp_path / "m" / "last.pt"), _weights(tmp_path / "f" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "m" / "last.pt", weights_only=False)["data"]["val_ids"] == ["p1"]
    # same ids, one volume changed on disk: the digest catches it
    pre2 = tmp_path / "pre2"
    pre2.mkdir()
    for f in cohort["pre"].iterdir():
        (pre2 / f.name).write_bytes(f.read_bytes())
    with np.load(pre2 / "p1.npz") as z:
        arrays = dict(z)
    arrays["nct"] = arrays["nct"] + 0.01
    np.savez(pre2 / "p1.npz", **arrays)
    capsys.readouterr()
    train_variant("nct", other, pre2, cohort["pat"], tmp_path / "m", cfg)
    assert "the preprocessed volumes or patch banks changed; training from scratch" in capsys.readouterr().out


def test_cli_reports_bad_input(cohort, tmp_path, capsys):
    from cpmn.cli import main

    rc = main(
        [
            "train",
            "--config",
            str(ROOT / "config" / "config.yaml"),
            "--variant",
            "nct",
            "--splits",
            str(tmp_path / "nope.tsv"),
            "--preprocessed-dir",
            str(cohort["pre"]),
            "--patches-dir",
            str(cohort["pat"]),
            "--out-dir",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 1
    assert "ERROR patient ?:" in capsys.readouterr().err
    assert train_mod.LOG_COLUMNS[0] == "epoch"
