"""Plots are Figures outside pyplot that IPython shows and save_figure writes; whole-epoch ticks."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from PIL import Image

import utils

# every plot function, in a fresh process whose backend is svg: the backend must stay svg
DRAW_ALL = """\
import sys, matplotlib, torch, utils
from matplotlib.figure import Figure
x, history = torch.rand(4, 1, 28, 28), [dict.fromkeys(["epoch", "train_loss", "train_bce",
    "train_kl", "val_loss", "val_bce", "val_kl"], 1)]
figures = [utils.plot_rows([x, x], ["a", "b"], "rows", column_labels=list("abcd")),
    utils.plot_reconstructions(x, x), utils.plot_grid(x, "grid", nrow=2),
    utils.plot_loss_curves(history), utils.plot_latent_space(torch.randn(9, 2), torch.arange(9)),
    utils.plot_anomalies([("top", x, x, list("abcd"))], title="anomalies"),
    utils.plot_user_reconstruction(x[0, 0] * 255, x[0], x[0], "mine")]
for i, fig in enumerate(figures):
    assert isinstance(fig, Figure) and fig.canvas.manager is None  # not one of pyplot's figures
    utils.save_figure(fig, f"{sys.argv[1]}/{i}.png")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_plots_leave_the_backend_and_pyplot_alone_and_save_whole_pngs(tmp_path):
    env = os.environ | {"MPLBACKEND": "svg", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", DRAW_ALL, str(tmp_path)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split() == ["svg", "False"], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.png" for i in range(7)]
    for path in tmp_path.iterdir():
        with Image.open(path) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100


def test_a_notebook_shows_a_figure_inline():
    formatters = pytest.importorskip("IPython.core.formatters")
    data, _ = formatters.DisplayFormatter().format(utils.plot_grid(torch.rand(4, 1, 28, 28), "g"))
    assert data["image/png"].startswith(b"\x89PNG")


@pytest.mark.parametrize("epochs", [1, 3])
def test_loss_curves_tick_whole_epochs(epochs):
    keys = [f"{part}_{name}" for part in ("train", "val") for name in ("loss", "bce", "kl")]
    history = [{key: 100.0 / e for key in keys} | {"epoch": e} for e in range(1, epochs + 1)]
    for ax in utils.plot_loss_curves(history).axes:
        low, high = ax.get_xlim()
        assert [t for t in ax.get_xticks() if low <= t <= high] == list(range(1, epochs + 1))
