"""The trainer can learn what it should: one phantom PE patient's four fixed patches (two on its emboli,
two embolus-free, from the same patient) are fitted, L_clas and L_seg near zero, on each phase (slow)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from nibabel.processing import resample_from_to

from cpmn.data.patches import contains_embolus
from cpmn.data.preprocess import target_grid, window
from cpmn.synthetic.cohort import generate_patient, plan_cohort, resolve_params
from cpmn.variants import build_variant

ROOT = Path(__file__).resolve().parents[1]
P = 32


def _patches(phase: str) -> dict[str, torch.Tensor]:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    params = resolve_params({**cfg["synthetic"], "patients": 8})
    index = int(np.flatnonzero(plan_cohort(params).label.to_numpy() == 1)[0])
    a = generate_patient("unused", params, index, write=False, keep_arrays=True)["arrays"]
    aff = a[f"{phase}_affine"]
    grid = target_grid(nib.as_closest_canonical(nib.Nifti1Image(a[phase].astype(np.float32), aff)), [5.0] * 3)

    def on_grid(arr, order, cval):
        img = nib.as_closest_canonical(nib.Nifti1Image(arr.astype(np.float32), aff))
        return np.asarray(resample_from_to(img, grid, order=order, cval=cval).dataobj)

    x = np.pad(window(on_grid(a[phase], 1, -1000.0), cfg["preprocess"]["hu_window"]), P // 2)
    m = np.pad(on_grid(a[f"mask_{phase}"], 0, 0.0) > 0.5, P // 2)
    rng = np.random.default_rng(0)
    pos, neg = np.argwhere(m), np.argwhere(~contains_embolus(m, (P,) * 3) & (x > 0))
    centres = [pos[i] for i in rng.choice(len(pos), 2, replace=False)]
    centres += [neg[i] for i in rng.choice(len(neg), 2, replace=False)]
    win = [tuple(slice(c - P // 2, c + P // 2) for c in centre) for centre in centres]
    image = torch.tensor(np.stack([x[w] for w in win]), dtype=torch.float32)[:, None]
    mask = torch.tensor(np.stack([m[w] for w in win]), dtype=torch.float32)[:, None]
    return {phase: image, "mask": mask, "label": (mask.flatten(1).amax(1) > 0).float()}


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["ctpa", "nct"])
def test_a_pathway_overfits_fixed_patches(phase):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    batch = _patches(phase)
    assert batch["label"].tolist() == [1.0, 1.0, 0.0, 0.0]
    torch.manual_seed(0)
    model, loss_fn = build_variant(phase, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(120):
        total, terms = loss_fn(model(batch), batch["mask"], batch["label"])
        opt.zero_grad()
        total.backward()
        opt.step()
        first = first or dict(terms)
    assert first["L_clas"] > 0.3 and first["L_seg"] > 0.8  # it starts unfitted
    assert terms["L_clas"] < 0.01, terms
    assert terms["L_seg"] < 0.15, terms  # Dice + focal: the embolus voxels of both patches painted
    model.eval()
    with torch.no_grad():
        out = model.pathway(phase)(batch[phase])
    assert (torch.sigmoid(out.cls.flatten()) > 0.5).tolist() == [True, True, False, False]
