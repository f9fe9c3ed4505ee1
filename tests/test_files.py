"""files.py: failed atomic writes, stale temporaries, the lock (odd lock files: test_cli.py)."""

import errno
import os
import re
import subprocess
import sys
from unittest.mock import Mock

import pytest
from helpers import ROOT

import files

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then_full(self, payload, *args, **kwargs):
    """Path.write_bytes / write_text that leaves the temporary half written: the disk is full."""
    os.truncate(self, len(payload) // 2)
    raise FULL


@pytest.mark.parametrize("where", ["os.replace", "pathlib.Path.write_{kind}"])
@pytest.mark.parametrize("kind,payload", [("bytes", b"new" * 99), ("text", "new")])
def test_a_failed_write_keeps_the_old_file_and_says_so(tmp_path, monkeypatch, where, kind, payload):
    path, write = tmp_path / "best.pt", getattr(files, f"write_{kind}_atomic")
    path.write_bytes(b"old\x00\xff")
    fake = Mock(side_effect=FULL) if where == "os.replace" else half_then_full
    monkeypatch.setattr(where.format(kind=kind), fake)
    with pytest.raises(files.UserError) as err:
        write(payload, path)
    assert f"cannot write {path} (" in str(err.value), err.value
    assert "the previous best.pt is untouched. Free some disk space" in str(err.value), err.value
    with pytest.raises(files.UserError, match="nothing was written"):
        write(payload, tmp_path / "new.json")
    assert path.read_bytes() == b"old\x00\xff" and os.listdir(tmp_path) == ["best.pt"]  # no .tmp


def test_an_interrupted_write_leaves_no_temporary_and_a_good_one_replaces(tmp_path, monkeypatch):
    path, plain = tmp_path / "m.json", tmp_path / "plain"
    files.write_text_atomic("old", path)
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr("pathlib.Path.write_text", Mock(side_effect=KeyboardInterrupt))
        files.write_text_atomic("new", path)
    assert os.listdir(tmp_path) == ["m.json"] and path.read_text() == "old"
    files.write_text_atomic("new", path)
    plain.write_text("")  # the modes a plain write gives, not mkstemp's 0600
    assert path.read_text() == "new" and path.stat().st_mode == plain.stat().st_mode
    (tmp_path / "d.json").mkdir()  # a folder in place of the target is named
    with pytest.raises(files.UserError, match="d.json is a folder, not a file"):
        files.write_text_atomic("{}", tmp_path / "d.json")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d.json", "m.json", "plain"]


def test_remove_stale_temporaries_removes_only_those_of_dead_writers(tmp_path):
    dead = int(subprocess.check_output([sys.executable, "-c", "import os; print(os.getpid())"]))
    stale = [f".best.pt.{dead}.k3j_9xq2.tmp", f".m.json.{dead}.abcdefgh.tmp"]
    live = f".last.pt.{os.getpid()}.a1b2c3d4.tmp"
    kept = [live, "best.pt", ".notes.tmp", f".x.{dead}.short.tmp", f"best.pt.{dead}.abcdefgh.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / f".dir.{dead}.abcdefgh.tmp").mkdir()  # not a file: left alone
    assert sorted(files.remove_stale_temporaries(tmp_path)) == sorted(tmp_path / n for n in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + [f".dir.{dead}.abcdefgh.tmp"])


def test_the_lock_refuses_a_second_process_and_goes_with_its_run_or_a_failing_start(tmp_path):
    folder, hold = tmp_path / "ckpt", "with files.lock_folder(sys.argv[1]): print('held'); input()"
    argv = [sys.executable, "-uc", f"import sys, files\n{hold}", str(folder)]
    with subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as holder:
        assert holder.stdout.readline() == b"held\n"
        busy = re.escape(f"{folder} is in use by another run (pid {holder.pid});")
        with pytest.raises(files.UserError, match=busy), files.lock_folder(folder, "run"):
            pass
        holder.communicate(b"\n", timeout=30)  # a line on stdin: the holder's body ends
    assert holder.returncode == 0 and os.listdir(folder) == []
    with pytest.raises(RuntimeError), files.lock_folder(tmp_path / "a" / "b"):
        raise RuntimeError("the run could not start")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt), files.lock_folder(folder):
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
    with pytest.raises(files.UserError, match="best.pt was replaced while it was read"):
        with files.describing(source, seen, tmp_path / "scores.csv"):
            files.write_bytes_atomic(b"epoch 1", source)  # a new version lands as the reader writes
            files.write_text_atomic("{}", tmp_path / "scores.csv")
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "metrics.json"]
