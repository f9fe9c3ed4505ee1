"""notebooks/explore.ipynb is stored clean and runs top to bottom in a real Jupyter kernel, drawing
with utils and keeping the inline backend. (The README's Python blocks: tests/test_readme.py.)"""

import re

import pytest
from helpers import MNIST_DIR, ROOT, copy_run

NOTEBOOK = ROOT / "notebooks" / "explore.ipynb"


def code_cells(nbformat):
    return [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]


def test_notebook_is_stored_without_outputs_or_drawing_code_of_its_own():
    cells = code_cells(pytest.importorskip("nbformat"))
    assert cells and all(c.outputs == [] and c.execution_count is None for c in cells)
    sources = "\n".join(c.source for c in cells)
    assert "pyplot" not in sources and "imshow" not in sources and "utils.plot_" in sources


def test_notebook_runs_in_a_kernel_keeping_the_inline_backend(trained, tmp_path, monkeypatch):
    nbformat, nbclient = (pytest.importorskip(name) for name in ("nbformat", "nbclient"))
    folder = copy_run(trained, tmp_path)
    monkeypatch.setenv("VAE_CHECKPOINT", str(folder / "best.pt"))  # the kernel inherits these
    monkeypatch.setenv("MNIST_DIR", MNIST_DIR)
    cells = code_cells(nbformat)
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
