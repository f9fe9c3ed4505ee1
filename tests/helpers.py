"""Shared test helpers: the real-data switch, a tiny model and tiny data, and runs of main.py in this process or,
as a user runs it, in a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from model import VAE, VAEConfig

ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = str(Path(os.environ["MNIST_DIR"]).resolve()) if os.environ.get("MNIST_DIR") else ""  # absolute
needs_mnist = pytest.mark.skipif(not MNIST_DIR, reason="set MNIST_DIR to a folder with the four MNIST files")
# A small architecture for end-to-end runs: the commands' behaviour is the same, and a run is several times faster.
SMALL_FLAGS = ["--latent-dim", "8", "--channels", "8", "16", "--hidden-dim", "32", "--res-blocks", "0"]


def tiny_model(seed: int = 0, **overrides) -> VAE:
    """A small VAE for unit tests (seeded weights; overrides change its VAEConfig)."""
    torch.manual_seed(seed)
    settings = dict(latent_dim=8, channels=(8, 16), hidden_dim=32, res_blocks=0, out_conv=0) | overrides
    return VAE(VAEConfig(**settings)).eval()


def tiny_images(n: int, seed: int = 0) -> torch.Tensor:
    """n float images (n, 1, 28, 28) in [0, 1] that look a little like digits: a bright ring or bar, placed at random."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = 10 + 8 * torch.rand(n, 2, 1, 1, generator=gen)
    radius = 3 + 5 * torch.rand(n, 1, 1, generator=gen)
    dist = ((ys - centre[:, 0]) ** 2 + (xs - centre[:, 1]) ** 2).sqrt()
    ring = (1.5 - (dist - radius).abs()).clamp(0, 1)
    bar = ((1.5 - (xs - centre[:, 1]).abs()).clamp(0, 1) * (ys - 14).abs().lt(9)).float()
    pick = torch.rand(n, 1, 1, generator=gen) < 0.5
    return torch.where(pick, ring, bar)[:, None]


def run_main(argv: list) -> tuple[int, str, str]:
    """main.main(argv) in this process: (exit status, stdout, stderr); argparse errors count as their exit status.
    An exception propagates: use run_cli to see what a user would see."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def start_cli(argv: list, cwd: Path | None = None, **kw) -> subprocess.Popen:
    """`python main.py argv` as a user runs it, in its own process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1") | kw.pop("env", {})
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *map(str, argv)],
        cwd=cwd or ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        **kw,
    )


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
    """A small, fast training run of the small architecture, writing into folder/ckpt and folder/img."""
    return [
        "--epochs",
        str(epochs),
        "--subset",
        str(subset),
        "--data-dir",
        MNIST_DIR,
        "--checkpoint-dir",
        str(folder / "ckpt"),
        "--image-dir",
        str(folder / "img"),
        "--iwae-k",
        "2",
        "--no-progress",
        *SMALL_FLAGS,
    ]


def resave(ckpt: dict, path: Path) -> None:
    """Write a checkpoint a test has edited, with its checksum renewed (so that the edit, not the checksum, is tested)."""
    import checkpoint

    torch.save(checkpoint.with_keys(ckpt), path)


def copy_run(trained, folder: Path) -> Path:
    """A private copy of the shared trained run's checkpoint folder, for a test that writes beside the checkpoint."""
    shutil.copytree(trained.ckpt_dir, folder / "ckpt")
    return folder / "ckpt"
