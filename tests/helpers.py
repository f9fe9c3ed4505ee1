"""Shared test helpers: the real-data switch, a tiny model and tiny data, pictures and folders, and
runs of main.py in this process or, as a user runs it, in a subprocess."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import checkpoint
import commands
import main
import mnist_files
from model import VAE

ROOT = Path(__file__).resolve().parent.parent
# absolute
MNIST_DIR = str(Path(os.environ["MNIST_DIR"]).resolve()) if os.environ.get("MNIST_DIR") else ""
needs_mnist = pytest.mark.skipif(
    not MNIST_DIR, reason="set MNIST_DIR to a folder with the four MNIST files"
)
# A small architecture for end-to-end runs: the commands' behaviour is the same, and a run is
# several times faster.
SMALL_FLAGS = [
    "--latent-dim",
    "8",
    "--channels",
    "8",
    "16",
    "--hidden-dim",
    "32",
    "--res-blocks",
    "0",
]


# the small network of unit tests
TINY_ARCHITECTURE = dict(latent_dim=8, channels=(8, 16), hidden_dim=32, res_blocks=0, out_conv=0)


def tiny_model(seed: int = 0, **overrides) -> VAE:
    """A small VAE for unit tests (seeded weights; overrides change its arguments)."""
    torch.manual_seed(seed)
    return VAE(**TINY_ARCHITECTURE | overrides).eval()


def tiny_images(n: int, seed: int = 0) -> torch.Tensor:
    """n float images (n, 1, 28, 28) in [0, 1] a little like digits: a bright ring or bar, placed at
    random."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = 10 + 8 * torch.rand(n, 2, 1, 1, generator=gen)
    radius = 3 + 5 * torch.rand(n, 1, 1, generator=gen)
    dist = ((ys - centre[:, 0]) ** 2 + (xs - centre[:, 1]) ** 2).sqrt()
    ring = (1.5 - (dist - radius).abs()).clamp(0, 1)
    bar = ((1.5 - (xs - centre[:, 1]).abs()).clamp(0, 1) * (ys - 14).abs().lt(9)).float()
    pick = torch.rand(n, 1, 1, generator=gen) < 0.5
    return torch.where(pick, ring, bar)[:, None]


def digit(path: Path, size=(90, 120), frames: int = 1) -> Path:
    """A picture of a zero, dark on white (several frames of an animated GIF when frames > 1)."""
    images = []
    for i in range(frames):
        img = Image.new("L", size, 255)
        box = (size[0] // 5 + 3 * i, size[1] // 8, 4 * size[0] // 5, 7 * size[1] // 8)
        ImageDraw.Draw(img).ellipse(box, outline=0, width=9)
        images.append(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=frames > 1, append_images=images[1:])
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path: equal snapshots mean nothing was written, changed
    or removed."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def unreadable_data(folder: Path) -> Path:
    """A --data-dir holding the four MNIST names as empty files: reading them is an error, and
    nothing is downloaded. A check that passes only before the data is read shows its own message
    instead."""
    folder.mkdir(parents=True)
    for name in mnist_files.MNIST_FILES:
        (folder / name).write_bytes(b"")
    return folder


def run_main(argv: list, cwd: Path | None = None) -> tuple[int, str, str]:
    """main.main(argv) in this process, in folder cwd if given: (exit status, stdout, stderr);
    argparse errors count as their exit status. An exception propagates: run_cli shows what a user
    would see."""
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            os.chdir(cwd or here)
            code = main.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
        finally:
            os.chdir(here)
    return code, out.getvalue(), err.getvalue()


def start_cli(argv: list, cwd: Path | None = None, **kw) -> subprocess.Popen:
    """`python main.py argv` as a user runs it, in its own process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1") | kw.pop("env", {})
    argv = [sys.executable, str(ROOT / "main.py"), *map(str, argv)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    return subprocess.Popen(argv, cwd=cwd or ROOT, env=env, text=True, **pipes, **kw)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a started process; one still running after `timeout` (a
    hang) fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s, killed\nstdout: {out}\nstderr: {err}")
    return proc.returncode, out, err


def run_cli(
    argv: list, cwd: Path | None = None, timeout: float = 180, **kw
) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python main.py argv` in a subprocess; a hang fails."""
    return finish(start_cli(argv, cwd, **kw), timeout)


def read_until(proc: subprocess.Popen, text: str, stream=None) -> str:
    """Read a started process's stdout (or `stream`) until a line holds text; if none does, kill it
    and fail."""
    seen = []
    for line in stream or proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    pytest.fail(f"{text!r} never printed\n{''.join(seen)}{proc.stderr.read()}")


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    """What a user's mistake must look like: exit status 2, one line on stderr naming what is wrong,
    no traceback."""
    assert code == 2, err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def train_args(folder: Path, epochs: int = 2, subset: int = 2000) -> list[str]:
    """A small, fast training run of the small architecture, writing into folder/ckpt and
    folder/img."""
    out = [
        "--checkpoint-dir",
        folder / "ckpt",
        "--image-dir",
        folder / "img",
        "--iwae-k",
        "2",
        "--no-progress",
    ]
    return [
        str(a)
        for a in [
            "--epochs",
            epochs,
            "--subset",
            subset,
            "--data-dir",
            MNIST_DIR,
            *out,
            *SMALL_FLAGS,
        ]
    ]


def resave(ckpt: dict, path: Path) -> None:
    """Write a checkpoint a test has edited, its checksum renewed (so that the edit, not the
    checksum, is tested)."""
    torch.save(checkpoint.with_keys(ckpt), path)


def copy_run(trained, folder: Path) -> Path:
    """A private copy of the shared trained run's checkpoint folder, for a test that writes beside
    the checkpoint."""
    shutil.copytree(trained.ckpt_dir, folder / "ckpt")
    return folder / "ckpt"


def first_test_images(monkeypatch, n: int = 500) -> None:
    """Commands run in this process read only the first n images of each MNIST set: for a test of
    where a command writes or what it says, not of the figures over the whole test set (those are
    checked on all 10,000)."""
    full = commands.load_data

    def first(data_dir: str, **kwargs) -> dict:
        return {k: v[:n] for k, v in full(data_dir, **kwargs).items()}

    monkeypatch.setattr(commands, "load_data", first)


# a child that runs main.main for each argv read as JSON and prints each (code, out, err)
DRIVER = """import json, sys
sys.path[:0] = sys.argv[1:]
import helpers
print(json.dumps([helpers.run_main(argv) for argv in json.load(sys.stdin)]))"""


def without_root_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that mode bits bind root."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def as_a_plain_user(argvs: list[list[str]], cwd: Path) -> list[tuple[int, str, str]]:
    """main.main(argv) for each argv in one child that folders' permissions bind (as root too)."""
    kw = {"preexec_fn": without_root_override} if os.geteuid() == 0 else {}
    try:
        child = subprocess.run(
            [sys.executable, "-c", DRIVER, str(ROOT), str(ROOT / "tests")],
            input=json.dumps([[str(a) for a in argv] for argv in argvs]),
            capture_output=True, text=True, cwd=cwd, timeout=120, **kw,
        )  # fmt: skip
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's override capability here ({exc})")
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


def redirected(fd: int, target: str | None):
    """preexec_fn: the child's descriptor fd closed (target None, as `>&-` does) or onto target."""

    def redirect() -> None:
        if target is None:
            os.close(fd)
        else:
            os.dup2(os.open(target, os.O_WRONLY), fd)

    return redirect
