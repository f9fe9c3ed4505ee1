"""files.py: atomic writes that fail cleanly, stale temporaries, the folder lock (a lock file that
is not a plain file of its own, and the output-folder check, are refused end to end in
tests/test_cli.py)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import Mock

import pytest
from helpers import ROOT

import files
from files import UserError

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# writes half the temporary, then the disk is full
def half_then_full(self, payload, *args, **kwargs):
    payload = payload.encode() if isinstance(payload, str) else bytes(payload)
    with open(self, "wb") as f:
        f.write(payload[: len(payload) // 2])
    raise FULL


@pytest.mark.parametrize("where", ["replace", "write"])
@pytest.mark.parametrize(
    "writer,payload",
    [(files.write_bytes_atomic, b"new" * 99), (files.write_text_atomic, "new")],
    ids=["bytes", "text"],
)
def test_a_failing_write_keeps_the_previous_file_whole_and_says_so(
    tmp_path, monkeypatch, where, writer, payload
):
    path = tmp_path / "best.pt"
    path.write_bytes(b"the previous checkpoint\x00\xff")
    write = Path, "write_bytes" if isinstance(payload, bytes) else "write_text", half_then_full
    monkeypatch.setattr(*(os, "replace", Mock(side_effect=FULL)) if where == "replace" else write)
    with pytest.raises(UserError) as err:
        writer(payload, path)
    message = str(err.value)
    assert (
        str(path) in message
        and "the previous best.pt is untouched" in message
        and "disk space" in message
    )
    # no .tmp
    assert path.read_bytes() == b"the previous checkpoint\x00\xff" and os.listdir(tmp_path) == [
        "best.pt"
    ]
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
    # as a plain write makes it, not 0600
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "m.json").unlink()
    (tmp_path / "m.json").mkdir()  # a folder in place of the target is named
    with pytest.raises(UserError) as err:
        files.write_text_atomic("{}", tmp_path / "m.json")
    assert str(err.value).startswith(f"{tmp_path / 'm.json'} is a folder, not a file")
    assert os.listdir(tmp_path) == ["m.json"] and os.listdir(tmp_path / "m.json") == []


def test_remove_stale_temporaries_removes_only_those_of_dead_writers(tmp_path):
    dead = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
        ).stdout
    )
    stale = [
        tmp_path / f".best.pt.{dead}.k3j_9xq2.tmp",
        tmp_path / f".metrics.json.{dead}.abcdefgh.tmp",
    ]
    live = tmp_path / f".last.pt.{os.getpid()}.a1b2c3d4.tmp"
    users = [
        tmp_path / n
        for n in ("best.pt", ".notes.tmp", f".x.{dead}.short.tmp", f"best.pt.{dead}.abcdefgh.tmp")
    ]
    for p in [*stale, live, *users]:
        p.write_text("x")
    (tmp_path / f".dir.{dead}.abcdefgh.tmp").mkdir()  # not a file: left alone
    assert sorted(files.remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(
        [live, *users, tmp_path / f".dir.{dead}.abcdefgh.tmp"]
    )


HOLDER = "import sys; sys.path.insert(0, sys.argv[1]); import files\nwith files.lock_folder(sys.argv[2]):\n"
HOLDER += "    print('held', flush=True); sys.stdin.read()"


def test_a_second_process_is_refused_naming_the_holder_and_the_lock_file_goes_with_the_run(
    tmp_path,
):
    folder = tmp_path / "ckpt"
    argv = [sys.executable, "-c", HOLDER, str(ROOT), str(folder)]
    holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError) as err:
            with files.lock_folder(folder, "training run"):
                pass
        assert str(err.value).startswith(
            f"{folder} is in use by another training run (pid {holder.pid});"
        )
    finally:
        holder.communicate("", timeout=30)  # stdin closed: the holder's body ends
    # the lock file went when the body ended
    assert holder.returncode == 0 and os.listdir(folder) == []


def test_a_failing_body_removes_the_lock_file_and_the_folders_made_for_it(tmp_path):
    with pytest.raises(RuntimeError):
        with files.lock_folder(tmp_path / "a" / "b"):
            raise RuntimeError("the run could not start")
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        with files.lock_folder(tmp_path / "kept"):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path / "kept") == ["notes.txt"]
