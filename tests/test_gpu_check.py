"""benchmarks/gpu_check.py on CPU at a small patch: the code path of a GPU run, its JSON and its checks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_reports_falling_losses(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "g.json"
    args = ["--device", "cpu", "--patch", "64", "64", "32", "--batch", "2", "--steps", "5", "--warmup", "1"]
    rc = mod.main([*args, "--window-volume", "80", "64", "32", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["losses_finite"] and r["loss_last_tenth"] < r["loss_first_tenth"]
    assert r["steps"] == 5 and r["batch"] == 2 and r["patch"] == [64, 64, 32]
    assert r["flops_per_step"] > 1e9 and math.isclose(
        r["achieved_tflops"], r["flops_per_step"] / r["seconds_per_step"] / 1e12
    )
    assert r["sliding_window_mask_shape"] == [80, 64, 32]
    assert mod.device_peak("NVIDIA H100 80GB HBM3") == 989.0 and mod.device_peak("NVIDIA H100 PCIe") == 756.0
    assert mod.device_peak("some other card") is None
