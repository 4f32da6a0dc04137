"""Training curves: the logs are read back as numbers and drawn, one line per variant and used term."""

from __future__ import annotations

import math

import pytest

from cpmn.errors import InputError
from cpmn.evaluate.curves import plot_curves, read_log
from cpmn.train import LOG_COLUMNS

HEAD = "\t".join(LOG_COLUMNS)


def _log(path, rows):
    path.write_text(HEAD + "\n" + "\n".join("\t".join(map(str, r)) for r in rows) + "\n")
    return path


def test_curves_read_every_panel_and_draw_only_used_terms(tmp_path, drawn_axes):
    # epoch, L_clas, L_seg, L_KL, L_alig, L_disc, L_mutual, L_total, lr, val_auc, val_dice, seconds
    a = _log(
        tmp_path / "a.tsv",
        [
            [1, 0.7, 1.0, 0, 0, 0, 0, 1.7, 1e-3, 0.5, "nan", 3],
            [2, 0.5, 0.8, 0, 0, 0, 0, 1.3, 1e-5, 0.75, 0.4, 3],
        ],
    )
    b = _log(tmp_path / "b.tsv", [[1, 0.7, 1.0, 0.1, 0.02, 0.3, 0, 1.9, 1e-3, 0.6, 0.1, 6]])
    la, lb = read_log(a, "nct"), read_log(b, "cpmn")
    assert la["epoch"] == [1.0, 2.0] and la["val_auc"] == [0.5, 0.75] and math.isnan(la["val_dice"][0])
    assert lb["L_alig"] == [0.02]
    out = plot_curves({"nct": la, "cpmn": lb}, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = {
        ax.get_title(): [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        for ax in drawn_axes[-1].flat
    }
    assert lines["L_clas"] == ["nct", "cpmn"] and lines["L_alig"] == ["cpmn"]  # nct has no L_alig
    assert lines["L_mutual"] == []  # neither is DML
    colour = {ax.get_title(): [ln.get_color() for ln in ax.get_lines()][:2] for ax in drawn_axes[-1].flat}
    assert colour["L_alig"][0] == colour["L_clas"][1] == "C1"  # a variant keeps its colour in every panel


def test_a_bad_log_is_one_error_naming_the_file(tmp_path):
    bad = _log(tmp_path / "bad.tsv", [[1, "x", 1.0, 0, 0, 0, 0, 1.7, 1e-3, 0.5, 0.1, 3]])
    with pytest.raises(InputError, match=r"bad.tsv: variant nct: L_clas 'x' is not a number"):
        read_log(bad, "nct")
    with pytest.raises(InputError, match=r"missing.tsv: variant nct: cannot read"):
        read_log(tmp_path / "missing.tsv", "nct")
