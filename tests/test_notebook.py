"""notebooks/explore.ipynb runs top to bottom in a real Jupyter kernel; the README's notebook block
runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import MNIST_DIR, ROOT, copy_run, needs_mnist

NOTEBOOK = ROOT / "notebooks" / "explore.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code_cells and all(
        c["outputs"] == [] and c["execution_count"] is None for c in code_cells
    )


@needs_mnist
def test_notebook_runs_in_a_jupyter_kernel_and_prints_numbers_a_reader_can_read(
    trained, tmp_path, monkeypatch
):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    folder = copy_run(trained, tmp_path)
    # the kernel inherits this process's environment
    monkeypatch.setenv("VAE_CHECKPOINT", str(folder / "best.pt"))
    monkeypatch.setenv("MNIST_DIR", MNIST_DIR)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(ROOT / "notebooks")}}
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pictures) == 5  # reconstructions, samples, interpolation, traversal, anomalies
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # which model this is, said
    assert f"{folder / 'best.pt'}: a model trained here, epoch 2 of 2" in text
    assert "epoch 2, best validation loss" in text and "mean score by digit" in text
    scores = [
        line
        for line in text.splitlines()
        if line.strip().startswith(("combined:", "elbo:", "test digits:"))
    ]
    numbers = re.findall(r"-?\d+\.\d+", "\n".join(scores))
    assert (
        len(numbers) >= 25
        and all(len(n.split(".")[1]) == 2 for n in numbers)
        and "-0.00" not in numbers
    )


@needs_mnist
def test_readme_notebook_block_runs(trained, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- notebook:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "models_mnist").mkdir()
    (tmp_path / "models_mnist" / "best.pt").write_bytes((trained.ckpt_dir / "best.pt").read_bytes())
    (tmp_path / "data").symlink_to(Path(MNIST_DIR).resolve())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md notebook block", "exec"), namespace)
    assert namespace["recon"].shape == (8, 1, 28, 28) and namespace["samples"].shape == (
        8,
        1,
        28,
        28,
    )
    assert namespace["scores"].shape == (8,) and not namespace["vae"].training
