"""The phantom's ceiling per phase for a phantom setting, without the workflow (for calibrating it).

Usage: ``.venv/bin/python benchmarks/synthetic_ceiling.py [--patients 48] [--seed 2026] [--spacing 5]
[--set KEY=JSON ...]``, e.g. ``--set nct_clot_contrast_hu=[10,25]``.

Each patient is generated in memory (:func:`cpmn.synthetic.cohort.generate_patient`); each phase and its
truth lumen are resampled to the preprocessing spacing (trilinear, as ``cpmn preprocess``), windowed as
config.yaml's ``preprocess.hu_window``, and scored by the ceiling observer
(:func:`cpmn.synthetic.observer.observer_score`). The CTPA is scored on its own grid with its own lumen, so no
registration enters; the workflow's ``results/tables/ceiling.tsv`` scores the registered CTPA.
Prints the AUC per phase over all patients (2 processes).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from nibabel.processing import resample_from_to
from sklearn.metrics import roc_auc_score

from cpmn.data.preprocess import target_grid, window
from cpmn.synthetic.cohort import generate_patient, resolve_params
from cpmn.synthetic.observer import SIGN, observer_score

ROOT = Path(__file__).resolve().parents[1]


def one(job: tuple[dict, int, list[float], list[float], dict]) -> dict:
    params, index, spacing, hu_window, obs = job
    res = generate_patient("unused", params, index, write=False, keep_arrays=True)
    a = res["arrays"]
    out = {"label": res["label"]}
    for phase, sign in SIGN.items():
        aff = a[f"{phase}_affine"]
        img = nib.as_closest_canonical(nib.Nifti1Image(a[phase].astype(np.float32), aff))
        lum = nib.as_closest_canonical(nib.Nifti1Image(a[f"lumen_{phase}"].astype(np.float32), aff))
        grid = target_grid(img, spacing)
        x = np.asarray(resample_from_to(img, grid, order=1, cval=-1000.0).dataobj)
        frac = np.asarray(resample_from_to(lum, grid, order=1, cval=0.0).dataobj)
        out[phase] = observer_score(window(x, hu_window), frac, sign, **obs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=48)
    ap.add_argument("--seed", type=int, default=None, help="synthetic.seed (default: config.yaml's)")
    ap.add_argument("--spacing", type=float, default=None, help="mm (default: preprocess.spacing)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="synthetic keys to override")
    args = ap.parse_args()
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    synth = {**cfg["synthetic"], "patients": args.patients}
    if args.seed is not None:
        synth["seed"] = args.seed
    for item in args.set:
        key, _, value = item.partition("=")
        synth[key] = json.loads(value)
    params = resolve_params(synth)
    spacing = [args.spacing] * 3 if args.spacing else cfg["preprocess"]["spacing"]
    window_hu, obs = cfg["preprocess"]["hu_window"], cfg["ceiling"]
    jobs = [(params, i, spacing, window_hu, obs) for i in range(args.patients)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2) as ex:
        rows = list(ex.map(one, jobs))
    y = [r["label"] for r in rows]
    aucs = {ph: round(roc_auc_score(y, [r[ph] for r in rows]), 3) for ph in SIGN}
    print(
        f"seed {params['seed']}, {args.patients} patients ({sum(y)} PE), spacing {spacing} mm,"
        f" {' '.join(args.set) or 'config.yaml'}: ceiling AUC nct {aucs['nct']}, ctpa {aucs['ctpa']}"
        f" ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
