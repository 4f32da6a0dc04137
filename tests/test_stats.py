"""cpmn.stats: DeLong vs R pROC and a naive implementation, permutation vs enumeration, McNemar, bootstrap."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cpmn import stats

ORACLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "oracles"


@pytest.fixture(scope="module")
def asah():
    csv_p, exp_p = ORACLES / "asah.csv", ORACLES / "asah_delong_expected.json"
    if not (csv_p.is_file() and exp_p.is_file()):
        pytest.skip(f"shared oracle data not found under {ORACLES}")
    with open(csv_p) as fh:
        rows = list(csv.DictReader(fh))
    expected = json.loads(exp_p.read_text())
    y = np.array([r["outcome"] == expected["positive_label"] for r in rows], dtype=int)
    markers = {k: np.array([float(r[k]) for r in rows]) for k in ("wfns", "s100b", "ndka")}
    return y, markers, expected


@pytest.mark.parametrize("marker", ["wfns", "s100b", "ndka"])
def test_delong_ci_matches_proc(asah, marker):
    y, markers, expected = asah
    assert y.sum() == 41 and len(y) == 113
    res = stats.delong_ci(y, markers[marker])
    exp = expected["auc"][marker]
    assert res.auc == pytest.approx(exp["auc"], abs=1e-9)
    assert res.ci[0] == pytest.approx(exp["ci95_delong"][0], abs=1e-9)
    assert res.ci[1] == pytest.approx(exp["ci95_delong"][1], abs=1e-9)


def test_delong_paired_matches_proc(asah):
    y, markers, expected = asah
    for t in expected["paired_delong"]:
        res = stats.delong_test(y, markers[t["a"]], markers[t["b"]])
        assert res.auc_a == pytest.approx(expected["auc"][t["a"]]["auc"], abs=1e-9)
        assert res.auc_b == pytest.approx(expected["auc"][t["b"]]["auc"], abs=1e-9)
        assert res.z == pytest.approx(t["z"], abs=1e-9), t
        assert res.p == pytest.approx(t["p"], abs=1e-9), t
        if "diff_ci95" in t:
            assert res.ci[0] == pytest.approx(t["diff_ci95"][0], abs=1e-9)
            assert res.ci[1] == pytest.approx(t["diff_ci95"][1], abs=1e-9)


#: 5 PE, 7 normals, ties within and across classes. The reference values were computed once with exact
#: fractions from DeLong's definition (structural components by pairwise comparison, psi = 1, 1/2, 0;
#: S10 / m + S01 / n), independently of cpmn.stats, and normal quantiles from Python's statistics.NormalDist:
#: AUC_a = 29/35, var_a = 167/9800, AUC_b = 6/7, var_b = 123/9800, var(AUC_a - AUC_b) = 19/1225.
VENDORED_Y = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
VENDORED_A = [0.9, 0.8, 0.8, 0.55, 0.3, 0.8, 0.5, 0.4, 0.4, 0.2, 0.1, 0.05]
VENDORED_B = [0.7, 0.9, 0.4, 0.6, 0.6, 0.6, 0.65, 0.3, 0.1, 0.2, 0.35, 0.05]


def test_delong_ci_and_paired_p_match_vendored_exact_values():
    """Runs in every clone (the pROC oracle above needs ../shared): CI and paired z, p by exact arithmetic."""
    y, a, b = (np.array(v) for v in (VENDORED_Y, VENDORED_A, VENDORED_B))
    ca, cb = stats.delong_ci(y, a), stats.delong_ci(y, b)
    assert ca.auc == pytest.approx(29 / 35, abs=1e-12) and ca.var == pytest.approx(167 / 9800, abs=1e-12)
    assert ca.ci == pytest.approx((0.5727167936918168, 1.0), abs=1e-12)
    assert cb.auc == pytest.approx(6 / 7, abs=1e-12) and cb.var == pytest.approx(123 / 9800, abs=1e-12)
    assert cb.ci == pytest.approx((0.6375654720239639, 1.0), abs=1e-12)
    res = stats.delong_test(y, a, b)
    assert res.z == pytest.approx(-0.22941573387056174, abs=1e-12)
    assert res.p == pytest.approx(0.8185458083820434, abs=1e-12)
    half = 1.959963984540054 * (19 / 1225) ** 0.5
    assert res.ci == pytest.approx((-1 / 35 - half, -1 / 35 + half), abs=1e-12)


def _naive_delong(y, scores):
    """O(m n) structural components (DeLong 1988): psi(x, y) = 1 if x > y, 1/2 if tie, 0 otherwise."""
    y = y.astype(bool)
    k = len(scores)
    v10, v01, aucs = [], [], []
    for s in scores:
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = y.sum(), (~y).sum()
    s10 = np.array(
        [[np.sum((v10[i] - aucs[i]) * (v10[j] - aucs[j])) / (m - 1) for j in range(k)] for i in range(k)]
    )
    s01 = np.array(
        [[np.sum((v01[i] - aucs[i]) * (v01[j] - aucs[j])) / (n - 1) for j in range(k)] for i in range(k)]
    )
    return np.array(aucs), s10 / m + s01 / n


def test_fast_delong_matches_naive_with_ties():
    rng = np.random.default_rng(3)
    for trial in range(5):
        n = 60 + 17 * trial
        y = (rng.random(n) < 0.35).astype(int)
        y[:2] = [0, 1]
        a = rng.integers(0, 6, n) + 2 * y  # few distinct values: many ties within and across classes
        b = np.round(rng.normal(size=n) + y, 1)
        aucs, cov = stats.fast_delong(y, np.stack([a, b]))
        aucs_n, cov_n = _naive_delong(y, [a.astype(float), b])
        np.testing.assert_allclose(aucs, aucs_n, rtol=0, atol=1e-12)
        np.testing.assert_allclose(cov, cov_n, rtol=0, atol=1e-12)
        assert aucs[0] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
        res = stats.delong_test(y, a, b)
        sd = np.sqrt(cov_n[0, 0] + cov_n[1, 1] - 2 * cov_n[0, 1])
        assert res.z == pytest.approx((aucs_n[0] - aucs_n[1]) / sd, abs=1e-9)


def test_delong_identical_and_perfect():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    res = stats.delong_test(y, s, s)
    assert (res.z, res.p) == (0.0, 1.0)
    ci = stats.delong_ci(y, s)
    assert ci.auc == 1.0 and ci.var == 0.0 and ci.ci == (1.0, 1.0)
    with pytest.raises(ValueError, match="one positive and one negative"):
        stats.delong_ci(np.ones(4, int), np.arange(4.0))


def _enumerated_p(a, b):
    """Two-sided p of the paired swap test by full enumeration of all 2**n within-patient swaps,
    statistic = mean(a - b) over all n patients; p = min(1, 2 min(P(T >= t), P(T <= t)))."""
    d = a - b
    t_obs = d.mean()
    null = np.array(
        [np.mean(np.where(signs, d, -d)) for signs in itertools.product([True, False], repeat=len(d))]
    )
    eps = 1e-12
    return min(1.0, 2 * min(np.mean(null >= t_obs - eps), np.mean(null <= t_obs + eps)))


def test_permutation_exact_matches_enumeration_and_mcnemar():
    a = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0])  # method a correct, 12 positives
    b = np.array([0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0])
    res = stats.paired_permutation_test(a, b, n_resamples=10000, seed=1)
    assert res.exact
    assert res.p == _enumerated_p(a.astype(float), b.astype(float))
    # 6 discordant pairs, 5 in favour of a: exact binomial 2 * P(X <= 1 | 6, 1/2) = 2 * 7 / 64
    assert res.p == pytest.approx(14 / 64, abs=1e-15)
    assert res.mcnemar_p == pytest.approx(14 / 64, abs=1e-12)
    assert (res.value_a, res.value_b, res.n10, res.n01) == (9 / 12, 5 / 12, 5.0, 1.0)
    # fractional values (mean reader) still match the enumeration
    frac = np.array([0.0, 1 / 3, 2 / 3, 1.0, 1 / 3, 0.0, 1.0, 2 / 3, 1 / 3, 0.0])
    r2 = stats.paired_permutation_test(a[:10], frac, n_resamples=10000)
    assert r2.exact and r2.mcnemar_p is None
    assert r2.p == pytest.approx(_enumerated_p(a[:10].astype(float), frac), abs=1e-12)


def test_permutation_random_close_to_mcnemar_and_degenerate():
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.8).astype(int)
    b = np.where(rng.random(200) < 0.25, 1 - a, a)  # ~50 discordant pairs: 2**50 > n_resamples
    res = stats.paired_permutation_test(a, b, n_resamples=10000, seed=0)
    assert not res.exact
    assert abs(res.p - res.mcnemar_p) < 0.03  # Monte-Carlo sign test vs exact binomial
    same = stats.paired_permutation_test(a, a)
    assert same.p == 1.0 and same.exact
    one = stats.paired_permutation_test(np.array([1, 0, 1]), np.array([1, 1, 1]))
    assert one.p == 1.0 and one.mcnemar_p == pytest.approx(1.0)


def test_bootstrap_stratified_and_auc_rows():
    y = np.array([0] * 7 + [1] * 3)
    idx = stats.bootstrap_indices(10, 500, seed=0, strata=y)
    assert idx.shape == (500, 10)
    assert (y[idx].sum(axis=1) == 3).all()  # class counts kept: no one-class resample
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=10) + y, 1)
    rows = stats.auc_rows(y[idx[:20]], s[idx[:20]])
    for r, i in zip(rows, idx[:20], strict=True):
        assert r == pytest.approx(roc_auc_score(y[i], s[i]), abs=1e-12)
    assert np.isnan(stats.auc_rows(np.ones((1, 4)), np.arange(4.0)[None]))[0]
    b = stats.bootstrap_ci(lambda i: stats.auc_rows(y[i], s[i]), 10, 300, seed=0, strata=y)
    assert b.n_valid == 300 and b.ci[0] <= b.estimate <= b.ci[1]
