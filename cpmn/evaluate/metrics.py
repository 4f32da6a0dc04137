"""Per-variant metrics and paired comparisons from prediction TSVs (no torch).

Definitions (what Table 1 / Table 2 report):

- **AUC** on the test split: ``sklearn.metrics.roc_auc_score`` of ``prob``; CI by DeLong
  (:func:`cpmn.stats.delong_ci`, used in the tables) and by the patient bootstrap (in stats.json).
- **Operating point**: a threshold chosen on the *validation* split and applied unchanged to test;
  a patient is called positive when ``prob >= threshold``. ``youden`` (default): the ``roc_curve``
  threshold maximising Youden's J = TPR - FPR (the highest such threshold on ties); ``fixed``:
  ``fixed_threshold``; ``target_sensitivity``: the highest threshold with validation TPR >= the target.
- **Sensitivity** over PE-positive and **specificity** over PE-negative test patients at that threshold.
- **Dice** of the predicted ``mask`` vs ``ref_mask`` (binarised at 0.5) over PE-positive test patients,
  mean +- sd (sd with ddof = 1). nnU-Net convention: a patient whose prediction and reference are both
  empty has Dice NaN and is dropped from the mean (counted in ``n_both_empty``); an empty prediction
  against a non-empty reference counts as 0.
- **CIs**: 95 % percentile bootstrap over patients, seeded, stratified by class for AUC / sensitivity /
  specificity (every resample keeps both classes); over the scored PE patients for Dice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from cpmn import stats
from cpmn.config import schema_defaults
from cpmn.data.niftiio import load_nifti
from cpmn.data.readers import read_tsv
from cpmn.errors import InputError

REQUIRED_COLUMNS = ("patient_id", "split", "label", "prob")
PATH_COLUMNS = ("mask", "cam", "image", "ref_mask")

#: the ``evaluate:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("evaluate")


@dataclass
class Predictions:
    """One predictions TSV: arrays ``(N,)`` in file order and the optional NIfTI paths (absolute)."""

    path: Path
    split: str
    patient_id: np.ndarray  # (N,) str
    label: np.ndarray  # (N,) int 0/1
    prob: np.ndarray  # (N,) float
    paths: dict[str, list[Path | None]] = field(default_factory=dict)
    #: the name of ``prob``'s score (the ``score`` column; ``None`` when the file has none)
    score: str | None = None
    #: alternative scores of the same patients, ``{score: (N,)}`` (the ``prob_<score>`` columns)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def path_of(self, column: str, i: int) -> Path | None:
        col = self.paths.get(column)
        return None if col is None else col[i]


def load_predictions(path: str | Path, split: str | None = None) -> Predictions:
    """Read and check one predictions TSV (``patient_id, split, label, prob`` + optional paths, the
    optional ``score`` name and ``prob_<score>`` alternative scores).

    Raises:
        InputError: a missing column, a label not 0/1, a non-finite prob (or alternative score), a
            duplicate patient or a split value that differs from ``split`` — naming the patient and the
            file.
    """
    path = Path(path)
    header, rows = read_tsv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(None, path, f"missing column(s) {', '.join(missing)}")
    if not rows:
        raise InputError(None, path, "no rows")
    pids, labels, probs = [], [], []
    extra: dict[str, list[float]] = {c[len("prob_") :]: [] for c in header if c.startswith("prob_")}
    paths: dict[str, list[Path | None]] = {c: [] for c in PATH_COLUMNS if c in header}
    seen: set[str] = set()
    for row in rows:
        pid = (row["patient_id"] or "").strip()
        if not pid:
            raise InputError(None, path, "empty patient_id")
        if pid in seen:
            raise InputError(pid, path, "duplicate patient_id")
        seen.add(pid)
        if split is not None and (row["split"] or "").strip() != split:
            raise InputError(pid, path, f"split is {row['split']!r}, expected {split!r}")
        try:
            lab = float(row["label"])
            prob = float(row["prob"])
        except (TypeError, ValueError) as err:
            raise InputError(
                pid, path, f"label/prob not numeric ({row['label']!r}, {row['prob']!r})"
            ) from err
        if lab not in (0.0, 1.0):
            raise InputError(pid, path, f"label must be 0 or 1, got {row['label']!r}")
        if not math.isfinite(prob):
            raise InputError(pid, path, f"prob is not finite ({row['prob']!r})")
        for name, values in extra.items():
            try:
                x = float(row[f"prob_{name}"])
            except (TypeError, ValueError):
                x = float("nan")
            if not math.isfinite(x):
                raise InputError(pid, path, f"prob_{name} is not a finite number ({row[f'prob_{name}']!r})")
            values.append(x)
        pids.append(pid)
        labels.append(int(lab))
        probs.append(prob)
        for c in paths:
            v = (row.get(c) or "").strip()
            paths[c].append(None if v in ("", "NA", "nan", "None") else (path.parent / v))
    return Predictions(
        path=path,
        split=split or rows[0]["split"],
        patient_id=np.array(pids, dtype=object),
        label=np.array(labels, dtype=int),
        prob=np.array(probs, dtype=float),
        paths=paths,
        score=(rows[0].get("score") or "").strip() or None if "score" in header else None,
        extra={k: np.array(v, dtype=float) for k, v in extra.items()},
    )


# --------------------------------------------------------------------------------------------------
# elementary metrics


def roc_auc(y: np.ndarray, prob: np.ndarray) -> float:
    """scikit-learn ROC AUC; NaN when only one class is present."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, prob))


def choose_threshold(
    y: np.ndarray,
    prob: np.ndarray,
    method: str = "youden",
    fixed_threshold: float = 0.5,
    target_sensitivity: float = 0.9,
) -> float:
    """Operating threshold on validation data (see the module docstring); positive = ``prob >= thr``."""
    if method == "fixed":
        return float(fixed_threshold)
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        raise ValueError("threshold selection needs both classes in the validation split")
    fpr, tpr, thr = roc_curve(y, prob)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the leading +inf ("nothing positive")
    if method == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    if method == "target_sensitivity":
        return float(thr[int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])])
    raise ValueError(f"unknown threshold method {method!r} (youden | fixed | target_sensitivity)")


def sens_spec(y: np.ndarray, decision: np.ndarray) -> tuple[float, float]:
    """Sensitivity (over y == 1) and specificity (over y == 0) of 0/1 decisions; NaN for an empty class."""
    y = np.asarray(y).astype(bool)
    d = np.asarray(decision).astype(bool)
    sens = float(d[y].mean()) if y.any() else float("nan")
    spec = float((~d[~y]).mean()) if (~y).any() else float("nan")
    return sens, spec


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks of the same shape; NaN when both are empty (nnU-Net convention)."""
    p = np.asarray(pred).astype(bool)
    r = np.asarray(ref).astype(bool)
    denom = int(p.sum()) + int(r.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, r).sum()) / denom


def load_mask(path: Path, patient: str) -> np.ndarray:
    """A NIfTI mask as bool ``(X, Y, Z)`` (``> 0.5``); a missing or unreadable file is an InputError."""

    return load_nifti(path, patient, "mask").get_fdata(dtype=np.float32) > 0.5


# --------------------------------------------------------------------------------------------------
# one variant


@dataclass
class VariantEval:
    """Everything the tables and figures need about one variant's test split."""

    variant: str
    patient_id: np.ndarray  # (N,) str, test patients
    label: np.ndarray  # (N,) int
    prob: np.ndarray  # (N,) float
    decision: np.ndarray  # (N,) int, prob >= threshold
    threshold: float
    metrics: dict[str, Any]
    test: Predictions


def _ci_dict(b: stats.BootstrapCI) -> dict[str, Any]:
    return {"ci": list(b.ci), "n_resamples": b.n_resamples, "n_valid": b.n_valid}


def evaluate_variant(
    variant: str, test: Predictions, val: Predictions | None, cfg: dict[str, Any] | None = None
) -> VariantEval:
    """Metrics of one variant: threshold on ``val``, AUC / sens / spec / Dice on ``test`` with CIs."""
    c = {**DEFAULTS, **(cfg or {})}
    y, p = test.label, test.prob
    method = c["threshold"]
    if method == "fixed":
        thr, n_val = float(c["fixed_threshold"]), (0 if val is None else len(val.label))
    else:
        if val is None:
            raise InputError(None, test.path.parent / "val.tsv", f"needed for the {method} threshold")
        try:
            thr = choose_threshold(val.label, val.prob, method, c["fixed_threshold"], c["target_sensitivity"])
        except ValueError as err:
            raise InputError(None, val.path, str(err)) from err
        n_val = len(val.label)
    dec = (p >= thr).astype(int)
    sens, spec = sens_spec(y, dec)
    n_boot, seed = int(c["bootstrap"]), int(c["seed"])

    auc = roc_auc(y, p)
    out: dict[str, Any] = {
        "n_test": int(len(y)),
        "n_pos": int(y.sum()),
        "n_neg": int(len(y) - y.sum()),
        "threshold": {
            "method": method,
            "value": thr,
            "chosen_on": "fixed" if method == "fixed" else "val",
            "n_val": n_val,
            "target_sensitivity": c["target_sensitivity"] if method == "target_sensitivity" else None,
        },
    }
    both = y.min() == 0 and y.max() == 1
    if both:
        dl = stats.delong_ci(y, p)
        bs = stats.bootstrap_ci(lambda i: stats.auc_rows(y[i], p[i]), len(y), n_boot, seed, strata=y)
        out["auc"] = {"value": auc, "ci_delong": list(dl.ci), "var_delong": dl.var, "bootstrap": _ci_dict(bs)}
    else:
        out["auc"] = {"value": float("nan"), "ci_delong": [float("nan")] * 2, "bootstrap": None}

    def _prop(mask_cls: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
        def stat(i: np.ndarray) -> np.ndarray:
            w = mask_cls[i]
            with np.errstate(invalid="ignore", divide="ignore"):
                return (correct[i] & w).sum(axis=1) / w.sum(axis=1)

        b = stats.bootstrap_ci(stat, len(y), n_boot, seed + 1, strata=y)
        return {"value": b.estimate, "n": int(mask_cls.sum()), **_ci_dict(b)}

    pos, correct = y == 1, dec == y
    out["sensitivity"] = _prop(pos, correct)
    out["specificity"] = _prop(~pos, correct)
    out["sensitivity"]["value"], out["specificity"]["value"] = sens, spec
    out["dice"] = _dice_metrics(test, n_boot, seed + 2)
    order = np.argsort(test.patient_id.astype(str), kind="stable")
    return VariantEval(
        variant=variant,
        patient_id=test.patient_id[order],
        label=y[order],
        prob=p[order],
        decision=dec[order],
        threshold=thr,
        metrics=out,
        test=test,
    )


def _dice_metrics(test: Predictions, n_boot: int, seed: int) -> dict[str, Any]:
    if "mask" not in test.paths or "ref_mask" not in test.paths:
        return {
            "mean": float("nan"),
            "sd": float("nan"),
            "n": 0,
            "n_both_empty": 0,
            "ci": None,
            "per_patient": {},
        }
    per: dict[str, float] = {}
    for i in np.flatnonzero(test.label == 1):
        pid = str(test.patient_id[i])
        mp, rp = test.path_of("mask", i), test.path_of("ref_mask", i)
        if mp is None or rp is None:
            continue
        pred, ref = load_mask(mp, pid), load_mask(rp, pid)
        if pred.shape != ref.shape:
            raise InputError(
                pid, mp, f"mask shape {pred.shape} differs from ref_mask shape {ref.shape} ({rp})"
            )
        per[pid] = dice(pred, ref)
    vals = np.array([v for v in per.values() if math.isfinite(v)])
    n_empty = sum(1 for v in per.values() if not math.isfinite(v))
    if len(vals) == 0:
        return {
            "mean": float("nan"),
            "sd": float("nan"),
            "n": 0,
            "n_both_empty": n_empty,
            "ci": None,
            "per_patient": per,
        }
    b = stats.bootstrap_ci(lambda i: vals[i].mean(axis=1), len(vals), n_boot, seed)
    return {
        "mean": float(vals.mean()),
        "sd": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
        "n": int(len(vals)),
        "n_both_empty": n_empty,
        **_ci_dict(b),
        "per_patient": per,
    }


# --------------------------------------------------------------------------------------------------
# comparisons


def _align(a: VariantEval, b: VariantEval) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Indices into a and b of their common test patients (sorted), and warnings."""
    common, ia, ib = np.intersect1d(a.patient_id.astype(str), b.patient_id.astype(str), return_indices=True)
    warn = []
    if len(common) < max(len(a.patient_id), len(b.patient_id)):
        warn.append(
            f"{a.variant} vs {b.variant}: {len(common)} common test patients "
            f"({len(a.patient_id)} and {len(b.patient_id)}); paired tests use the common ones"
        )
    bad = np.flatnonzero(a.label[ia] != b.label[ib])
    if len(bad):
        pid = str(common[bad[0]])
        raise InputError(pid, b.test.path, f"label differs from {a.test.path}")
    return ia, ib, warn


def compare_variants(a: VariantEval, b: VariantEval, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Paired comparison of variant a vs b on their common test patients.

    DeLong for AUC; paired permutation (+ exact McNemar) for sensitivity over positives and
    specificity over negatives, each at the variant's own validation threshold.
    """
    c = {**DEFAULTS, **(cfg or {})}
    ia, ib, warn = _align(a, b)
    y = a.label[ia]
    out: dict[str, Any] = {"a": a.variant, "b": b.variant, "n": int(len(ia)), "warnings": warn}
    if y.min() == 0 and y.max() == 1:
        out["delong"] = stats.delong_test(y, a.prob[ia], b.prob[ib]).to_dict()
    else:
        out["delong"] = None
    ca, cb = (a.decision[ia] == y).astype(int), (b.decision[ib] == y).astype(int)
    for name, sel in (("sensitivity", y == 1), ("specificity", y == 0)):
        t = stats.paired_permutation_test(ca[sel], cb[sel], int(c["permutations"]), int(c["seed"]))
        out[name] = t.to_dict()
    return out


def evaluate_readers(
    readers: dict[str, dict[str, int]], ref: VariantEval, cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Reader metrics on the reference variant's test patients read by every reader, and the model
    (at its validation threshold) vs each reader and vs the mean reader (paired permutation; per-patient
    mean-reader value = fraction of readers correct). Returns a JSON-ready dict."""
    c = {**DEFAULTS, **(cfg or {})}
    test_ids = set(ref.patient_id.astype(str))
    sets = [set(d) & test_ids for d in readers.values()]
    common = sorted(set.intersection(*sets))
    warn = []
    if not common:
        raise InputError(None, None, "reader study: no test patient was read by every reader")
    if any(len(s) != len(common) for s in sets) or len(common) < len(test_ids):
        warn.append(
            f"readers: {len(common)} of {len(test_ids)} test patients were read by every reader; using those"
        )
    foreign = sorted(set().union(*readers.values()) - test_ids)
    if foreign:  # other splits, patients excluded at screening, or a typo'd id
        warn.append(
            f"readers: {len(foreign)} patient id(s) read but not in the test split, not used"
            f" ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})"
        )
    idx = {pid: i for i, pid in enumerate(ref.patient_id.astype(str))}
    sel = np.array([idx[p] for p in common])
    y = ref.label[sel]
    model_ok = (ref.decision[sel] == y).astype(int)
    n_boot, seed, n_perm = int(c["bootstrap"]), int(c["seed"]), int(c["permutations"])
    out: dict[str, Any] = {"n_patients": len(common), "readers": {}, "warnings": warn}
    correct_all = []
    for k, (name, dec_map) in enumerate(sorted(readers.items())):
        dec = np.array([dec_map[p] for p in common], dtype=int)
        ok = (dec == y).astype(int)
        correct_all.append(ok)
        sens, spec = sens_spec(y, dec)
        entry: dict[str, Any] = {"sensitivity": {"value": sens}, "specificity": {"value": spec}}
        for m, cls in (("sensitivity", y == 1), ("specificity", y == 0)):
            b = stats.bootstrap_ci(
                lambda i, cls=cls, ok=ok: _masked_mean(ok, cls, i), len(y), n_boot, seed + 10 + k, strata=y
            )
            entry[m].update(_ci_dict(b))
            t = stats.paired_permutation_test(model_ok[cls], ok[cls], n_perm, seed)
            entry[m]["vs_model"] = {"model": ref.variant, **t.to_dict()}
        out["readers"][name] = entry
    frac = np.mean(correct_all, axis=0)  # (n,) fraction of readers correct per patient
    mean_entry: dict[str, Any] = {}
    for m, cls in (("sensitivity", y == 1), ("specificity", y == 0)):
        b = stats.bootstrap_ci(
            lambda i, cls=cls: _masked_mean(frac, cls, i), len(y), n_boot, seed + 9, strata=y
        )
        t = stats.paired_permutation_test(model_ok[cls], frac[cls], n_perm, seed)
        mean_entry[m] = {
            "value": float(frac[cls].mean()),
            **_ci_dict(b),
            "vs_model": {"model": ref.variant, **t.to_dict()},
        }
    out["mean"] = mean_entry
    return out


def _masked_mean(values: np.ndarray, cls: np.ndarray, i: np.ndarray) -> np.ndarray:
    w = cls[i]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values[i] * w).sum(axis=1) / w.sum(axis=1)


def score_comparison(ev: VariantEval) -> list[dict[str, Any]]:
    """The test AUC of a variant's primary score and of each alternative score of the same model.

    One row per score: ``{"variant", "score", "primary", "n", "auc", "ci_delong", "delong"}``; ``delong``
    (alternative rows only) is the paired DeLong test of the alternative against the primary score on the
    same patients (:func:`cpmn.stats.delong_test`, ``a`` = primary). AUC and CI are NaN / None when the
    test split holds one class only.
    """
    t = ev.test  # file order: the alternative scores are aligned with it (ev.prob is sorted by patient)
    y = t.label
    both = bool(len(y)) and y.min() == 0 and y.max() == 1
    rows = []
    for k, (name, scores) in enumerate([(t.score or "prob", t.prob), *t.extra.items()]):
        row: dict[str, Any] = {
            "variant": ev.variant,
            "score": name,
            "primary": k == 0,
            "n": int(len(y)),
            "auc": float("nan"),
            "ci_delong": None,
            "delong": None,
        }
        if both:
            ci = stats.delong_ci(y, scores)
            row["auc"], row["ci_delong"] = ci.auc, list(ci.ci)
            if k > 0:
                row["delong"] = stats.delong_test(y, t.prob, scores).to_dict()
        rows.append(row)
    return rows
