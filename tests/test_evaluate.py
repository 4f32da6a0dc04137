"""cpmn.evaluate: metrics with known answers, bootstrap coverage, tables parsed back, end-to-end study."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from cpmn import stats
from cpmn.cli import main as cpmn_main
from cpmn.errors import InputError
from cpmn.evaluate import evaluate_study
from cpmn.evaluate import metrics as M
from cpmn.evaluate.tables import parse_cell

AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])
SHAPE = (24, 24, 8)
#: variant -> (class separation of the logit, x-shift of the predicted mask in voxels)
VARIANTS = {"ctpa": (5.0, 0), "nct": (0.2, 1), "mls": (1.5, 1), "mls_ifa": (2.5, 2), "cpmn": (5.0, 1)}
# the study below has these five variants; Table 2's rows are two of them (the default adds DML)
TABLE2 = {
    "reference": "cpmn",
    "rows": [{"variant": "nct", "label": "3D U-Net (NCT)"}, {"variant": "cpmn", "label": "CPMN"}],
}
FAST = {"bootstrap": 200, "permutations": 2000, "seed": 0, "table2": TABLE2}


def make_study(root: Path, n_test: int = 30, n_val: int = 24, seed: int = 0) -> Path:
    """Synthetic prediction folders with known answers and tiny NIfTI volumes.

    Test PE patients get a spherical embolus ``ref``; variant k predicts ``ref`` shifted by ``shift``
    voxels along x (Dice known from the arrays); the last PE test patient has an empty reference and an
    empty prediction (Dice NaN, dropped). Three readers with sensitivity ~0.6, specificity ~0.9.
    """
    rng = np.random.default_rng(seed)
    nif = root / "nifti"
    nif.mkdir(parents=True)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(float)
    pats = {}
    for split, n in (("val", n_val), ("test", n_test)):
        labels = np.zeros(n, int)
        labels[: n * 2 // 5] = 1
        rng.shuffle(labels)
        pats[split] = [(f"{split[0]}{i:03d}", int(lab)) for i, lab in enumerate(labels)]
    pos_test = [p for p, lab in pats["test"] if lab]
    for pid, lab in pats["test"]:
        img = rng.normal(40, 15, SHAPE).astype(np.float32)
        ref = np.zeros(SHAPE, np.uint8)
        if lab and pid != pos_test[-1]:
            c = rng.uniform([7, 7, 3], [17, 17, 5])
            ref = (np.linalg.norm((g - c) * [2, 2, 2.5], axis=-1) <= rng.uniform(3.0, 8.0)).astype(np.uint8)
            img[ref > 0] += 25
        nib.save(nib.Nifti1Image(img, AFFINE), nif / f"{pid}_image.nii.gz")
        nib.save(nib.Nifti1Image(ref, AFFINE), nif / f"{pid}_ref.nii.gz")
    for v, (sep, shift) in VARIANTS.items():
        d = root / "predictions" / v
        (d / "masks").mkdir(parents=True)
        for split, plist in pats.items():
            lines = ["patient_id\tsplit\tlabel\tprob\tmask\tcam\timage\tref_mask"]
            for pid, lab in plist:
                prob = 1 / (1 + math.exp(-(rng.normal() + sep * (lab - 0.5))))
                extra = [""] * 4
                if split == "test":
                    ref = np.asarray(nib.load(nif / f"{pid}_ref.nii.gz").dataobj)
                    pred = np.roll(ref, shift, axis=0)
                    cam = np.exp(-(np.linalg.norm(g - 12, axis=-1) ** 2) / 30).astype(np.float32)
                    nib.save(
                        nib.Nifti1Image(pred.astype(np.uint8), AFFINE), d / "masks" / f"{pid}_mask.nii.gz"
                    )
                    nib.save(nib.Nifti1Image(cam, AFFINE), d / "masks" / f"{pid}_cam.nii.gz")
                    extra = [
                        f"masks/{pid}_mask.nii.gz",
                        f"masks/{pid}_cam.nii.gz",
                        f"../../nifti/{pid}_image.nii.gz",
                        f"../../nifti/{pid}_ref.nii.gz",
                    ]
                lines.append("\t".join([pid, split, str(lab), f"{prob:.6f}", *extra]))
            (d / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    rl = ["reader\tpatient_id\tdecision"]
    for r in range(3):
        for pid, lab in pats["test"]:
            rl.append(f"R{r + 1}\t{pid}\t{int(rng.random() < (0.6 if lab else 0.1))}")
    rl.append("R1\tZZ99\t1")  # a patient not in the test split (excluded, or a typo): warned, not used
    (root / "readers.tsv").write_text("\n".join(rl) + "\n")
    return root


def _read(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _preds(y, p, split="test") -> M.Predictions:
    y = np.asarray(y)
    return M.Predictions(
        Path(f"/x/{split}.tsv"),
        split,
        np.array([f"p{i}" for i in range(len(y))], dtype=object),
        y.astype(int),
        np.asarray(p, float),
    )


# ------------------------------------------------------------------------------------------------ units


def test_thresholds_hand_computed():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.4, 0.35, 0.8, 0.3, 0.9]
    # J at 0.9: 1/3, 0.8: 2/3, 0.4: 1/3, 0.35: 0, 0.3: 1/3 -> Youden picks 0.8
    assert M.choose_threshold(y, p, "youden") == 0.8
    assert M.choose_threshold(y, p, "target_sensitivity", target_sensitivity=0.9) == 0.3
    assert M.choose_threshold(y, p, "target_sensitivity", target_sensitivity=0.6) == 0.8
    assert M.choose_threshold(y, p, "fixed", fixed_threshold=0.5) == 0.5
    sens, spec = M.sens_spec(np.array(y), np.array(p) >= 0.8)
    assert (sens, spec) == (2 / 3, 1.0)


def test_perfect_classifier():
    val = _preds([0, 1, 0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8, 0.3, 0.7], "val")
    test = _preds([0, 0, 0, 0, 1, 1, 1], [0.05, 0.2, 0.3, 0.6, 0.65, 0.9, 0.99])
    ev = M.evaluate_variant("perfect", test, val, FAST)
    m = ev.metrics
    assert m["threshold"]["value"] == 0.7 and m["threshold"]["method"] == "youden"
    assert m["auc"]["value"] == 1.0 and m["auc"]["ci_delong"] == [1.0, 1.0]
    assert m["auc"]["bootstrap"]["ci"] == [1.0, 1.0]
    assert m["sensitivity"]["value"] == 2 / 3  # 0.65 < 0.7 is missed: the val threshold is applied as is
    assert m["specificity"]["value"] == 1.0
    assert m["n_pos"] == 3 and m["n_neg"] == 4


def test_dice_convention():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    assert math.isnan(M.dice(a, b))  # both empty: NaN (dropped from the mean)
    a[0, 0, :2] = True
    assert M.dice(a, b) == 0.0  # truth empty, prediction not: 0
    b[0, 0, 1:4] = True  # |A| = 2, |B| = 3, overlap 1
    assert M.dice(a, b) == pytest.approx(2 * 1 / 5)


def test_bootstrap_ci_coverage():
    """200 simulated studies (binormal, d = 1: true AUC = Phi(1 / sqrt 2); sensitivity 0.8 over 40
    positives); stratified percentile bootstrap with 200 resamples covers the truth ~95 % of the time."""
    rng = np.random.default_rng(42)
    true_auc, true_sens = norm.cdf(1 / np.sqrt(2)), 0.8
    y = np.array([1] * 40 + [0] * 40)
    hits_auc = hits_sens = 0
    n_sim = 200
    for k in range(n_sim):
        s = rng.normal(size=80) + 1.0 * y
        b = stats.bootstrap_ci(lambda i, s=s: stats.auc_rows(y[i], s[i]), 80, 200, seed=k, strata=y)
        hits_auc += b.ci[0] <= true_auc <= b.ci[1]
        dec = (y == 1) & (rng.random(80) < true_sens)
        bs = stats.bootstrap_ci(
            lambda i, d=dec: (d[i] & (y[i] == 1)).sum(1) / (y[i] == 1).sum(1), 80, 200, seed=k, strata=y
        )
        hits_sens += bs.ci[0] <= true_sens <= bs.ci[1]
    assert 0.88 <= hits_auc / n_sim <= 0.99, hits_auc
    assert 0.88 <= hits_sens / n_sim <= 0.99, hits_sens


def test_bootstrap_ci_coverage_tracks_its_level():
    """1000 simulated binormal studies (d = 1, 40 + 40): the stratified percentile bootstrap's AUC interval
    covers the truth at close to its nominal level at 90%, 95% and 99% (measured 0.888, 0.935, 0.983; the
    percentile interval under-covers a little at n = 80), and the 95% band excludes a 90% or a 99% interval:
    an interval computed at the wrong level fails."""
    true_auc = norm.cdf(1 / np.sqrt(2))
    y = np.array([1] * 40 + [0] * 40)
    cover = {}
    for level in (0.90, 0.95, 0.99):
        rng = np.random.default_rng(42)
        hits = 0
        for k in range(1000):
            s = rng.normal(size=80) + 1.0 * y
            b = stats.bootstrap_ci(
                lambda i, s=s: stats.auc_rows(y[i], s[i]), 80, 400, seed=k, strata=y, level=level
            )
            hits += b.ci[0] <= true_auc <= b.ci[1]
        cover[level] = hits / 1000
    assert all(abs(cover[lv] - lv) < 0.02 for lv in cover), cover
    assert cover[0.90] < 0.92 < cover[0.95] < 0.965 < cover[0.99], cover


def _delong_by_loops(y, a, b):
    """DeLong et al. (1988) from the textbook definitions, with plain loops: structural components
    V10 (per positive) and V01 (per negative) of psi(x, y) = 1 if x > y, 1/2 if equal, 0 if less."""

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    pos, neg = [i for i in range(len(y)) if y[i] == 1], [i for i in range(len(y)) if y[i] == 0]
    comps = []
    for s in (a, b):
        v10 = [sum(psi(s[i], s[j]) for j in neg) / len(neg) for i in pos]
        v01 = [sum(psi(s[i], s[j]) for i in pos) / len(pos) for j in neg]
        comps.append((v10, v01, sum(v10) / len(v10)))

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((x - mu) * (z - mv) for x, z in zip(u, v, strict=True)) / (len(u) - 1)

    (a10, a01, auc_a), (b10, b01, auc_b) = comps
    var_a = cov(a10, a10) / len(pos) + cov(a01, a01) / len(neg)
    var_b = cov(b10, b10) / len(pos) + cov(b01, b01) / len(neg)
    cov_ab = cov(a10, b10) / len(pos) + cov(a01, b01) / len(neg)
    z = (auc_a - auc_b) / math.sqrt(var_a + var_b - 2 * cov_ab)
    return auc_a, auc_b, z, 2 * norm.sf(abs(z)), var_a


def test_compare_variants_against_delong_by_loops_with_ties():
    """compare_variants' paired DeLong on 6 + 6 patients with tied scores, against the loop definition."""
    y = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pa = np.array([0.9, 0.8, 0.8, 0.4, 0.7, 0.3, 0.2, 0.8, 0.1, 0.4, 0.3, 0.05])
    pb = np.array([0.6, 0.5, 0.7, 0.2, 0.3, 0.4, 0.5, 0.1, 0.3, 0.2, 0.6, 0.5])
    val = _preds([0, 1], [0.2, 0.8], "val")
    cfg = {**FAST, "threshold": "fixed", "fixed_threshold": 0.5}
    c = M.compare_variants(
        M.evaluate_variant("a", _preds(y, pa), val, cfg),
        M.evaluate_variant("b", _preds(y, pb), val, cfg),
        FAST,
    )
    auc_a, auc_b, z, p, var_a = _delong_by_loops(y.tolist(), pa.tolist(), pb.tolist())
    assert c["delong"]["auc_a"] == pytest.approx(auc_a) and c["delong"]["auc_b"] == pytest.approx(auc_b)
    assert c["delong"]["z"] == pytest.approx(z, rel=1e-9) and c["delong"]["p"] == pytest.approx(p, rel=1e-9)
    # the single-AUC DeLong CI (no ../shared pROC needed): AUC ± z_0.975 · sqrt(var), clipped to [0, 1]
    ci = stats.delong_ci(y, pa)
    half = norm.ppf(0.975) * math.sqrt(var_a)
    assert ci.ci == pytest.approx((max(auc_a - half, 0.0), min(auc_a + half, 1.0)), rel=1e-9)


def test_compare_variants_matches_delong_and_mcnemar():
    rng = np.random.default_rng(5)
    y = np.array([0] * 20 + [1] * 20)
    pa, pb = rng.random(40) * 0.5 + 0.5 * y, rng.random(40)
    val = _preds([0, 1], [0.2, 0.8], "val")
    a = M.evaluate_variant("a", _preds(y, pa), val, {**FAST, "threshold": "fixed", "fixed_threshold": 0.5})
    b = M.evaluate_variant("b", _preds(y, pb), val, {**FAST, "threshold": "fixed", "fixed_threshold": 0.5})
    c = M.compare_variants(a, b, FAST)
    d = stats.delong_test(y, pa, pb)
    assert c["delong"]["z"] == pytest.approx(d.z) and c["delong"]["p"] == pytest.approx(d.p)
    ok_a, ok_b = ((pa >= 0.5) == y)[y == 1], ((pb >= 0.5) == y)[y == 1]
    assert c["sensitivity"]["value_a"] == ok_a.mean() and c["sensitivity"]["value_b"] == ok_b.mean()
    assert c["sensitivity"]["mcnemar_p"] == pytest.approx(stats.mcnemar_exact(ok_a, ok_b))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = make_study(tmp_path_factory.mktemp("study"))
    preds = {v: root / "predictions" / v for v in VARIANTS}
    out = evaluate_study(
        preds, root / "tables", root / "figures", root / "stats.json", readers=root / "readers.tsv", cfg=FAST
    )
    return root, out


def _youden_by_hand(y, p):
    best = None
    for t in sorted(set(p), reverse=True):
        d = p >= t
        j = d[y == 1].mean() - d[y == 0].mean()
        if best is None or j > best[0] + 1e-15:
            best = (j, t)
    return best[1]


def test_end_to_end_writes_everything(study):
    root, out = study
    for stem in ("table1_ablation", "table2_comparison"):
        for ext in ("tsv", "md", "tex"):
            assert (root / "tables" / f"{stem}.{ext}").stat().st_size > 100
    import matplotlib.image as mpimg

    for stem in ("fig2a_roc", "fig2b_case"):
        assert (root / "figures" / f"{stem}.pdf").stat().st_size > 1000
        h, w = mpimg.imread(root / "figures" / f"{stem}.png").shape[:2]
        assert w >= 900 and h >= 600  # 300 dpi, >= 3.5 in wide
    on_disk = json.loads((root / "stats.json").read_text())
    assert on_disk == out and out["warnings"] == [
        "readers: 1 patient id(s) read but not in the test split, not used (ZZ99)"
    ]
    tex = (root / "tables" / "table1_ablation.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "+MLS+IFA+IFD" in tex


def test_metrics_recomputed_independently(study):
    root, out = study
    for v in VARIANTS:
        test = _read(root / "predictions" / v / "test.tsv")
        val = _read(root / "predictions" / v / "val.tsv")
        y, p = np.array([int(r["label"]) for r in test]), np.array([float(r["prob"]) for r in test])
        yv, pv = np.array([int(r["label"]) for r in val]), np.array([float(r["prob"]) for r in val])
        m = out["variants"][v]
        thr = _youden_by_hand(yv, pv)
        assert m["threshold"]["value"] == thr and m["threshold"]["chosen_on"] == "val"
        assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert m["sensitivity"]["value"] == (p[y == 1] >= thr).mean()
        assert m["specificity"]["value"] == (p[y == 0] < thr).mean()
        # Dice by hand from the NIfTI files; the empty/empty PE patient is dropped
        dices = []
        for r in test:
            if r["label"] == "1":
                a = np.asarray(nib.load(root / "predictions" / v / r["mask"]).dataobj) > 0
                b = np.asarray(nib.load(root / "predictions" / v / r["ref_mask"]).dataobj) > 0
                if a.any() or b.any():
                    dices.append(2 * (a & b).sum() / (a.sum() + b.sum()))
        assert m["dice"]["n_both_empty"] == 1 and m["dice"]["n"] == len(dices)
        assert m["dice"]["mean"] == pytest.approx(np.mean(dices), abs=1e-12)
        assert m["dice"]["sd"] == pytest.approx(np.std(dices, ddof=1), abs=1e-12)
    assert out["variants"]["ctpa"]["dice"]["mean"] == 1.0  # unshifted prediction


def _rows(path: Path) -> dict[str, dict[str, str]]:
    return {r["Method"]: r for r in _read(path)}


def test_table_cells_parse_back(study):
    root, out = study
    comps = {(c["a"], c["b"]): c for c in out["comparisons"]}
    t1 = _rows(root / "tables" / "table1_ablation.tsv")
    assert list(t1) == ["CTPA model", "NCT model", "+MLS", "+MLS+IFA", "+MLS+IFA+IFD"]
    variant_of = {
        "CTPA model": "ctpa",
        "NCT model": "nct",
        "+MLS": "mls",
        "+MLS+IFA": "mls_ifa",
        "+MLS+IFA+IFD": "cpmn",
    }
    n_markers = 0
    for label, row in t1.items():
        m = out["variants"][variant_of[label]]
        sens, spec, auc, dsc = (parse_cell(row[k]) for k in ("Sens (%)", "Spec (%)", "AUC", "Dice (%)"))
        assert sens["value"] == float(f"{100 * m['sensitivity']['value']:.1f}")
        assert (sens["lo"], sens["hi"]) == tuple(float(f"{100 * x:.1f}") for x in m["sensitivity"]["ci"])
        assert spec["value"] == float(f"{100 * m['specificity']['value']:.1f}")
        assert auc["value"] == float(f"{m['auc']['value']:.3f}")
        assert (auc["lo"], auc["hi"]) == tuple(float(f"{x:.3f}") for x in m["auc"]["ci_delong"])
        assert dsc["value"] == float(f"{100 * m['dice']['mean']:.1f}")
        assert dsc["sd"] == float(f"{100 * m['dice']['sd']:.1f}")
        c = comps.get(("nct", variant_of[label]))
        after_ref = label not in ("CTPA model", "NCT model")
        assert sens["marker"] == ("†" if after_ref and c["sensitivity"]["p"] < 0.05 else "")
        assert spec["marker"] == ("†" if after_ref and c["specificity"]["p"] < 0.05 else "")
        assert auc["marker"] == ("‡" if after_ref and c["delong"]["p"] < 0.05 else "")
        n_markers += len(auc["marker"] + sens["marker"] + spec["marker"])
    assert n_markers >= 1  # cpmn (separation 5) vs nct (0.2) must differ in AUC on 30 patients
    # Markdown carries the same cells
    md = (root / "tables" / "table1_ablation.md").read_text()
    assert f"| +MLS+IFA+IFD | {t1['+MLS+IFA+IFD']['Sens (%)']} |" in md


def test_table2_readers_row(study):
    root, out = study
    t2 = _rows(root / "tables" / "table2_comparison.tsv")
    assert list(t2) == ["Radiologists (mean of 3)", "3D U-Net (NCT)", "CPMN"]
    test = {r["patient_id"]: int(r["label"]) for r in _read(root / "predictions" / "cpmn" / "test.tsv")}
    by_reader: dict[str, dict[str, int]] = {}
    for r in _read(root / "readers.tsv"):
        by_reader.setdefault(r["reader"], {})[r["patient_id"]] = int(r["decision"])
    sens = np.mean([np.mean([d[p] for p in test if test[p] == 1]) for d in by_reader.values()])
    spec = np.mean([np.mean([1 - d[p] for p in test if test[p] == 0]) for d in by_reader.values()])
    row = t2["Radiologists (mean of 3)"]
    assert parse_cell(row["Sens (%)"])["value"] == float(f"{100 * sens:.1f}")
    assert parse_cell(row["Spec (%)"])["value"] == float(f"{100 * spec:.1f}")
    assert parse_cell(row["AUC"]) is None
    r1 = out["readers"]["readers"]["R1"]["sensitivity"]
    assert r1["value"] == np.mean([by_reader["R1"][p] for p in test if test[p] == 1])
    assert r1["vs_model"]["model"] == "cpmn" and 0 < r1["vs_model"]["p"] <= 1
    assert r1["vs_model"]["mcnemar_p"] is not None


def test_fig2b_case_choice(study):
    root, out = study
    vols = {}
    for r in _read(root / "predictions" / "cpmn" / "test.tsv"):
        if r["label"] == "1":
            vols[r["patient_id"]] = np.asarray(
                nib.load(root / "predictions" / "cpmn" / r["ref_mask"]).dataobj
            )
    pid = max(vols, key=lambda k: vols[k].sum())
    assert out["fig2b_case"]["patient_id"] == pid
    assert out["fig2b_case"]["slice"] == int(np.argmax(vols[pid].sum(axis=(0, 1))))


def test_cli_missing_variant_and_bad_input(study, tmp_path, capsys):
    root, _ = study
    case = next(
        r["patient_id"] for r in _read(root / "predictions" / "cpmn" / "test.tsv") if r["label"] == "1"
    )
    args = [
        "evaluate",
        "--predictions",
        f"nct={root / 'predictions' / 'nct'}",
        f"cpmn={root / 'predictions' / 'cpmn'}",
        "--out-tables",
        str(tmp_path / "t"),
        "--out-figures",
        str(tmp_path / "f"),
        "--stats",
        str(tmp_path / "s.json"),
        "--params",
        json.dumps({**FAST, "threshold": "fixed", "fig2b_case": case}),
    ]
    assert cpmn_main(args) == 0
    err = capsys.readouterr().err
    assert "row 'CTPA model' skipped: no predictions for variant 'ctpa'" in err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["variants"]["nct"]["threshold"] == {
        "method": "fixed",
        "value": 0.5,
        "chosen_on": "fixed",
        "n_val": 24,
        "target_sensitivity": None,
    }
    assert [r["variant"] for r in s["tables"]["table1_ablation"]] == ["nct", "cpmn"]
    assert s["fig2b_case"]["patient_id"] == case and s["fig2b_case"]["variant"] == "cpmn"
    # bad label: one ERROR line naming patient and file, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = (root / "predictions" / "nct" / "test.tsv").read_text().splitlines()
    f = rows[3].split("\t")
    f[2] = "2"
    rows[3] = "\t".join(f)
    (bad / "test.tsv").write_text("\n".join(rows) + "\n")
    (bad / "val.tsv").write_text((root / "predictions" / "nct" / "val.tsv").read_text())
    out2 = tmp_path / "out2"
    rc = cpmn_main(
        [
            "evaluate",
            "--predictions",
            f"nct={bad}",
            "--out-tables",
            str(out2 / "t"),
            "--out-figures",
            str(out2 / "f"),
            "--stats",
            str(out2 / "s.json"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0] == f"ERROR patient {f[0]}: {bad / 'test.tsv'}: label must be 0 or 1, got '2'"
    assert not out2.exists()


def _with_alternative(src: Path, dst: Path, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy a variant's predictions adding ``score`` (seg_volume) and ``prob_centre`` (a noisier score)."""
    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True)
    for split in ("val", "test"):
        rows = _read(src / f"{split}.tsv")[::-1]  # not in patient order: evaluate sorts, columns must follow
        header = list(rows[0])
        lines = ["\t".join([*header[:4], "score", "prob_centre", *header[4:]])]
        for r in rows:
            alt = 1 / (1 + math.exp(-(2.0 * rng.normal() + 1.0 * (int(r["label"]) - 0.5))))
            r["prob_centre"] = f"{alt:.6f}"
            vals = [r[h] for h in header[:4]] + ["seg_volume", r["prob_centre"]]
            # mask and cam paths are relative to the TSV's folder: point them at the source's files
            vals += [f"../{src.name}/{r[h]}" if r[h] and h in ("mask", "cam") else r[h] for h in header[4:]]
            lines.append("\t".join(vals))
        (dst / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    test = _read(dst / "test.tsv")
    y = np.array([int(r["label"]) for r in test])
    return y, np.array([float(r["prob"]) for r in test]), np.array([float(r["prob_centre"]) for r in test])


def test_score_comparison_tabulates_each_score_of_a_model(study, tmp_path):
    root, _ = study
    d = root / "predictions" / "cmp"
    y, prob, alt = _with_alternative(root / "predictions" / "cpmn", d)
    out = evaluate_study(
        {"nct": root / "predictions" / "nct", "cmp": d},
        tmp_path / "t",
        tmp_path / "f",
        tmp_path / "s.json",
        cfg={
            **FAST,
            "table1": [{"variant": "cmp", "label": "Mine"}],
            "table2": {"reference": "cmp", "rows": []},
        },
    )
    rows = [r for r in out["score_comparison"] if r["variant"] == "cmp"]
    assert [(r["score"], r["primary"]) for r in rows] == [("seg_volume", True), ("centre", False)]
    assert rows[0]["auc"] == pytest.approx(roc_auc_score(y, prob), abs=1e-12)
    assert rows[1]["auc"] == pytest.approx(roc_auc_score(y, alt), abs=1e-12)
    assert rows[1]["auc"] < rows[0]["auc"]  # the alternative is noisier by construction
    ref = stats.delong_test(y, prob, alt)
    assert rows[1]["delong"]["p"] == pytest.approx(ref.p, rel=1e-12) and rows[0]["delong"] is None
    # nct has no score column and no alternatives: one row named "prob"
    assert [(r["score"], r["primary"]) for r in out["score_comparison"] if r["variant"] == "nct"] == [
        ("prob", True)
    ]
    table = _read(tmp_path / "t" / "score_comparison.tsv")
    mine = [r for r in table if r["Method"] == "Mine"]
    assert [r["Score"] for r in mine] == ["seg_volume *", "centre"]
    cell = parse_cell(mine[1]["AUC"])
    assert cell["value"] == pytest.approx(rows[1]["auc"], abs=5e-4)
    assert float(mine[1]["p vs primary (DeLong)"]) == pytest.approx(ref.p, rel=1e-2)


def test_a_non_finite_alternative_score_is_one_error(study, tmp_path):
    root, _ = study
    d = tmp_path / "cmp"
    _with_alternative(root / "predictions" / "cpmn", d)
    lines = (d / "test.tsv").read_text().splitlines()
    f = lines[2].split("\t")
    f[5] = "nan"
    lines[2] = "\t".join(f)
    (d / "test.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        InputError, match=f"^patient {f[0]}: .*test.tsv: .*prob_centre is not a finite number"
    ):
        M.load_predictions(d / "test.tsv", "test")


@pytest.mark.parametrize(
    ("edit", "pid", "reason"),
    [
        (lambda rows: rows + [rows[-1]], "last", "duplicate patient_id"),
        (
            lambda rows: [rows[0], {**rows[1], "split": "val"}, *rows[2:]],
            "second",
            "split is 'val', expected 'test'",
        ),
        (lambda rows: [rows[0], {**rows[1], "label": "2"}, *rows[2:]], "second", "label"),
        (lambda rows: [rows[0], {**rows[1], "prob": "inf"}, *rows[2:]], "second", "prob"),
    ],
)
def test_bad_predictions_name_the_patient_and_the_file(tmp_path, edit, pid, reason):
    import csv

    rows = [
        {"patient_id": f"T{i}", "split": "test", "label": str(i % 2), "prob": f"{0.1 * i:.1f}"}
        for i in range(5)
    ]
    rows = edit(rows)
    want = {"last": rows[-1]["patient_id"], "second": rows[1]["patient_id"]}[pid]
    path = tmp_path / "test.tsv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(InputError, match=rf"^patient {want}: {re.escape(str(path))}: .*{re.escape(reason)}"):
        M.load_predictions(path, "test")


def test_cam_overview_shows_the_reference_slice_else_the_cam_maximum(tmp_path):
    from cpmn.evaluate.figures import cam_overview

    image = np.zeros((12, 10, 8), np.float32)
    cam = np.zeros_like(image)
    cam[4, 4, 3] = 1.0
    ref = np.zeros_like(image)
    ref[2:4, 2:4, 5] = 1
    ref[2, 2, 6] = 1
    assert cam_overview(image, cam, (2.0, 2.0, 3.0), tmp_path / "a.png", "A", ref=ref) == 5
    assert cam_overview(image, cam, (2.0, 2.0, 3.0), tmp_path / "b.png", "B", ref=ref * 0) == 3
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="cam shape"):
        cam_overview(image, cam[:, :, :4], (2.0, 2.0, 3.0), tmp_path / "c.png", "C")
    assert not (tmp_path / "c.png").exists()


def test_a_truncated_mask_is_one_error_naming_patient_and_file(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((30, 30, 30), np.uint8), AFFINE), tmp_path / "m.nii.gz")
    data = (tmp_path / "m.nii.gz").read_bytes()
    (tmp_path / "m.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"^patient T3: .*m.nii.gz: cannot read mask NIfTI \(EOFError"):
        M.load_mask(tmp_path / "m.nii.gz", "T3")


def test_a_failed_evaluate_leaves_no_table_of_an_earlier_run(study, tmp_path):
    root = shutil.copytree(study[0], tmp_path / "s")
    tables, figures, broken = root / "tables", root / "figures", root / "predictions"
    (broken / list(VARIANTS)[-1] / "test.tsv").write_text("patient_id\tlabel\n")  # no prob column
    preds = {v: broken / v for v in VARIANTS}
    with pytest.raises(InputError):
        evaluate_study(preds, tables, figures, root / "stats.json", cfg=FAST)
    left = sorted(p.name for p in [*tables.iterdir(), *figures.iterdir()])
    assert not [
        n for n in left if n.split(".")[0] in ("table1_ablation", "table2_comparison", "fig2a_roc")
    ], left


def test_a_tiny_validation_split_is_warned_about(study, tmp_path):
    root = shutil.copytree(study[0], tmp_path / "s")
    preds = root / "predictions"
    for v in VARIANTS:
        lines = (preds / v / "val.tsv").read_text().splitlines()
        header = lines[0].split("\t")
        lab = header.index("label")
        pe = next(x for x in lines[1:] if x.split("\t")[lab] == "1")
        normal = next(x for x in lines[1:] if x.split("\t")[lab] == "0")
        (preds / v / "val.tsv").write_text("\n".join([lines[0], pe, normal]) + "\n")
    out = evaluate_study(
        {v: preds / v for v in VARIANTS}, tmp_path / "t", tmp_path / "f", tmp_path / "s.json", cfg=FAST
    )
    assert any(
        w.startswith("validation split has 1 PE and 1 normal patient(s) (fewer than 3")
        for w in out["warnings"]
    )


def test_fig2a_roc_draws_the_roc_points_and_operating_points(tmp_path, drawn_axes):
    """The ROC line of y = (0, 0, 1, 1), p = (0.1, 0.4, 0.35, 0.8) by hand: thresholds 0.8, 0.4, 0.35, 0.1
    give (FPR, TPR) = (0, 0.5), (0.5, 0.5), (0.5, 1), (1, 1) after (0, 0); the dot is (1 - spec, sens) at
    the fixed threshold 0.5 (sens 0.5, spec 1); the mean reader is the star."""
    from cpmn.evaluate import figures

    y, p = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    cfg = {**FAST, "threshold": "fixed", "fixed_threshold": 0.5}
    ev = M.evaluate_variant("a", _preds(y, p), _preds([0, 1], [0.2, 0.8], "val"), cfg)
    readers = {
        "readers": {"r1": {"sensitivity": {"value": 0.5}, "specificity": {"value": 0.75}}},
        "mean": {"sensitivity": {"value": 0.5}, "specificity": {"value": 0.75}},
    }
    figures.fig2a_roc([("A", ev)], readers, tmp_path)
    lines = drawn_axes[-1].get_lines()
    roc = next(ln for ln in lines if ln.get_label().startswith("A (AUC 0.750)"))
    assert roc.get_xdata().tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert roc.get_ydata().tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    dots = [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in lines if ln.get_marker() == "o"]
    assert dots == [(0.0, 0.5)]
    star = next(ln for ln in lines if ln.get_label() == "Radiologists (mean)")
    assert (star.get_xdata(), star.get_ydata()) == (pytest.approx(0.25), pytest.approx(0.5))
