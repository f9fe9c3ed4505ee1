"""Shared test helpers: the real-data switch and in-process runs of main.py."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

import main

ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = str(Path(os.environ["MNIST_DIR"]).resolve()) if os.environ.get("MNIST_DIR") else ""  # absolute: some tests change folder
needs_mnist = pytest.mark.skipif(not MNIST_DIR, reason="set MNIST_DIR to a folder with the four MNIST files to run real-data tests")


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main.main(argv) in this process: (exit status, stdout, stderr); argparse errors count as their exit status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def train_args(folder: Path, epochs: int = 2, subset: int = 2000) -> list[str]:
    """A small, fast training run writing into folder/ckpt and folder/img."""
    return ["--epochs", str(epochs), "--subset", str(subset), "--data-dir", MNIST_DIR, "--checkpoint-dir", str(folder / "ckpt"),
            "--image-dir", str(folder / "img"), "--iwae-k", "5", "--no-progress", "--no-compile"]
