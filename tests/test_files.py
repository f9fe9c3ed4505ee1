"""files.py: atomic writes that fail cleanly, stale temporaries, the folder lock (a lock file that
is not a plain file of its own, and the paths the OS refuses, are refused end to end in
tests/test_cli.py)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest.mock import Mock

import pytest
from helpers import ROOT

import files
from files import UserError

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then_full(self, payload, *args, **kwargs):
    """Path.write_bytes / write_text that writes half the temporary, then finds the disk full."""
    payload = payload.encode() if isinstance(payload, str) else bytes(payload)
    with open(self, "wb") as f:
        f.write(payload[: len(payload) // 2])
    raise FULL


@pytest.mark.parametrize("where", ["replace", "write"])
@pytest.mark.parametrize("payload", [b"new" * 99, "new"], ids=["bytes", "text"])
def test_a_failing_write_keeps_the_previous_file_whole_and_says_so(
    tmp_path, monkeypatch, where, payload
):
    path, writer = tmp_path / "best.pt", files.write_bytes_atomic
    if isinstance(payload, str):
        writer = files.write_text_atomic
    path.write_bytes(b"the previous checkpoint\x00\xff")
    write = Path, "write_bytes" if isinstance(payload, bytes) else "write_text", half_then_full
    monkeypatch.setattr(*(os, "replace", Mock(side_effect=FULL)) if where == "replace" else write)
    with pytest.raises(UserError) as err:
        writer(payload, path)
    assert f"cannot write {path} (" in str(err.value), err.value
    assert "the previous best.pt is untouched. Free some disk space" in str(err.value), err.value
    assert path.read_bytes() == b"the previous checkpoint\x00\xff"  # and no .tmp:
    assert os.listdir(tmp_path) == ["best.pt"]
    with pytest.raises(UserError, match="nothing was written"):
        writer(payload, tmp_path / "new.json")
    assert os.listdir(tmp_path) == ["best.pt"]


def test_an_interrupted_write_leaves_no_temporary_and_a_good_write_replaces_the_file(
    tmp_path, monkeypatch
):
    files.write_text_atomic("old", tmp_path / "m.json")
    monkeypatch.setattr(Path, "write_text", Mock(side_effect=KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        files.write_text_atomic("new", tmp_path / "m.json")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.json"] and (tmp_path / "m.json").read_text() == "old"
    files.write_text_atomic("new", tmp_path / "m.json")
    assert os.listdir(tmp_path) == ["m.json"] and (tmp_path / "m.json").read_text() == "new"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    (tmp_path / "m.json").unlink()
    (tmp_path / "m.json").mkdir()  # a folder in place of the target is named
    with pytest.raises(UserError, match="m.json is a folder, not a file"):
        files.write_text_atomic("{}", tmp_path / "m.json")
    assert os.listdir(tmp_path) == ["m.json"] and os.listdir(tmp_path / "m.json") == []


def test_remove_stale_temporaries_removes_only_those_of_dead_writers(tmp_path):
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    dead = int(ended.stdout)
    stale = [tmp_path / f".best.pt.{dead}.k3j_9xq2.tmp", tmp_path / f".m.json.{dead}.abcdefgh.tmp"]
    live = tmp_path / f".last.pt.{os.getpid()}.a1b2c3d4.tmp"
    names = ("best.pt", ".notes.tmp", f".x.{dead}.short.tmp", f"best.pt.{dead}.abcdefgh.tmp")
    users = [tmp_path / n for n in names]
    for p in [*stale, live, *users]:
        p.write_text("x")
    (tmp_path / f".dir.{dead}.abcdefgh.tmp").mkdir()  # not a file: left alone
    assert sorted(files.remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(
        [live, *users, tmp_path / f".dir.{dead}.abcdefgh.tmp"]
    )


HOLDER = """import sys; sys.path.insert(0, sys.argv[1]); import files
with files.lock_folder(sys.argv[2]):
    print('held', flush=True); sys.stdin.read()"""


def test_the_lock_refuses_a_second_process_and_goes_with_its_run_or_a_failing_start(tmp_path):
    """A second process is refused, naming the holder; the lock file goes when the run ends. A body
    that fails removes the lock file and the folders made for it, not a folder that was there."""
    folder = tmp_path / "ckpt"
    argv = [sys.executable, "-c", HOLDER, str(ROOT), str(folder)]
    holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        busy = f"{folder} is in use by another training run (pid {holder.pid});"
        with pytest.raises(UserError, match=re.escape(busy)):
            with files.lock_folder(folder, "training run"):
                pass
    finally:
        holder.communicate("", timeout=30)  # stdin closed: the holder's body ends
    assert holder.returncode == 0 and os.listdir(folder) == []
    with pytest.raises(RuntimeError):
        with files.lock_folder(tmp_path / "a" / "b"):
            raise RuntimeError("the run could not start")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        with files.lock_folder(folder):
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ckpt", "notes.txt"]


def test_describing_writes_only_while_its_source_is_the_version_read(tmp_path):
    """What evaluate and score do beside a checkpoint that a training run may replace meanwhile."""
    source, written = tmp_path / "best.pt", tmp_path / "metrics.json"
    source.write_text("epoch 6")
    seen = files.identity(source)
    with files.describing(source, seen, written):
        files.write_text_atomic("{}", written)
    assert written.read_text() == "{}"
    written.unlink()
    with pytest.raises(UserError, match="best.pt was replaced while it was read"):
        with files.describing(source, seen, written):
            files.write_bytes_atomic(b"epoch 1", source)  # a new version lands as the reader writes
            files.write_text_atomic("{}", written)
    assert os.listdir(tmp_path) == ["best.pt"]
