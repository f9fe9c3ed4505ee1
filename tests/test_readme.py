"""The README's Python blocks run as they stand, and the run they train ends as `python main.py`
with the same settings ends: bit-identical weights and anomaly reference, the same figures."""

from __future__ import annotations

import ast
import json
import re

import torch
from helpers import MNIST_DIR, ROOT, needs_mnist, run_main
from matplotlib.figure import Figure

import checkpoint

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
