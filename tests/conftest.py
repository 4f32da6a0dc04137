"""Shared test set-up."""

import pytest


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
