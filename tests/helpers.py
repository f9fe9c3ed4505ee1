"""Shared test helpers: the real-data switch, in-process runs of main.py, and runs in a subprocess."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import main

ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = str(Path(os.environ["MNIST_DIR"]).resolve()) if os.environ.get("MNIST_DIR") else ""  # absolute: some tests change folder
SMALL = dict(latent_dim=8, channels=(8, 16), hidden_dim=0, res_blocks=0, out_conv=0)  # a tiny VAE for unit tests
needs_mnist = pytest.mark.skipif(not MNIST_DIR, reason="set MNIST_DIR to a folder with the four MNIST files to run real-data tests")


def run_main(argv: list) -> tuple[int, str, str]:
    """main.main(argv) in this process: (exit status, stdout, stderr); argparse errors count as their exit status.
    An exception propagates: use run_cli to see what a user would see (a traceback, say)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def start_cli(argv: list, cwd: Path | None = None, **kw) -> subprocess.Popen:
    """`python main.py argv` as a user runs it, in its own process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *map(str, argv)], cwd=cwd or ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **kw)


def run_cli(argv: list, cwd: Path | None = None, timeout: float = 300, **kw) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python main.py argv` in a subprocess."""
    proc = start_cli(argv, cwd, **kw)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    """What a user's mistake must look like: exit status 2 and one line on stderr, no traceback, naming what is wrong."""
    assert code == 2, err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def train_args(folder: Path, epochs: int = 2, subset: int = 2000) -> list[str]:
    """A small, fast training run writing into folder/ckpt and folder/img."""
    return ["--epochs", str(epochs), "--subset", str(subset), "--data-dir", MNIST_DIR, "--checkpoint-dir", str(folder / "ckpt"),
            "--image-dir", str(folder / "img"), "--iwae-k", "5", "--no-progress"]


def resave(ckpt: dict, path: Path) -> None:
    """Write a checkpoint a test has edited, with its checksum renewed (so that the edit, not the checksum, is tested)."""
    import torch

    import checkpoint

    torch.save({k: v for k, v in ckpt.items() if k != "checksum"} | {"checksum": checkpoint.checksum(ckpt)}, path)


def copy_run(trained, folder: Path) -> Path:
    """A private copy of the shared trained run's checkpoint folder, for a test that writes beside the checkpoint."""
    shutil.copytree(trained.ckpt_dir, folder / "ckpt")
    return folder / "ckpt"
