"""The conda environment files (for --sdm conda) parse and pin exactly the versions of requirements.lock."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version.strip()
    return pins


def test_lock_pins_the_required_versions():
    pins = lock_versions()
    assert pins["torch"] == "2.13.0"
    assert pins["antspyx"] == "0.6.3"
    assert tuple(int(x) for x in pins["numpy"].split(".")[:2]) < (2, 4)
    assert pins["snakemake"].startswith("9.")
    for name in (
        "monai",
        "snakemake-executor-plugin-slurm",
        "nibabel",
        "pydicom",
        "dcm2niix",
        "pandas",
        "scikit-learn",
        "statsmodels",
        "matplotlib",
        "scipy",
        "tqdm",
        "pytest",
        "ruff",
        "snakefmt",
    ):
        assert name in pins, name


@pytest.mark.parametrize("env", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_file_pins_match_lock(env):
    spec = yaml.safe_load(env.read_text())
    assert spec["name"].startswith("cpmn-")
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = lock_versions()
    checked = 0
    for req in pip:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", req)
        if m:
            assert pins[m.group(1).lower()] == m.group(2), (
                f"{env.name}: {req} vs lock {pins[m.group(1).lower()]}"
            )
            checked += 1
    assert checked >= 5


def test_every_rule_with_a_shell_has_a_conda_env():
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        text = smk.read_text()
        for block in re.split(r"\n(?=(?:rule|checkpoint) )", text):
            if block.startswith(("rule ", "checkpoint ")) and "shell:" in block:
                m = re.search(r'conda:\s*\n\s*"\.\./\.\./envs/(\w+)\.yaml"', block)
                assert m, f"{smk.name}: {block.splitlines()[0]} has no conda env"
                assert (ROOT / "envs" / f"{m.group(1)}.yaml").exists()
