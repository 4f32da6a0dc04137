"""Shared test set-up."""

import numpy as np
import pytest

#: the tiny training cohort's volume shape and patch size (P = 32^3, the smallest the net takes)
SHAPE = (40, 40, 24)
P = [32, 32, 32]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(request):
    """One torch thread for modules that use torch: on a shared 2-core machine OpenMP spin-waiting makes two
    threads several times slower than one."""
    if "torch" not in request.module.__dict__:
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def drawn_axes(monkeypatch):
    """Keep the axes of every ``plt.subplots`` call (Agg backend): ``drawn_axes[-1]`` is the last figure's
    axes, so a test can read back what a figure function plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = []
    real = plt.subplots

    def spy(*args, **kw):
        fig, axes = real(*args, **kw)
        seen.append(axes)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    return seen


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two patients: p0 with a bright 'embolus' block in both phases, p1 without; both in train and val."""
    root = tmp_path_factory.mktemp("cohort")
    pre, pat = root / "pre", root / "pat"
    pre.mkdir()
    pat.mkdir()
    rng = np.random.default_rng(0)
    for k, pid in enumerate(["p0", "p1"]):
        mask = np.zeros(SHAPE, np.uint8)
        nct = rng.random(SHAPE, dtype=np.float32) * 0.2
        if k == 0:
            mask[16:24, 16:24, 8:14] = 1
        ctpa = nct + 0.5 * mask
        np.savez(
            pre / f"{pid}.npz",
            nct=nct + 0.2 * mask,
            ctpa=ctpa,
            mask=mask,
            label=np.array(1 - k),
            spacing=np.array([5.0, 5.0, 5.0]),
        )
        centres = (
            np.array([[20, 20, 11], [5, 5, 5], [35, 30, 20]])
            if k == 0
            else np.array([[20, 20, 12], [2, 3, 4]])
        )
        positive = np.array([True, False, False]) if k == 0 else np.zeros(2, bool)
        np.savez(pat / f"{pid}.npz", centres=centres, positive=positive, size=np.array(P))
    splits = root / "splits.tsv"
    splits.write_text("patient_id\tsplit\np0\ttrain\np1\ttrain\np0\tval\np1\tval\n")
    return {"pre": pre, "pat": pat, "splits": splits, "root": root}
