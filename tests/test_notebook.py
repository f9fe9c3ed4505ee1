"""What a notebook user meets: the README's blocks run and train bit for bit as `python main.py`;
notebooks/explore.ipynb is stored clean and runs in a real kernel; plots are Figures, no pyplot."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import MNIST_DIR, ROOT, copy_run, needs_mnist, run_main
from matplotlib.figure import Figure
from PIL import Image

import checkpoint
import utils

README = (ROOT / "README.md").read_text()
FIGURES = ("test_loss", "test_bce", "test_kl", "test_iwae_nll", "active_units", "kl_per_dim")


def block(name: str) -> str:
    after = README.split(f"<!-- python: {name} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@needs_mnist
def test_readme_blocks_run_and_train_as_the_command_line_does(tmp_path, monkeypatch):
    user_folder = tmp_path  # laid out as a clone is: data/ holding MNIST, models_mnist/, images/
    (user_folder / "data").symlink_to(MNIST_DIR)
    (user_folder / "models_mnist").mkdir()
    (user_folder / "images").mkdir()
    monkeypatch.chdir(user_folder)
    ns: dict = {}
    for name in ("load", "score", "train"):
        exec(compile(block(name), f"README.md, block {name}", "exec"), ns)
    assert ns["pixels"].shape == (8, 1, 28, 28) and torch.equal(ns["pixels"], ns["recon"])
    assert ns["between"].shape == (10, 1, 28, 28) and ns["samples"].shape == (16, 1, 28, 28)
    assert isinstance(ns["fig"], Figure)
    assert (user_folder / "images" / "my_reconstructions.png").stat().st_size > 0
    argv = "--epochs 1 --subset 2000 --iwae-k 10 --no-progress --checkpoint-dir models_mnist/cli"
    code, _, err = run_main(argv.split(), cwd=user_folder)
    assert code == 0, err
    from_python = checkpoint.load(user_folder / "models_mnist" / "from-python" / "best.pt")
    from_cli = checkpoint.load(user_folder / "models_mnist" / "cli" / "best.pt")
    for key in ("model", "anomaly_reference", "latent_map"):
        tensors = [list(checkpoint.tensors(run[key])) for run in (from_python, from_cli)]
        assert len(tensors[0]) == len(tensors[1]) > 0
        assert all(torch.equal(a, b) for a, b in zip(*tensors)), key
    metrics = json.loads((user_folder / "models_mnist" / "cli" / "metrics.json").read_text())
    assert {k: ns["metrics"][k] for k in FIGURES} == {k: metrics[k] for k in FIGURES}


def test_the_readme_table_of_the_vae_names_the_lines_the_code_has():
    table = README.split("<!-- vae-path:", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"`(\w+\.py)` (\d+)-(\d+): ((?:`\w+`(?:, )?)+) \| (\d+) \|", table)
    assert len(rows) == 6
    for path, start, end, names, count in rows:
        nodes = {n.name: n for n in ast.parse((ROOT / path).read_text()).body if hasattr(n, "name")}
        names = re.findall(r"`(\w+)`", names)
        first, last = nodes[names[0]], nodes[names[-1]]
        begins = min([first.lineno] + [d.lineno for d in first.decorator_list])
        assert (begins, last.end_lineno) == (int(start), int(end)), (path, names)
        assert int(count) == int(end) - int(start) + 1
    total = int(README.split("**The VAE in ", 1)[1].split(" ", 1)[0])
    assert total == sum(int(row[4]) for row in rows)


def test_notebook_is_stored_clean_runs_keeping_the_inline_backend(trained, tmp_path, monkeypatch):
    """Stored without outputs or drawing code of its own; run in a real kernel, each plot shown."""
    nbformat, nbclient = (pytest.importorskip(name) for name in ("nbformat", "nbclient"))
    stored = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    cells = [c for c in stored.cells if c.cell_type == "code"]
    assert cells and all(c.outputs == [] and c.execution_count is None for c in cells)
    sources = "\n".join(c.source for c in cells)
    assert "pyplot" not in sources and "imshow" not in sources and "utils.plot_" in sources
    folder = copy_run(trained, tmp_path)
    monkeypatch.setenv("VAE_CHECKPOINT", str(folder / "best.pt"))  # the kernel inherits these
    monkeypatch.setenv("MNIST_DIR", MNIST_DIR)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.cells.append(nbformat.v4.new_code_cell("import matplotlib\nmatplotlib.get_backend()"))
    resources = {"metadata": {"path": str(ROOT / "notebooks")}}
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources).execute()
    outputs = [o for c in nb.cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert outputs[-1].data["text/plain"] == "'module://matplotlib_inline.backend_inline'"
    for cell in cells:  # each call that draws (utils.plot_*, evaluate.anomaly_figure) shows it
        shown = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        drawn = cell.source.count("utils.plot_") + cell.source.count("anomaly_figure(")
        assert len(shown) == drawn, cell.source
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{folder / 'best.pt'}: a model trained here, epoch 2 of 2" in text
    assert "epoch 2, best validation loss" in text and "mean score by digit" in text
    assert re.findall(r"test image 0 \(a 7\): score -?\d+\.\d\d, at least as high as", text)
    assert text.count("test image 0") == 1  # its score and percentile said once
    starts = ("combined:", "elbo:", "test digits 1-5:")
    scores = [line for line in text.splitlines() if line.strip().startswith(starts)]
    numbers = re.findall(r"-?\d+\.\d+", "\n".join(scores))
    assert len(numbers) == 25 and "-0.00" not in numbers, numbers
    assert all(len(n.split(".")[1]) == 2 for n in numbers), numbers


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
    formatters = pytest.importorskip("IPython.core.formatters")  # a notebook shows a plot inline
    data, _ = formatters.DisplayFormatter().format(utils.plot_grid(torch.rand(4, 1, 28, 28), "g"))
    assert data["image/png"].startswith(b"\x89PNG")


@pytest.mark.parametrize("epochs", [1, 3])
def test_loss_curves_tick_whole_epochs(epochs):
    keys = [f"{part}_{name}" for part in ("train", "val") for name in ("loss", "bce", "kl")]
    history = [{key: 100.0 / e for key in keys} | {"epoch": e} for e in range(1, epochs + 1)]
    for ax in utils.plot_loss_curves(history).axes:
        low, high = ax.get_xlim()
        assert [t for t in ax.get_xticks() if low <= t <= high] == list(range(1, epochs + 1))
