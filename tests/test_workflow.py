"""The Snakemake workflow: the DAG builds, the config is validated, the tiny study runs (slow)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_dry_run_builds_the_dag(tmp_path):
    r = snakemake("-n", "--config", f"results={tmp_path}/results")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    for rule in ("synthetic", "screen_cohort", "split", "train", "infer", "evaluate"):
        assert rule in out
    # one training job per variant of the config, and one inference job per variant and split
    variants = yaml.safe_load((ROOT / "config/config.yaml").read_text())["variants"]
    assert out.count("rule train:") == len(variants) >= 5
    assert out.count("rule infer:") == 2 * len(variants)


def test_typo_in_config_fails_with_schema_message(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["train"]["epochs_"] = cfg["train"].pop("epochs")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    r = snakemake("-n", "--configfile", str(bad))
    assert r.returncode != 0
    msg = r.stdout + r.stderr
    assert "epochs_" in msg and ("Additional properties" in msg or "schema" in msg.lower())


def test_wrong_type_in_config_fails(tmp_path):
    r = snakemake("-n", "--config", "patches={size: [64, 64]}")
    assert r.returncode != 0
    assert "size" in (r.stdout + r.stderr)


def test_a_sheet_source_without_a_sheet_is_the_schemas_error(tmp_path):
    """``cohort.source: sheet`` needs ``cohort.sheet``: the schema's if/then says so before any job runs."""
    for sheet, why in ((None, "None is not of type 'string'"), ("", "'' should be non-empty")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"cohort": {"source": "sheet", "sheet": sheet}}))
        r = snakemake("-n", "--configfile", str(bad))
        msg = r.stdout + r.stderr
        assert r.returncode != 0 and "Error validating config file" in msg, sheet
        assert why in msg and "['cohort']['sheet']" in msg, msg[-2000:]


def test_own_cohort_sheet_bad_row_is_left_to_screening(tmp_path):
    """A bad row (label "yes", empty mask of a normal) does not stop the workflow; a missing column does."""
    cols = "patient_id\tlabel\tstudy_date\tnct_dicom\tctpa_dicom\tctpa_mask\n"
    good = tmp_path / "good.tsv"
    good.write_text(cols + "P1\tyes\t2021-01-01\ta\ta\t\nP2\t0\t2021-01-01\tb\tb\t\n")
    r = snakemake("-n", "--config", f"results={tmp_path}/res", f"cohort={{source: sheet, sheet: {good}}}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "screen_cohort" in r.stdout + r.stderr
    # run the screening for real: both rows are excluded, and the run ends by listing them on the console
    r = snakemake(
        f"{tmp_path}/res/cohort.included.tsv",
        "--cores",
        "1",
        "--config",
        f"results={tmp_path}/res",
        f"cohort={{source: sheet, sheet: {good}}}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    console = r.stdout + r.stderr
    assert f"EXCLUDED patient P1: {good}: data row 1 (line 2): column label:" in console
    assert f"EXCLUDED patient P2: {tmp_path / 'b'}: " in console
    assert f"2 row(s) excluded by screening (2 patient id(s)): see {tmp_path}/res/qc/excluded.tsv" in console
    bad = tmp_path / "bad.tsv"
    bad.write_text("patient_id\tlabel\nP1\t1\n")
    r = snakemake("-n", "--config", f"results={tmp_path}/res", f"cohort={{source: sheet, sheet: {bad}}}")
    assert r.returncode != 0
    want = f"cohort sheet {bad}: lacks column(s) study_date, nct_dicom, ctpa_dicom, ctpa_mask"
    assert want in r.stdout + r.stderr


def test_own_cohort_normal_without_annotation_and_id_na(tmp_path):
    """A normal patient whose ctpa_mask cell is empty registers (an all-zero mask), and an id that pandas
    would read as missing ("NA") stays that id through screening, the DAG and registration."""
    res = tmp_path / "res"
    tiny = ["--configfile", "config/tiny.yaml", "--config", f"results={res}"]
    r = snakemake(f"{res}/synthetic/cohort.tsv", "--cores", "2", *tiny)
    assert r.returncode == 0, r.stderr[-2000:]
    sheet = pd.read_csv(res / "synthetic" / "cohort.tsv", sep="\t", dtype=str, keep_default_na=False)
    normal = sheet.index[sheet["label"] == "0"][0]
    sheet.loc[normal, ["patient_id", "ctpa_mask"]] = ["NA", ""]
    own = res / "synthetic" / "own.tsv"
    sheet.to_csv(own, sep="\t", index=False)
    target = res / "registered" / "NA" / "mask_in_nct.nii.gz"
    r = snakemake(str(target), "--cores", "2", *tiny, f"cohort={{source: sheet, sheet: {own}}}")
    assert r.returncode == 0, r.stderr[-2000:]
    log = (r.stdout + r.stderr).splitlines()
    assert "--mask" not in next(line for line in log if "cpmn register --patient NA" in line)
    mask = nib.load(target)
    assert mask.shape == nib.load(res / "nifti" / "NA" / "nct.nii.gz").shape and not mask.get_fdata().any()


def test_patient_failing_after_screening_is_named_and_left_out(tmp_path):
    """A patient that passes screening but fails registration (a constant NCT): the other patients' jobs
    go on (keep-going), the run ends naming the patient, its file and the cohort.exclude to set; with that
    set, the run completes without redoing the other patient's finished jobs."""
    import pydicom

    res = tmp_path / "res"
    base = ["--workflow-profile", "profiles/default", "--configfile", "config/tiny.yaml"]
    tiny = [*base, "--config", f"results={res}"]
    r = snakemake(f"{res}/synthetic/cohort.tsv", "--cores", "2", *tiny)
    assert r.returncode == 0, r.stderr[-2000:]
    sheet = pd.read_csv(res / "synthetic" / "cohort.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet = sheet.iloc[:2]
    bad, good = sheet.patient_id
    truth = json.loads((res / "synthetic" / "truth" / bad / "truth.json").read_text())
    number = next(s["series_number"] for s in truth["series"] if s["role"] == "nct")
    for f in sorted((res / "synthetic" / sheet.nct_dicom.iloc[0]).glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if int(ds.SeriesNumber) == number:  # the NCT series: every voxel 40 HU (blood, as screening sees)
            px = ds.pixel_array
            px[...] = round((40 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
            ds.PixelData = px.tobytes()
            ds.save_as(f)
    own = res / "synthetic" / "own.tsv"
    sheet.to_csv(own, sep="\t", index=False)
    targets = [str(res / "registered" / p / "qc.json") for p in (bad, good)]
    cohort = f"cohort={{source: sheet, sheet: {own}}}"
    r = snakemake(*targets, "--cores", "2", *tiny, cohort)
    console = r.stdout + r.stderr
    assert r.returncode != 0
    assert (res / "registered" / good / "qc.json").is_file()  # the rest of the cohort went on
    assert not (res / "registered" / bad).exists() or not any((res / "registered" / bad).iterdir())
    line = next(x for x in console.splitlines() if x.startswith("FAILED after screening: "))
    assert line.startswith(f"FAILED after screening: patient {bad}: ") and "constant" in line, line
    assert f"cohort.exclude: [{bad}]" in console
    done = (res / "nifti" / good / "nct.nii.gz").stat().st_mtime_ns
    r = snakemake(
        targets[1], "--cores", "2", *tiny, f"cohort={{source: sheet, sheet: {own}, exclude: [{bad}]}}"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    excluded = pd.read_csv(res / "qc" / "excluded.tsv", sep="\t", dtype=str)
    assert excluded.values.tolist()[0][:2] == [bad, "config"]
    assert (res / "nifti" / good / "nct.nii.gz").stat().st_mtime_ns == done  # not converted again
    assert "rule convert" not in r.stdout + r.stderr


def test_lint_is_clean():
    r = snakemake("--lint")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "Congratulations" in r.stdout + r.stderr


def test_every_rule_has_a_log_and_a_benchmark():
    """Every rule and checkpoint of workflow/rules/ (snakefmt-formatted: directives at four spaces) names a
    ``log:`` and a ``benchmark:``, so that a failed job has its log and every stage's run time is measured."""
    blocks = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        parts = re.split(r"^(?:rule|checkpoint) (\w+):\n", smk.read_text(), flags=re.M)
        blocks.update(
            {f"{smk.name}:{name}": body for name, body in zip(parts[1::2], parts[2::2], strict=True)}
        )
    headers = [
        line for smk in (ROOT / "workflow" / "rules").glob("*.smk") for line in smk.read_text().splitlines()
    ]
    assert len(blocks) == sum(re.match(r"(rule|checkpoint) ", line) is not None for line in headers) >= 15
    missing = [
        (n, d) for n, body in blocks.items() for d in ("log", "benchmark") if f"\n    {d}:" not in body
    ]
    assert not missing


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    """The whole workflow on config/tiny.yaml: every final output exists and parses."""
    results = tmp_path / "results"
    r = snakemake(
        "--cores", "2", "--configfile", "config/tiny.yaml", "--config", f"results={results}", timeout=1800
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    sys.path.insert(0, str(ROOT / "tests/slurm"))
    from check_outputs import check

    assert check(results) == []
    fumpe = pd.read_csv(results / "tables" / "fumpe_dice.tsv", sep="\t")  # tiny.yaml runs the FUMPE rules
    assert fumpe.patient_id.tolist() == ["PAT003", "mean"]
    assert fumpe.dice.iloc[-1] == pytest.approx(fumpe.dice.iloc[0]) and 0 <= fumpe.dice.iloc[0] <= 1
    report = tmp_path / "report.html"
    r = snakemake(
        "--configfile", "config/tiny.yaml", "--config", f"results={results}", "--report", str(report)
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # profiles/default fixes disk_mb: Snakemake's built-in default sizes the inputs, which fails inside
    # --report and used to print "coroutine ... was never awaited" once per job
    assert "Warning" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    html = report.read_text(errors="replace")
    for item in (
        "table1_ablation",
        "fig2a_roc",
        "registration.tsv",
        "train_log.tsv",
        "montage.png",
        "_cam.png",
        "fumpe_dice.tsv",
    ):
        assert item in html, item
    # every model folder describes itself, and `cpmn predict` uses it on one scan straight from DICOM
    sheet = pd.read_csv(results / "splits.tsv", sep="\t")
    pid = sheet[sheet.split == "test"].patient_id.iloc[0]
    for variant in ("nct", "cpmn"):
        card = json.loads((results / "models" / variant / "card.json").read_text())
        stats = json.loads((results / "stats.json").read_text())
        assert card["threshold"]["value"] == stats["variants"][variant]["threshold"]["value"]
    out = tmp_path / "predict"
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "cpmn"),
            "predict",
            "--model",
            str(results / "models" / "cpmn"),
            "--nct",
            str(results / "synthetic" / "dicom" / pid),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    predicted = pd.read_csv(results / "predictions" / "cpmn" / "test.tsv", sep="\t").set_index("patient_id")
    assert rep["probability"] == pytest.approx(predicted.loc[pid, "prob"], abs=1e-4)
    shutil.rmtree(results / "synthetic" / "dicom", ignore_errors=True)


@pytest.mark.slow
def test_rerun_after_a_cohort_change_trains_on_the_new_split(tmp_path):
    """The README's edit-and-rerun loop on an own cohort: a study with one broken row (excluded at
    screening) runs to the end; then the row is fixed and another patient is set in cohort.exclude, and
    the rerun into the same results folder succeeds, every variant trains afresh on the new split (its
    checkpoint records the new ids) and no patient-failure hint is printed."""
    res = tmp_path / "res"
    more = tmp_path / "twelve.yaml"
    more.write_text("synthetic:\n  patients: 12\n")  # one left out, 11 still split by class
    tiny = ["--workflow-profile", "profiles/default", "--configfile", "config/tiny.yaml", str(more)]
    tiny += ["--config", f"results={res}"]
    r = snakemake(f"{res}/synthetic/cohort.tsv", "--cores", "2", *tiny)
    assert r.returncode == 0, r.stderr[-2000:]
    sheet = pd.read_csv(res / "synthetic" / "cohort.tsv", sep="\t", dtype=str, keep_default_na=False)
    years = sheet.study_date.str[:4]
    early = sheet[years == years.min()].patient_id.tolist()  # the first year always trains (tiny.yaml)
    broken, dropped = early[0], early[1]
    own = res / "synthetic" / "own.tsv"
    bad = sheet.copy()
    bad.loc[bad.patient_id == broken, "nct_dicom"] = "dicom/no-such-folder"
    bad.to_csv(own, sep="\t", index=False)
    cohort = f"cohort={{source: sheet, sheet: {own}}}"
    r = snakemake("--cores", "2", *tiny, cohort, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    first = pd.read_csv(res / "splits.tsv", sep="\t", dtype=str)
    assert broken not in set(first.patient_id) and dropped in set(first.patient_id)

    sheet.to_csv(own, sep="\t", index=False)  # the row fixed
    cohort = f"cohort={{source: sheet, sheet: {own}, exclude: [{dropped}]}}"
    r = snakemake("--cores", "2", *tiny, cohort, timeout=1800)
    console = r.stdout + r.stderr
    assert r.returncode == 0, console[-3000:]
    assert "failed after screening" not in console.lower()
    splits = pd.read_csv(res / "splits.tsv", sep="\t", dtype=str)
    assert broken in set(splits.patient_id) and dropped not in set(splits.patient_id)
    want = {k: splits.patient_id[splits.split == k].tolist() for k in ("train", "val")}
    import torch

    for variant in yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["variants"]:
        ckpt = torch.load(res / "models" / variant / "last.pt", weights_only=False, map_location="cpu")
        assert (ckpt["data"]["train_ids"], ckpt["data"]["val_ids"]) == (want["train"], want["val"]), variant
        assert (res / "models" / variant / "model.pt").is_file()
        log = (res / "logs" / "train" / f"{variant}.log").read_text()
        assert "trained on other data, train ids changed" in log, log[-500:]
    table = pd.read_csv(res / "tables" / "table1_ablation.tsv", sep="\t")
    assert len(table) == 5


@pytest.mark.slow
def test_slurm_profile_on_a_real_one_node_cluster(tmp_path):
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs root and apt-get to install a one-node SLURM")
    r = subprocess.run(
        ["bash", str(ROOT / "tests/slurm/run_slurm_test.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "PASS" in r.stdout


@pytest.mark.parametrize("extra", [{"montage": False}, {"readers": 0}])
def test_synthesis_rule_honours_the_optional_synthetic_outputs(tmp_path, extra):
    """synthetic.montage false (no montage.png) and readers 0 still complete the synthesis rule."""
    overlay = tmp_path / "small.yaml"
    synth = {"patients": 2, "shape": [48, 48, 32], "spacing": [6.0, 6.0, 6.0], **extra}
    overlay.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "synthetic": synth}))
    sheet = tmp_path / "results" / "synthetic" / "cohort.tsv"
    r = snakemake("--cores", "2", "--configfile", str(overlay), "--", str(sheet))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert sheet.is_file()
    assert (sheet.parent / "montage.png").is_file() == extra.get("montage", True)
