"""The conda environment files (for --sdm conda) parse and pin exactly the versions of requirements.lock."""

import os
import re
import subprocess
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


def _snakemake_deploys(env: Path, work: Path) -> Path:
    """Where Snakemake puts an env file before `conda env create --file` (deployment/conda.py, create_env):
    ``.snakemake/conda/<hash>.yaml`` under the working directory. Returns the copy."""
    target = work / ".snakemake" / "conda" / f"{abs(hash(env.read_text())):x}.yaml"
    target.parent.mkdir(parents=True)
    target.write_text(env.read_text())
    return target


@pytest.mark.parametrize("env", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_file_holds_no_path_that_resolves_from_its_copy(env, tmp_path):
    copy = _snakemake_deploys(env, tmp_path)
    spec = yaml.safe_load(copy.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    for req in pip:
        # conda writes the pip list to a requirements file beside the copy and pip resolves paths from there
        for token in req.split():
            if token.startswith(("-", "http")) or "==" in token:
                continue
            resolved = (copy.parent / token).resolve()
            assert not resolved.exists(), f"{env.name}: {req} resolves to {resolved} from the copy"
        assert not re.search(r"(^|\s)(-e|--editable)\b|\.\.|file:", req), f"{env.name}: {req}"


@pytest.mark.parametrize("env", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_post_deploy_script_installs_this_project_from_anywhere(env, tmp_path):
    """Snakemake runs ``envs/<name>.post-deploy.sh`` (the env file's name with that suffix) inside the new
    environment with the working directory of the run. A stub ``python`` records what it is asked to do."""
    script = env.with_suffix(".post-deploy.sh")
    assert script.is_file(), f"{script.name} missing"
    stub = tmp_path / "bin"
    stub.mkdir()
    record = tmp_path / "args.txt"
    (stub / "python").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (stub / "python").chmod(0o755)
    elsewhere = tmp_path / "run_dir"
    elsewhere.mkdir()
    env_vars = {"PATH": f"{stub}:/usr/bin:/bin", "HOME": str(tmp_path)}
    rel = os.path.relpath(script, elsewhere)  # run as Snakemake does, by a path from the run's directory
    subprocess.run(["bash", rel], cwd=elsewhere, env=env_vars, check=True)
    args = record.read_text().split("\n")
    assert args[:4] == ["-m", "pip", "install", "--no-deps"]
    target = Path(args[args.index("--editable") + 1])
    assert target.resolve() == ROOT.resolve()
    assert 'name = "cpmn-pe"' in (target / "pyproject.toml").read_text()
