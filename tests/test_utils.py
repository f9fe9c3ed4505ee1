"""Atomic writes under a killed process, what a failed write says, stale temporaries, the folder lock, and the
picture helpers."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import utils
from helpers import ROOT

SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
import utils
folder = sys.argv[1]
i = 0
while True:
    i += 1
    payload = {{"format": "vae-mnist/1", "step": i, "weights": torch.full((3_000_000,), float(i))}}
    utils.save_atomic(payload, folder + "/best.pt")
    utils.save_atomic(payload, folder + "/last.pt")
    print(i, flush=True)
"""


def test_sigkill_while_saving_leaves_complete_checkpoints(tmp_path):
    """A process SIGKILLed at arbitrary instants while saving 12 MB checkpoints: both files always load whole."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=str(ROOT)))
    killed_mid_write = 0
    for trial, delay in enumerate((0.05, 0.13, 0.21, 0.34, 0.47, 0.6)):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # both files written once
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_mid_write += bool(list(folder.glob(".*.tmp")))
        for name in ("best.pt", "last.pt"):
            ckpt = torch.load(folder / name, weights_only=True)
            assert ckpt["format"] == "vae-mnist/1"
            assert ckpt["weights"].shape == (3_000_000,) and bool((ckpt["weights"] == ckpt["step"]).all())
    assert killed_mid_write >= 1, "no kill landed inside a write; the test proved nothing"


def test_write_text_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "metrics.json"
    utils.write_text_atomic(json.dumps({"a": 1}), path)
    utils.write_text_atomic(json.dumps({"b": 2}), path)
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert path.stat().st_mode & 0o044  # readable by others as a plain write would be (umask permitting)


def test_figure_that_fails_to_render_keeps_the_old_picture(tmp_path, monkeypatch):
    images = torch.rand(4, 1, 28, 28)
    path = utils.plot_grid(images, "ok", tmp_path / "samples.png", nrow=2)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("renderer crashed")

    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    try:
        utils.plot_grid(images, "broken", path, nrow=2)
    except RuntimeError:
        pass
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["samples.png"]


def test_reconstruction_rows_are_drawn_from_the_given_images(tmp_path):
    top = torch.zeros(6, 1, 28, 28)
    bottom = torch.ones(6, 1, 28, 28)
    path = utils.plot_reconstructions(top, bottom, tmp_path / "r.png")
    with Image.open(path) as img:
        gray = np.asarray(img.convert("L"), dtype=np.float32)
    assert gray.std() > 30  # black row and white row, not one flat colour


# ----------------------------------------------------------------------------- what a failed write says


def write_error(path, monkeypatch=None, error: OSError | None = None) -> str:
    if error is not None:
        def failing_replace(src, dst):
            raise error

        monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(utils.UserError) as excinfo:
        utils.write_text_atomic("{}", path)
    msg = str(excinfo.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


def test_target_that_is_a_folder(tmp_path):
    (tmp_path / "metrics.json").mkdir()
    msg = write_error(tmp_path / "metrics.json")
    assert msg == f"{tmp_path / 'metrics.json'} is a folder, not a file; move it away or choose another folder"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_replace_onto_a_folder(tmp_path, monkeypatch):
    """A folder that appears while the file is written: os.replace fails with EISDIR."""
    msg = write_error(tmp_path / "best.pt", monkeypatch, IsADirectoryError(errno.EISDIR, "Is a directory"))
    assert "is a folder, not a file" in msg and "disk space" not in msg


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_full_disk(tmp_path, monkeypatch, code):
    (tmp_path / "best.pt").write_text("old")
    msg = write_error(tmp_path / "best.pt", monkeypatch, OSError(code, os.strerror(code)))
    assert os.strerror(code) in msg and "the previous best.pt is untouched" in msg and "Free some disk space" in msg
    assert (tmp_path / "best.pt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_folder_not_writable(tmp_path, monkeypatch, code):
    msg = write_error(tmp_path / "best.pt", monkeypatch, OSError(code, os.strerror(code)))
    assert f"{tmp_path} is not writable" in msg and "nothing was written" in msg and "disk space" not in msg


def test_other_write_errors_keep_their_reason(tmp_path, monkeypatch):
    msg = write_error(tmp_path / "best.pt", monkeypatch, OSError(errno.EIO, "Input/output error"))
    assert "Input/output error" in msg and "disk space" not in msg and "not writable" not in msg


# ----------------------------------------------------------------------------- temporaries of killed writers


def finished_pid() -> int:
    """The pid of a process that has exited (and been reaped), so no process has it now."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_temporary_name_holds_the_writers_pid(tmp_path):
    with utils.atomic_path(tmp_path / "best.pt") as tmp:
        name = os.path.basename(tmp)
        assert name.startswith(f".best.pt.{os.getpid()}.") and name.endswith(".tmp")
        assert utils.remove_stale_temporaries(tmp_path) == []  # its writer, this process, is alive
        with open(tmp, "w") as f:
            f.write("new")
    assert (tmp_path / "best.pt").read_text() == "new"


def test_remove_stale_temporaries(tmp_path):
    dead = finished_pid()
    stale = [tmp_path / f".best.pt.{dead}.k3j_9xq2.tmp", tmp_path / f".metrics.json.{dead}.abcdefgh.tmp"]
    live = tmp_path / f".last.pt.{os.getpid()}.a1b2c3d4.tmp"
    others = [tmp_path / "best.pt", tmp_path / ".notes.tmp", tmp_path / f".x.{dead}.short.tmp", tmp_path / f"best.pt.{dead}.abcdefgh.tmp"]
    for p in stale + others + [live]:
        p.write_text("x")
    (tmp_path / f".dir.{dead}.abcdefgh.tmp").mkdir()  # not a file: left alone
    assert utils.remove_stale_temporaries(tmp_path) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(others + [live, tmp_path / f".dir.{dead}.abcdefgh.tmp"])


# ----------------------------------------------------------------------------- the folder lock


def hold_lock(folder, ready) -> None:
    with utils.lock_folder(folder, "training run"):
        ready.set()
        time.sleep(60)


def test_lock_folder_refuses_a_second_holder_until_the_first_dies(tmp_path):
    folder = tmp_path / "ckpt"
    ctx = multiprocessing.get_context("fork")  # the child shares the imported modules: no second torch import
    ready = ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(folder, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(utils.UserError) as excinfo:
            with utils.lock_folder(folder, "training run"):
                pass
        assert str(excinfo.value) == (f"{folder} is in use by another training run (pid {holder.pid}); "
                                      "wait for it to finish or pass another --checkpoint-dir")
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.join()
    with utils.lock_folder(folder, "training run"):  # the kernel released the dead holder's lock
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n"


def test_lock_folder_is_released_on_exit(tmp_path):
    with utils.lock_folder(tmp_path, "training run"):
        pass
    with utils.lock_folder(tmp_path, "training run"):
        with pytest.raises(utils.UserError):  # held, even against this same process opening it again
            with utils.lock_folder(tmp_path, "training run"):
                pass
