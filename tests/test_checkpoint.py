"""checkpoint.load, the door for files: a run's files come back, older ones load as they ran, the
rest is refused in one line before it runs code or takes memory; under it, files.py's writes."""

import errno
import math
import os
import pickle
import platform
import subprocess
import sys
import zipfile
from dataclasses import asdict, make_dataclass
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
import torchvision
from helpers import ROOT, TINY_ARCHITECTURE, in_a_child, resave, tiny_images, tiny_model

import checkpoint
import config
import files
from checkpoint import CheckpointError
from config import TrainConfig, VAEConfig
from model import VAE, neg_elbo_terms

TINY = VAEConfig(**TINY_ARCHITECTURE)


def refused(path: Path, **kw) -> str:
    """The one-line CheckpointError that loading path raises; it names the file."""
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(path, **kw)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_a_runs_checkpoints_describe_themselves_load_as_they_were_saved_and_trim(trained, tmp_path):
    last = torch.load(trained.ckpt_dir / "last.pt", weights_only=True)
    best = torch.load(trained.ckpt_dir / "best.pt", weights_only=True)
    assert last["format"] == checkpoint.FORMAT == "vae-mnist/3" and len(last["checksum"]) == 64
    given = dict(epochs=2, subset=2000, latent_dim=8, channels=[8, 16], hidden_dim=32, res_blocks=0)
    defaults = dict(lr=1e-3, seed=1, val_size=5000, ema=0.999, binarize=False, exclude_digit=None)
    assert {k: last["config"][k] for k in given | defaults} == given | defaults
    history = last["history"]
    assert [h["epoch"] for h in history] == [1, 2] and last["epoch"] == 2
    assert all(h["val_loss"] == pytest.approx(h["val_bce"] + h["val_kl"]) for h in history)
    assert last["best_val_loss"] == min(h["val_loss"] for h in history) == best["best_val_loss"]
    assert best["history"] == history[: best["epoch"]]
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    assert last["versions"] == versions | {"python": platform.python_version()}
    assert "anomaly_reference" in best and "latent_map" in best and "train_weights" in last  # ema
    held_out = [best["config"] | {"subset": n, "exclude_digit": 3} for n in (None, 2000)]
    said = " ".join(checkpoint.describe("x", best | {"config": c}) for c in held_out)
    for images in ("55,000 training images minus their 3s,", "2,000 training images with no 3s,"):
        assert images in said, said
    ckpt = checkpoint.load(trained.ckpt_dir / "last.pt", resume=True)  # every check --resume makes
    model, stored = checkpoint.load_model(trained.ckpt_dir / "last.pt")
    assert not model.training and stored["checksum"] == ckpt["checksum"] == last["checksum"]
    plain = VAE(**asdict(checkpoint.model_config(stored))).eval()
    z, x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), tiny_images(5)
    with torch.no_grad():
        assert not torch.allclose(model.decode(z), plain.decode(z))  # the weights matter
        plain.load_state_dict(stored["model"])
        torch.testing.assert_close(model.decode(z), plain.decode(z))
        torch.testing.assert_close(model.encode(x), plain.encode(x))
    trimmed = checkpoint.trim(best)  # what use needs; --resume refuses it: the test below
    assert set(trimmed) == {k for k in checkpoint.USE_KEYS if k in best} | {"checksum"}
    assert "anomaly_reference" in trimmed and "optimizer" not in best.keys() & trimmed.keys()
    checkpoint.save(trimmed, tmp_path / "small.pt")
    model, stored = checkpoint.load_model(tmp_path / "small.pt")
    assert all(torch.equal(v, best["model"][k]) for k, v in stored["model"].items())


# two settings added later: one whose old behaviour (none) is not its default, one whose default is
clip = config.setting(1.0, 0.0, 10.0, help="gradient clipping", absent=0.0)
LaterTrain = make_dataclass("LaterTrain", [("clip", float, clip)], bases=(TrainConfig,))
dropout = config.setting(0.0, 0.0, 0.9, help="dropout before z")
LaterVAE = make_dataclass("LaterVAE", [("dropout", float, dropout)], bases=(VAEConfig,))


class LaterNet(VAE):
    def __init__(self, dropout: float = 0.0, **arguments) -> None:
        super().__init__(**arguments)
        self.dropout = dropout


def test_a_file_written_before_a_setting_existed_loads_as_it_ran(monkeypatch, tmp_path, ckpt):
    """The shipped file and one written before two settings existed run as before; later, as set."""
    for name, later in dict(TrainConfig=LaterTrain, VAEConfig=LaterVAE, VAE=LaterNet).items():
        monkeypatch.setattr(checkpoint, name, later)
    monkeypatch.setattr(config, "VAE", LaterNet)
    checkpoint.save(ckpt, tmp_path / "before.pt")
    for path in (checkpoint.SHIPPED, tmp_path / "before.pt"):
        model, stored = checkpoint.load_model(path)
        assert (stored["config"]["clip"], model.dropout) == (0.0, 0.0)
        assert checkpoint.train_config(stored).clip == 0.0
    checkpoint.load(tmp_path / "before.pt", resume=True)
    later = checkpoint.config_dict(LaterTrain(clip=2.0), LaterVAE(dropout=0.5, **TINY_ARCHITECTURE))
    resave(ckpt | {"config": later}, tmp_path / "a.pt")
    model, stored = checkpoint.load_model(tmp_path / "a.pt")
    assert (stored["config"]["clip"], model.dropout) == (2.0, 0.5)


@pytest.fixture
def ckpt() -> dict:
    """A valid checkpoint of a tiny model after one real Adam step (no data set needed)."""
    model, x = tiny_model().train(), tiny_images(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    logits, mu, logvar = model(x, generator=torch.Generator().manual_seed(0))
    sum(neg_elbo_terms(logits, x=x, mu=mu, logvar=logvar)).mean().backward()
    optimizer.step()
    entry = {k: 100.0 for k in checkpoint.HISTORY_KEYS} | {"epoch": 1}
    # two states, not one tensor twice (views of one storage count once in the file)
    rng = {name: torch.Generator().get_state() for name in ("shuffle", "noise")} | {"device": "cpu"}
    settings = checkpoint.config_dict(TrainConfig(epochs=2, precision="fp32", ema=0.0), TINY)
    progress = {"epoch": 1, "best_val_loss": 100.0, "history": [entry], "rng": rng}
    return checkpoint.build(settings, model.state_dict(), optimizer.state_dict(), progress)


def test_pickled_code_is_refused_unread(tmp_path, ckpt):
    """The payload, unpickled, creates a file: any code a hostile checkpoint could run."""
    marker = tmp_path / "ran"
    payload = type("Payload", (), {"__reduce__": lambda self: (open, (str(marker), "w"))})()
    torch.save(ckpt | {"extra": payload}, tmp_path / "evil.pt")
    assert "refused unread" in refused(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        checkpoint.load_model(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)["extra"].close()  # control: it runs
    assert marker.exists()


def test_a_foreign_zip_and_a_changed_tensor_byte_are_refused(tmp_path, ckpt):
    """One tensor byte changed inside a valid zip (its CRC renewed): only the checksum can tell."""
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("hello.txt", "a zip, but not one torch.save wrote")
    assert "not a usable vae-mnist checkpoint" in refused(tmp_path / "other.zip")
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    checkpoint.save(ckpt, good)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            blob = bytearray(src.read(info))
            if info.filename.endswith("/data/0"):
                blob[len(blob) // 2] ^= 0x10
            dst.writestr(info, bytes(blob))
    assert "do not match its checksum" in refused(bad)


# an edit saved with its checksum renewed: where, the new value (or a change), what the refusal says
BIAS = "to_stats.bias"
EDITS = {
    "latent_dim a float": ("config", "latent_dim", 8.0, "latent_dim must be a whole number"),
    "unknown activation": ("config", "activation", "tanh", "activation must be one of"),
    "one channel width": ("config", "channels", [8], "channels must be 2 numbers"),
    "config not a dict": (None, "config", [1, 2], "its config is not a dict of settings"),
    "weight of the wrong shape": ("model", BIAS, lambda t: t[:-1], "do not match the stored"),
    "weight of the wrong dtype": ("model", BIAS, lambda t: t.double(), "do not match the stored"),
    "weight renamed": ("model", BIAS, None, "do not match"),
    "NaN weight": ("model", BIAS, lambda t: torch.full_like(t, math.nan), "NaN or infinite"),
    "malformed history": ("history", 0, lambda h: h | {"val_loss": "low"}, "history is not a"),
    "older format": (None, "format", "vae-mnist/2", "'vae-mnist/2', but this code reads 'vae-"),
}


@pytest.mark.parametrize("part,key,value,words", EDITS.values(), ids=EDITS)
def test_a_bad_value_with_a_renewed_checksum_is_refused(tmp_path, ckpt, part, key, value, words):
    where = ckpt if part is None else ckpt[part]
    if value is None:
        where["extra"] = where.pop(key)
    else:
        where[key] = value(where[key]) if callable(value) else value
    resave(ckpt, tmp_path / "edited.pt")
    message = refused(tmp_path / "edited.pt")
    assert words in message and "checksum" not in message and "train a new one" in message, message


def test_a_training_state_is_checked_only_for_resume(tmp_path, ckpt):
    """Adam's moments of a wrong shape, or no training state at all, matter only to --resume."""
    checkpoint.save(ckpt, tmp_path / "good.pt")  # the control for this file's refusals
    assert checkpoint.load(tmp_path / "good.pt", resume=True)["checksum"] == ckpt["checksum"]
    resave(ckpt | {"epoch": -3}, tmp_path / "epoch.pt")
    assert "epoch -3 is out of range" in refused(tmp_path / "epoch.pt", resume=True)
    ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(1)
    resave(ckpt, tmp_path / "optimizer.pt")
    checkpoint.load_model(tmp_path / "optimizer.pt")
    assert "optimizer state is not Adam's state" in refused(tmp_path / "optimizer.pt", resume=True)
    shipped_like = checkpoint.trim(ckpt | {"config": ckpt["config"] | {"ema": 0.999}})
    resave(shipped_like, tmp_path / "weights.pt")
    checkpoint.load_model(tmp_path / "weights.pt")
    message = refused(tmp_path / "weights.pt", resume=True)
    assert "no training state (optimizer, " in message and "cannot be resumed" in message
    assert "start a new run without --resume" in message, message  # the advice whole, not cut off


def write_archive(path: Path, pickled: bytes, deflated: int = 0) -> None:
    """A zip as torch.save lays one out; `deflated` zero bytes compressed (torch.save never is)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, blob in {"data.pkl": pickled, "byteorder": b"little", "version": b"3\n"}.items():
            archive.writestr(f"archive/{name}", blob, compress_type=zipfile.ZIP_STORED)
        if deflated:
            with archive.open("archive/data/0", "w") as storage:  # compressed as it is written
                for _ in range(deflated >> 24):
                    storage.write(bytes(1 << 24))


def hostile(kind: str, path: Path) -> Path:
    """Each takes gigabytes if read naively (made contiguous to hash, inflated, unpickled)."""
    shape = {"format": checkpoint.FORMAT}
    if kind == "expanded view":  # about 1 kB: one float, viewed as 750 M of them (3 GB)
        torch.save(shape | {"model": {"w": torch.zeros(1).expand(750_000_000)}}, path)
    elif kind == "many views":  # 1 MB stored, 4,000 views of all of it (4 GB)
        stored = torch.zeros(250_000)
        torch.save(shape | {"model": {f"w{i}": stored[:] for i in range(4000)}}, path)
    elif kind == "deflated":  # 3 MB inflating to 640 MB, under MAX_BYTES: only compression tells
        write_archive(path, pickle.dumps(shape), deflated=640 << 20)
    else:  # a 30 MB pickle of 30 M empty lists: about 2 GB of Python objects
        write_archive(path, b"\x80\x02](" + b"]" * 30_000_000 + b"e.")
    return path


# each file in two of the commands, each command with two of the files; what the refusal must say
HOSTILE = {
    "expanded view": (["evaluate", "--resume"], "its tensors claim 3,000,000,000 bytes"),
    "many views": (["sample", "demo"], "its tensors claim 4,000,000,000 bytes"),
    "deflated": (["demo", "evaluate"], "compressed records"),
    "huge pickle": (["--resume", "sample"], "pickle"),  # its structure is too large, not its 30 MB
}


def test_a_hostile_size_is_refused_in_one_line_with_little_memory(tmp_path):
    files = {kind: hostile(kind, tmp_path / f"{kind}.pt") for kind in HOSTILE}
    cases = [(kind, command, files[kind]) for kind in HOSTILE for command in HOSTILE[kind][0]]
    argv = {  # in tmp_path; demo reads no data and writes no picture, sample reads no data
        "evaluate": "evaluate --image-dir img --data-dir data --checkpoint",
        "--resume": "--image-dir img --data-dir data --resume",
        "sample": "sample --image-dir img --checkpoint",
        "demo": "demo --port 0 --checkpoint",
    }
    argvs = [argv[command].split() + [path] for _, command, path in cases]  # in one fresh process
    results = in_a_child(argvs, tmp_path)
    for (kind, command, path), (code, _, err, peak) in zip(cases, results, strict=True):
        print(f"{kind} ({path.stat().st_size:,} bytes) in {command}: peak {peak / 2**20:,.0f} MiB")
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
        assert HOSTILE[kind][1] in err and peak < 1.5 * 2**30, (err, peak)
    assert sorted(tmp_path.iterdir()) == sorted(files.values())  # nothing written


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
        busy = f"{folder} is in use by another run (pid {holder.pid}); wait for it to finish or "
        for flag, fix in ((None, "choose another folder"), ("--dir", "pass another --dir")):
            with pytest.raises(files.UserError) as caught, files.lock_folder(folder, "run", flag):
                pass
            assert str(caught.value) == busy + fix
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
