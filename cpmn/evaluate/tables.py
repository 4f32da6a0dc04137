"""Table 1 (ablation) and Table 2 (comparison) as TSV, Markdown and LaTeX (booktabs).

Cells (the same text in TSV and Markdown; LaTeX uses ``$^\\dagger$``, ``--`` and ``$\\pm$``):

- ``Sens (%)`` / ``Spec (%)``: ``85.4 (78.1–91.0)`` = value and 95 % bootstrap CI, in percent, one decimal.
- ``AUC``: ``0.912 (0.871–0.953)`` = AUC and 95 % DeLong CI, three decimals.
- ``Dice (%)``: ``45.2 ± 10.1 (40.1–50.3)`` = mean ± sd over scored PE-positive test patients and the
  95 % bootstrap CI of the mean. ``–`` where not available (no masks, or no AUC for readers).

Markers (both two-sided, p < 0.05, against the table's reference row):

- Table 1: the reference is ``evaluate.table1_reference`` (the NCT model). Every row listed *after* it
  gets ``†`` on Sens / Spec when the paired permutation test of its sensitivity (over PE-positive) /
  specificity (over PE-negative) test patients vs the reference has p < 0.05, and ``‡`` on AUC when
  the DeLong test vs the reference has p < 0.05. Rows before it (the CTPA model, which sees another
  phase) carry no marker.
- Table 2: the reference is ``evaluate.table2.reference`` (CPMN); every other row is compared with it in
  the same way; the radiologists' row (mean over readers) is compared by the paired permutation test of
  the per-patient fraction of readers correct vs CPMN's correct decisions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpmn.errors import atomic_path

HEADER = ("Method", "Sens (%)", "Spec (%)", "AUC", "Dice (%)")
DAGGER, DDAGGER, DASH = "†", "‡", "–"
ALPHA = 0.05


@dataclass
class Cell:
    """One numeric cell. ``kind``: ``pct`` (x100, 1 dp), ``auc`` (3 dp) or ``dice`` (x100 with sd)."""

    kind: str
    value: float | None = None
    ci: tuple[float, float] | None = None
    sd: float | None = None
    marker: str = ""

    def text(self, latex: bool = False) -> str:
        if self.value is None or not math.isfinite(self.value):
            return "--" if latex else DASH
        scale, nd = (1.0, 3) if self.kind == "auc" else (100.0, 1)
        f = f"{{:.{nd}f}}"
        s = f.format(self.value * scale)
        if self.kind == "dice" and self.sd is not None and math.isfinite(self.sd):
            s += (" $\\pm$ " if latex else " ± ") + f.format(self.sd * scale)
        if self.ci is not None and all(c is not None and math.isfinite(c) for c in self.ci):
            dash = "--" if latex else DASH
            s += f" ({f.format(self.ci[0] * scale)}{dash}{f.format(self.ci[1] * scale)})"
        if self.marker:
            s += (
                "$^{" + self.marker.replace(DAGGER, "\\dagger").replace(DDAGGER, "\\ddagger") + "}$"
                if latex
                else self.marker
            )
        return s


@dataclass
class Table:
    """A table: ``rows`` of (label, [Sens, Spec, AUC, Dice] cells) and footnotes."""

    title: str
    rows: list[tuple[str, list[Cell]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    variants: list[str | None] = field(default_factory=list)


_CELL_RE = re.compile(
    r"^(?P<v>-?\d+(?:\.\d+)?)(?: ± (?P<sd>\d+(?:\.\d+)?))?"
    r"(?: \((?P<lo>-?\d+(?:\.\d+)?)–(?P<hi>-?\d+(?:\.\d+)?)\))?(?P<m>[†‡]*)$"
)


def parse_cell(text: str) -> dict[str, Any] | None:
    """Inverse of :meth:`Cell.text` (plain form): ``{"value", "sd", "lo", "hi", "marker"}`` in the
    printed units (percent or AUC), or ``None`` for ``–``."""
    text = text.strip()
    if text == DASH:
        return None
    m = _CELL_RE.match(text)
    if not m:
        raise ValueError(f"unparseable table cell {text!r}")
    g = m.groupdict()
    num = {k: (float(g[k]) if g[k] is not None else None) for k in ("v", "sd", "lo", "hi")}
    return {"value": num["v"], "sd": num["sd"], "lo": num["lo"], "hi": num["hi"], "marker": g["m"]}


def _metric_cells(m: dict[str, Any]) -> list[Cell]:
    auc = m["auc"]
    d = m["dice"]
    return [
        Cell("pct", m["sensitivity"]["value"], tuple(m["sensitivity"]["ci"])),
        Cell("pct", m["specificity"]["value"], tuple(m["specificity"]["ci"])),
        Cell("auc", auc["value"], tuple(auc["ci_delong"])),
        Cell("dice", d["mean"] if d["n"] else None, tuple(d["ci"]) if d.get("ci") else None, d["sd"]),
    ]


def _mark(cells: list[Cell], comp: dict[str, Any] | None) -> None:
    if comp is None:
        return
    if comp.get("sensitivity") and comp["sensitivity"]["p"] < ALPHA:
        cells[0].marker = DAGGER
    if comp.get("specificity") and comp["specificity"]["p"] < ALPHA:
        cells[1].marker = DAGGER
    if comp.get("delong") and comp["delong"]["p"] < ALPHA:
        cells[2].marker = DDAGGER


def build_table(
    title: str,
    rows_cfg: list[dict[str, str]],
    metrics: dict[str, dict[str, Any]],
    comparisons: dict[tuple[str, str], dict[str, Any]],
    reference: str,
    mark_all: bool,
    readers: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> Table:
    """Assemble a table from per-variant metrics and paired comparisons.

    Args:
        rows_cfg: ``[{variant, label}, ...]`` (config ``evaluate.table1`` / ``table2.rows``); a row whose
            variant has no predictions is skipped with a line in ``warnings``.
        metrics: variant -> the ``metrics`` dict of :class:`cpmn.evaluate.metrics.VariantEval`.
        comparisons: ``(reference, variant)`` -> :func:`compare_variants` result.
        mark_all: Table 2 (every non-reference row is marked) vs Table 1 (only rows after the reference).
        readers: :func:`evaluate_readers` result, giving a first "Radiologists (mean)" row.
    """
    warnings = warnings if warnings is not None else []
    table = Table(title=title)
    if readers is not None:
        mean = readers["mean"]
        cells = [
            Cell("pct", mean["sensitivity"]["value"], tuple(mean["sensitivity"]["ci"])),
            Cell("pct", mean["specificity"]["value"], tuple(mean["specificity"]["ci"])),
            Cell("auc"),
            Cell("dice"),
        ]
        if reference in metrics:
            _mark(cells, {k: mean[k]["vs_model"] for k in ("sensitivity", "specificity")})
        table.rows.append((f"Radiologists (mean of {len(readers['readers'])})", cells))
        table.variants.append(None)
    seen_ref = False
    for row in rows_cfg:
        v, label = row["variant"], row["label"]
        if v not in metrics:
            warnings.append(f"{title}: row {label!r} skipped: no predictions for variant {v!r}")
            continue
        cells = _metric_cells(metrics[v])
        if v == reference:
            seen_ref = True
        elif mark_all or seen_ref:
            _mark(cells, comparisons.get((reference, v)))
        table.rows.append((label, cells))
        table.variants.append(v)
    return table


def write_table(table: Table, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``stem.tsv``, ``stem.md`` and ``stem.tex`` into ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    paths = []
    tsv = (
        "\t".join(HEADER)
        + "\n"
        + "".join("\t".join([label] + [c.text() for c in cells]) + "\n" for label, cells in table.rows)
    )
    md_rows = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(HEADER) - 1)) + "|",
    ]
    md_rows += [
        "| " + " | ".join([label.replace("|", "\\|")] + [c.text() for c in cells]) + " |"
        for label, cells in table.rows
    ]
    md = f"**{table.title}**\n\n" + "\n".join(md_rows) + "\n"
    if table.notes:
        md += "\n" + "\n".join(table.notes) + "\n"
    tex = _latex(table)
    for ext, text in (("tsv", tsv), ("md", md), ("tex", tex)):
        final = out_dir / f"{stem}.{ext}"
        with atomic_path(final) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths.append(final)
    return paths


def _tex_escape(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#")):
        s = s.replace(a, b)
    return s.replace(DAGGER, "$^\\dagger$").replace(DDAGGER, "$^\\ddagger$").replace(DASH, "--")


def _latex(table: Table) -> str:
    lines = [
        "% requires \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{_tex_escape(table.title)}}}",
        "\\begin{tabular}{l" + "c" * (len(HEADER) - 1) + "}",
        "\\toprule",
        " & ".join(_tex_escape(h) for h in HEADER) + " \\\\",
        "\\midrule",
    ]
    for label, cells in table.rows:
        lines.append(" & ".join([_tex_escape(label)] + [c.text(latex=True) for c in cells]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.notes:
        lines.append("\\par\\smallskip\\footnotesize " + " ".join(_tex_escape(n) for n in table.notes))
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


SCORE_HEADER = ("Method", "Score", "AUC", "p vs primary (DeLong)")


def write_score_table(rows: list[tuple[str, dict[str, Any]]], out_dir: str | Path, stem: str) -> list[Path]:
    """The score comparison (``stem.tsv``, ``stem.md``): per method, the test AUC (95 % DeLong CI) of its
    primary score (``infer.score``, marked ``*``) and of each ``infer.compare_scores`` alternative of the
    same model, with the paired DeLong p against the primary score. ``rows``: (label, row of
    :func:`cpmn.evaluate.metrics.score_comparison`)."""
    out_dir = Path(out_dir)
    lines = []
    for label, r in rows:
        ci = tuple(r["ci_delong"]) if r["ci_delong"] else None
        auc = Cell("auc", r["auc"] if math.isfinite(r["auc"]) else None, ci).text()
        p = DASH if not r["delong"] else f"{r['delong']['p']:.3g}"
        lines.append([label, r["score"] + (" *" if r["primary"] else ""), auc, p])
    tsv = "\t".join(SCORE_HEADER) + "\n" + "".join("\t".join(row) + "\n" for row in lines)
    md = "**Score comparison: the same models scored each way (test split)**\n\n"
    md += "| " + " | ".join(SCORE_HEADER) + " |\n|:---|:---|---:|---:|\n"
    md += "".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |\n" for row in lines)
    md += (
        "\nScore marked *: the primary score (`infer.score`), the one Tables 1 and 2 report; the others are "
        "`infer.compare_scores`.\n"
    )
    if not lines:
        md += "\nNo predictions.\n"
    paths = []
    for ext, text in (("tsv", tsv), ("md", md)):
        final = out_dir / f"{stem}.{ext}"
        with atomic_path(final) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths.append(final)
    return paths
