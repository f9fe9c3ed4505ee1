"""Shared test helpers: real data and a small trained run, a tiny model and images, pictures,
folders, runs of main.py. In-process torch keeps to one thread: tiny tensors run fastest so."""

import ctypes
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import chdir, redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import checkpoint
import commands
import main
import mnist_files
from model import VAE

ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = str(Path(os.environ["MNIST_DIR"]).resolve()) if os.environ.get("MNIST_DIR") else ""
needs_mnist = pytest.mark.skipif(not MNIST_DIR, reason="set MNIST_DIR to the four MNIST files")
# A small architecture for end-to-end runs: the commands behave the same, several times faster.
SMALL_FLAGS = "--latent-dim 8 --channels 8 16 --hidden-dim 32 --res-blocks 0".split()
TINY_ARCHITECTURE = dict(latent_dim=8, channels=(8, 16), hidden_dim=32, res_blocks=0, out_conv=0)
torch.set_num_threads(1)


def tiny_model(seed: int = 0, **overrides) -> VAE:
    """A small VAE for unit tests (seeded weights; overrides change its arguments)."""
    torch.manual_seed(seed)
    return VAE(**TINY_ARCHITECTURE | overrides).eval()


def tiny_images(n: int, seed: int = 0) -> torch.Tensor:
    """n images (n, 1, 28, 28) in [0, 1] a little like digits: a ring or bar, placed at random."""
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
    images = [Image.new("L", size, 255) for _ in range(frames)]
    for i, img in enumerate(images):
        box = (size[0] // 5 + 3 * i, size[1] // 8, 4 * size[0] // 5, 7 * size[1] // 8)
        ImageDraw.Draw(img).ellipse(box, outline=0, width=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=frames > 1, append_images=images[1:])
    return path


def assert_real_picture(path: Path, height: int = 200) -> None:
    """A valid PNG over 200 pixels wide and over `height` high, not one flat colour."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > height, img.size
        assert np.asarray(img.convert("L"), dtype=np.float32).std() > 10, f"{path} looks blank"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder by relative path: equal snapshots mean nothing was written."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def unreadable_data(folder: Path) -> Path:
    """A --data-dir of the four MNIST names as empty files: reading fails, and nothing downloads."""
    folder.mkdir(parents=True)
    for name in mnist_files.MNIST_FILES:
        (folder / name).write_bytes(b"")
    return folder


def run_main(argv: list, cwd: Path | None = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of main.main(argv) run here, in folder cwd if given."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), chdir(cwd or os.getcwd()):
        try:
            code = main.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's errors; any other exception propagates
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def start_cli(argv: list, cwd: Path | None = None, **kw) -> subprocess.Popen:
    """`python main.py argv` as a user runs it, in its own process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1") | kw.pop("env", {})
    argv = [sys.executable, str(ROOT / "main.py"), *map(str, argv)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    return subprocess.Popen(argv, cwd=cwd or ROOT, env=env, text=True, **pipes, **kw)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a started process; one still running after timeout fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running after {timeout} s, killed; out, err: {proc.communicate()}")
    return proc.returncode, out, err


def run_cli(argv: list, cwd: Path | None = None, timeout: float = 180, **kw):
    """(exit status, stdout, stderr) of `python main.py argv` in a subprocess; a hang fails."""
    return finish(start_cli(argv, cwd, **kw), timeout)


def read_until(proc: subprocess.Popen, text: str, stream=None) -> str:
    """Read proc's stdout (or stream) up to a line holding text; if none does, kill it and fail."""
    seen = []
    for line in stream or proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    pytest.fail(f"{text!r} never printed\n{''.join(seen)}{proc.stderr.read()}")


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    """A user's mistake: exit status 2, one line on stderr naming each word, no traceback."""
    assert code == 2 and err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    assert [word for word in words if word not in err] == [], err


def train_args(folder: Path, epochs: int = 2, subset: int = 2000) -> list[str]:
    """A small, fast run of the small architecture, writing into folder/ckpt and folder/img."""
    argv = ["--epochs", epochs, "--subset", subset, "--data-dir", MNIST_DIR]
    argv += ["--checkpoint-dir", folder / "ckpt", "--image-dir", folder / "img", "--iwae-k", 2]
    return [str(a) for a in argv + ["--no-progress", *SMALL_FLAGS]]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """2 epochs of a small VAE on 2,000 real images: read only (copy_run copies); needs MNIST."""
    if not MNIST_DIR:
        pytest.skip("set MNIST_DIR to run real-data tests")
    folder = tmp_path_factory.mktemp("trained")
    code, out, err = run_main(train_args(folder, epochs=2))
    assert code == 0, err
    before = snapshot(folder / "ckpt")
    yield SimpleNamespace(ckpt_dir=folder / "ckpt", image_dir=folder / "img", output=out)
    assert snapshot(folder / "ckpt") == before, "a test wrote into the shared run; use copy_run"


def resave(ckpt: dict, path: Path) -> None:
    """Save an edited checkpoint with a new checksum (so the edit, not the checksum, is tested)."""
    torch.save(checkpoint.with_keys(ckpt), path)


def copy_run(trained, folder: Path) -> Path:
    """A private copy of the shared trained run's checkpoint folder, for tests that write there."""
    shutil.copytree(trained.ckpt_dir, folder / "ckpt")
    return folder / "ckpt"


def first_test_images(monkeypatch, n: int = 500) -> None:
    """Commands in this process read the first n images of each set (tests of where they write)."""
    full = commands.load_data

    def first(data_dir: str, **kwargs) -> dict:
        return {k: v[:n] for k, v in full(data_dir, **kwargs).items()}

    monkeypatch.setattr(commands, "load_data", first)


# main.main for each argv read as JSON, each printed as (code, out, err, peak memory so far) by a
# child that a small parent starts (else it inherits pytest's high-water mark)
PARENT = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:], timeout=120).returncode)"
DRIVER = """import json, resource, sys
sys.path[:0] = sys.argv[1:]
import helpers
for argv in json.load(sys.stdin):
    code, out, err = helpers.run_main(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps([code, out, err, peak]))"""


def in_a_child(argvs: list[list], cwd: Path, **kw) -> list[list]:
    """[code, out, err, peak bytes] of main.main(argv) for each argv, run in one fresh process."""
    python = [sys.executable, "-c"]
    child = [*python, PARENT, *python, DRIVER, str(ROOT), str(ROOT / "tests")]
    argvs_json = json.dumps([[str(a) for a in argv] for argv in argvs])
    done = subprocess.run(child, input=argvs_json, capture_output=True, text=True, cwd=cwd, **kw)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


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
        return [result[:3] for result in in_a_child(argvs, cwd, **kw)]
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's override capability here ({exc})")


def redirected(fd: int, target: str | None):
    """preexec_fn: the child's descriptor fd closed (target None, as `>&-` does) or onto target."""
    if target is None:
        return lambda: os.close(fd)
    return lambda: os.dup2(os.open(target, os.O_WRONLY), fd)
