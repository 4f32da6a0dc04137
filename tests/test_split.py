"""Temporal split: the last year is the test set, stratified seeded validation, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cpmn.data.split import split_sheet, temporal_split
from cpmn.errors import InputError


def _cohort(n_per_year=30, years=(2019, 2020, 2021, 2022), pe_every=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for y in years:
        for i in range(n_per_year):
            day = pd.Timestamp(f"{y}-01-01") + pd.Timedelta(days=int(rng.integers(0, 365)))
            rows.append(
                {"patient_id": f"P{y}{i:03d}", "label": int(i % pe_every == 0), "study_date": day.date()}
            )
    return pd.DataFrame(rows).astype({"study_date": str})


def test_temporal_and_stratified():
    df = _cohort()  # 120 patients, 10 PE per year
    out = temporal_split(df, {"val_fraction": 0.2, "seed": 0})
    assert list(out["patient_id"]) == list(df["patient_id"])
    test = out[out["split"] == "test"]
    assert len(test) == 30 and test["study_date"].str.startswith("2022").all()
    assert not out.loc[out["split"] != "test", "study_date"].str.startswith("2022").any()
    val = out[out["split"] == "val"]
    train = out[out["split"] == "train"]
    assert len(val) == 18 and len(train) == 72  # 20% of 90
    assert val["label"].sum() == 6 and train["label"].sum() == 24  # 30 PE before 2022, stratified 20/80


def test_reproducible_with_seed():
    df = _cohort()
    a = temporal_split(df, {"seed": 5})
    b = temporal_split(df, {"seed": 5})
    c = temporal_split(df, {"seed": 6})
    pd.testing.assert_frame_equal(a, b)
    assert set(a.loc[a.split == "val", "patient_id"]) != set(c.loc[c.split == "val", "patient_id"])
    assert (a.split == "test").equals(c.split == "test")  # the seed never moves the test set


def test_no_positives_in_test_year():
    df = _cohort()
    df.loc[df["study_date"].str.startswith("2022"), "label"] = 0
    with pytest.raises(InputError, match=r"test split \(year 2022\) has no positive"):
        temporal_split(df, {})


def test_errors_name_the_row_and_split(tmp_path):
    df = _cohort(n_per_year=5)
    bad = df.copy()
    bad.loc[3, "study_date"] = "31/12/2020"
    with pytest.raises(InputError, match=r"^patient P2019003: cohort sheet: row 4: study_date"):
        temporal_split(bad, {})
    one_year = _cohort(years=(2022,))
    with pytest.raises(InputError, match="no earlier years"):
        temporal_split(one_year, {})
    tiny = _cohort(n_per_year=2, years=(2020, 2021), pe_every=2)  # 1 PE + 1 normal before 2021
    with pytest.raises(InputError, match="cannot stratify|val split"):
        temporal_split(tiny, {})
    sheet = tmp_path / "cohort.tsv"
    df.to_csv(sheet, sep="\t", index=False)
    out = split_sheet(sheet, tmp_path / "splits.tsv", {"seed": 1})
    back = pd.read_csv(tmp_path / "splits.tsv", sep="\t", dtype={"patient_id": str})
    assert list(back.columns[:2]) == ["patient_id", "split"]
    assert list(back["split"]) == list(out["split"])


def test_defaults_match_config_yaml():
    from pathlib import Path

    from cpmn.config import load_config
    from cpmn.data.split import DEFAULTS

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")["split"]
    assert DEFAULTS == cfg


@pytest.mark.parametrize("overlay", [None, "tiny.yaml"])
def test_the_shipped_configs_give_a_valid_split(overlay):
    """The default and the tiny phantom cohorts split into train/val/test, each holding both classes."""
    from pathlib import Path

    from cpmn.config import load_config
    from cpmn.synthetic.cohort import plan_cohort

    root = Path(__file__).resolve().parents[1] / "config"
    files = [root / "config.yaml"] + ([root / overlay] if overlay else [])
    cfg = load_config(*files)
    plan = plan_cohort(cfg["synthetic"])
    out = temporal_split(plan[["patient_id", "label", "study_date"]], cfg["split"])
    for name in ("train", "val", "test"):
        assert set(out.label[out.split == name]) == {0, 1}, name
