"""The evaluation stage: metrics, statistics, Table 1, Table 2 and Fig. 2 from prediction TSVs.

No torch: a user can evaluate predictions that came from another tool, as long as they follow the
predictions contract (docs/contracts.md). :func:`evaluate_study` is what ``cpmn evaluate`` calls.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cpmn.config import deep_merge, schema_defaults
from cpmn.data.readers import load_readers
from cpmn.errors import InputError, atomic_path
from cpmn.evaluate import figures, tables
from cpmn.evaluate import metrics as M

#: the ``evaluate:`` section's defaults, from the config schema (their one source)
DEFAULTS: dict[str, Any] = schema_defaults("evaluate")

__all__ = ["evaluate_study", "DEFAULTS"]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _load_variant(variant: str, folder: Path, need_val: bool) -> tuple[M.Predictions, M.Predictions | None]:
    test_p, val_p = folder / "test.tsv", folder / "val.tsv"
    if not test_p.is_file():
        raise InputError(None, test_p, f"variant {variant}: predictions file not found")
    test = M.load_predictions(test_p, "test")
    val = M.load_predictions(val_p, "val") if val_p.is_file() else None
    if val is None and need_val:
        raise InputError(None, val_p, f"variant {variant}: needed to choose the threshold on validation")
    return test, val


#: the outputs of :func:`evaluate_study` (stems; each in several formats)
OUTPUT_TABLES = ("table1_ablation", "table2_comparison", "score_comparison")
OUTPUT_FIGURES = ("fig2a_roc", "fig2b_case")
#: fewer validation patients than this in a class: the threshold choice is warned about
MIN_VAL_PER_CLASS = 3


def evaluate_study(
    predictions: Mapping[str, str | Path],
    out_tables: str | Path,
    out_figures: str | Path,
    stats_path: str | Path,
    readers: str | Path | None = None,
    cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate every variant and write Table 1, Table 2, Fig. 2a/2b and ``stats.json``.

    Args:
        predictions: variant -> folder holding ``test.tsv`` (and ``val.tsv``, needed unless the threshold
            method is ``fixed``).
        out_tables: folder for ``table1_ablation.{tsv,md,tex}``, ``table2_comparison.{tsv,md,tex}`` and
            ``score_comparison.{tsv,md}`` (:func:`cpmn.evaluate.metrics.score_comparison`).
        out_figures: folder for ``fig2a_roc.{png,pdf}`` and ``fig2b_case.{png,pdf}``.
        stats_path: the JSON with every metric, CI, threshold, p-value and warning.
        readers: optional reader-study TSV (``reader, patient_id, decision``).
        cfg: the ``evaluate`` config section (missing keys take :data:`DEFAULTS`).

    Returns:
        The stats dict that was written. All input is read and checked before anything is written; on
        an error during writing the files written so far are removed.

    Raises:
        InputError: bad or missing input, naming the patient and the file.
    """
    c = deep_merge(DEFAULTS, cfg or {})
    # A failed run leaves no table or figure of an earlier run beside the new ones: every format goes first.
    for folder, stems in ((out_tables, OUTPUT_TABLES), (out_figures, OUTPUT_FIGURES)):
        for stem in stems:
            for ext in ("tsv", "md", "tex", "png", "pdf"):
                (Path(folder) / f"{stem}.{ext}").unlink(missing_ok=True)
    Path(stats_path).unlink(missing_ok=True)
    warnings: list[str] = []
    need_val = c["threshold"] != "fixed"
    evals: dict[str, M.VariantEval] = {}
    first_val = None
    for v, folder in predictions.items():
        test, val = _load_variant(v, Path(folder), need_val)
        evals[v] = M.evaluate_variant(v, test, val, c)
        first_val = first_val if first_val is not None else val
    if first_val is not None:
        n_pe = int(first_val.label.sum())
        n_normal = len(first_val.label) - n_pe
        if min(n_pe, n_normal) < MIN_VAL_PER_CLASS:
            warnings.append(
                f"validation split has {n_pe} PE and {n_normal} normal patient(s) (fewer than"
                f" {MIN_VAL_PER_CLASS} of a class): the {c['threshold']} decision threshold rests on them, so"
                " Sens/Spec (not AUC) are unreliable; enlarge split.val_fraction"
            )

    ref1, ref2 = c["table1_reference"], c["table2"]["reference"]
    pairs: list[tuple[str, str]] = []
    for ref, rows in ((ref1, c["table1"]), (ref2, c["table2"]["rows"])):
        if ref not in evals:
            warnings.append(f"reference variant {ref!r} has no predictions: no markers against it")
            continue
        pairs += [(ref, r["variant"]) for r in rows if r["variant"] in evals and r["variant"] != ref]
    comparisons: dict[tuple[str, str], dict[str, Any]] = {}
    for a, b in dict.fromkeys(pairs):
        comparisons[(a, b)] = M.compare_variants(evals[a], evals[b], c)
        warnings += comparisons[(a, b)].pop("warnings")

    reader_res = None
    if readers is not None:
        if ref2 in evals:
            try:
                reader_res = M.evaluate_readers(load_readers(readers), evals[ref2], c)
            except InputError as err:
                raise InputError(err.patient, readers, err.reason) from err
            warnings += reader_res.pop("warnings")
        else:
            warnings.append(
                f"readers: reference variant {ref2!r} has no predictions; reader study not evaluated"
            )

    metrics = {v: e.metrics for v, e in evals.items()}
    t1 = tables.build_table(
        "Table 1: ablation on the test split",
        c["table1"],
        metrics,
        comparisons,
        ref1,
        mark_all=False,
        warnings=warnings,
    )
    t2 = tables.build_table(
        "Table 2: comparison on the test split",
        c["table2"]["rows"],
        metrics,
        comparisons,
        ref2,
        mark_all=True,
        readers=reader_res,
        warnings=warnings,
    )
    thr_txt = {
        "youden": "Youden's J",
        "fixed": f"fixed {c['fixed_threshold']}",
        "target_sensitivity": f"target sensitivity {c['target_sensitivity']}",
    }[c["threshold"]]
    common = (
        f"Sens/Spec at the validation threshold ({thr_txt}); 95% CIs: patient bootstrap "
        f"({c['bootstrap']} resamples, percentile) for Sens/Spec/Dice, DeLong for AUC. "
        "Dice: mean ± sd over PE-positive test patients."
    )
    t1.notes = [common, f"† p < 0.05 vs {ref1} (paired permutation test); ‡ p < 0.05 vs {ref1} (DeLong)."]
    t2.notes = [common, f"† p < 0.05 vs {ref2} (paired permutation test); ‡ p < 0.05 vs {ref2} (DeLong)."]

    methods: list[tuple[str, M.VariantEval]] = []
    for r in list(c["table2"]["rows"]) + list(c["table1"]):
        if r["variant"] in evals and r["variant"] not in [e.variant for _, e in methods]:
            methods.append((r["label"], evals[r["variant"]]))
    if not methods:
        methods = [(v, e) for v, e in evals.items()]

    written: list[Path] = []
    try:
        written += tables.write_table(t1, out_tables, "table1_ablation")
        written += tables.write_table(t2, out_tables, "table2_comparison")
        label_of = {r["variant"]: r["label"] for r in [*c["table2"]["rows"], *c["table1"]]}
        score_rows = [(label_of.get(v, v), row) for v, e in evals.items() for row in M.score_comparison(e)]
        written += tables.write_score_table(score_rows, out_tables, "score_comparison")
        written += figures.fig2a_roc(methods, reader_res, out_figures)
        case_v = ref2 if ref2 in evals else methods[0][1].variant
        case_label = next((lab for lab, e in methods if e.variant == case_v), case_v)
        case = figures.fig2b_case(
            evals[case_v], out_figures, str(c["fig2b_case"]), tuple(c["fig2b_window"]), label=case_label
        )
        if case is None:
            warnings.append(
                f"fig2b_case: no test PE case of {case_v!r} with an image and a non-empty ref_mask"
            )
        else:
            written += [Path(p) for p in case["paths"]]
            case["variant"] = case_v
        out = {
            "config": c,
            "variants": metrics,
            "comparisons": [comparisons[k] for k in comparisons],
            "readers": reader_res,
            "score_comparison": [row for _, row in score_rows],
            "fig2b_case": case,
            "tables": {
                "table1_ablation": [
                    {"label": lab, "variant": v} for (lab, _), v in zip(t1.rows, t1.variants, strict=True)
                ],
                "table2_comparison": [
                    {"label": lab, "variant": v} for (lab, _), v in zip(t2.rows, t2.variants, strict=True)
                ],
            },
            "warnings": warnings,
        }
        out = _jsonable(out)
        with atomic_path(stats_path) as tmp:
            tmp.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    except BaseException:
        for p in written:
            Path(p).unlink(missing_ok=True)
        raise
    for w in warnings:
        print(f"WARNING {w}", file=sys.stderr)
    return out
