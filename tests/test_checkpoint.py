"""Tests for checkpoint.py: the "vae-mnist/2" file, what loading checks (format, checksum, every value by type and
range), rebuilding the model, and the helpers around it (trim, require_resumable, for_use, restore_generators).

Every checkpoint here is built in memory from a small VAE and one real Adam step, so the file runs in seconds.
"""
from __future__ import annotations

import copy
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import checkpoint
import model
import train
from anomaly import LocalPixelModel
from checkpoint import CheckpointError
from helpers import SMALL
from model import VAE, VAEConfig



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: these tensors are tiny


def fake_images(b: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(b, 1, 28, 28, generator=gen), generator=gen)


def clone_weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def history_entry(epoch: int = 1) -> dict:
    return {k: 1.0 for k in checkpoint.HISTORY_KEYS} | {"epoch": epoch, "train_loss": 101.0, "val_loss": 100.0}


def build_checkpoint(ema: float = 0.999, train_weights: bool = True, seed: int = 0, **arch) -> dict:
    """A valid checkpoint dict after one epoch of one real Adam step. `model` holds the weights before the step (a
    stand-in for the average), `train_weights` (when kept) the weights after it, so the two differ."""
    torch.manual_seed(seed)
    live = VAE(VAEConfig(**(SMALL | arch)))
    average = clone_weights(live)
    optimizer = torch.optim.Adam(live.parameters(), lr=1e-3)
    x = fake_images(4, seed)
    logits, mu, logvar = live(x, generator=torch.Generator().manual_seed(seed))
    bce, kl = model.neg_elbo_terms(logits, x, mu, logvar)
    (bce + kl).mean().backward()
    optimizer.step()
    config = train.TRAIN_DEFAULTS | checkpoint.config_dict(live.config) | {"precision": "fp32", "ema": ema}
    progress = {"epoch": 1, "best_val_loss": 100.0, "history": [history_entry()], "partial": None}
    rng = {"shuffle": torch.Generator().get_state(), "noise": torch.Generator().get_state(), "device": "cpu"}
    return checkpoint.build(config, average, optimizer.state_dict(), progress, rng,
                            train_weights=clone_weights(live) if train_weights else None)


@pytest.fixture(scope="module")
def built() -> dict:
    return build_checkpoint()


@pytest.fixture
def ckpt(built) -> dict:
    """A private deep copy of the module's valid checkpoint, free to edit."""
    return copy.deepcopy(built)


def saved(ckpt: dict, path: Path, renew: bool = True) -> Path:
    """Write `ckpt` to `path`, with its checksum renewed unless renew=False (then as an editor would leave it)."""
    if renew:
        ckpt = {k: v for k, v in ckpt.items() if k != "checksum"}
        ckpt["checksum"] = checkpoint.checksum(ckpt)
    torch.save(ckpt, path)
    return path


def refused(path, load=checkpoint.load) -> str:
    """The one-line CheckpointError (and no other exception type) that loading `path` raises; it names the path."""
    with pytest.raises(Exception) as excinfo:
        load(path)
    assert type(excinfo.value) is CheckpointError, repr(excinfo.value)
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    return msg


def reference(latent_dim: int = SMALL["latent_dim"], std: float = 2.0) -> dict:
    """An anomaly reference shaped like anomaly.fit_reference's (plus the test scores training adds)."""
    gen = torch.Generator().manual_seed(0)
    return {"local_weight": 0.5, "codes": torch.randn(6, latent_dim, generator=gen),
            "local_model": {k: torch.randn(v.shape, generator=gen) for k, v in LocalPixelModel().state_dict().items()},
            "calibration": {name: [10.0, std] for name in ("elbo", "complexity", "knn", "sum")},
            "test_scores": torch.randn(10, generator=gen).sort().values}


def latent_map(latent_dim: int = SMALL["latent_dim"]) -> dict:
    return {"mean": torch.zeros(latent_dim), "axes": torch.zeros(latent_dim, 2), "points": torch.zeros(5, 2), "labels": torch.arange(5)}


def valid_partial(**changes) -> dict:
    return {"step": 3, "seconds": 1.5, "sums": torch.zeros(2, dtype=torch.float64),
            "shuffle_at_start": torch.Generator().get_state()} | changes


# ----------------------------------------------------------------------------- a valid file


def test_round_trip_gives_the_stored_weights_in_eval_mode(tmp_path, ckpt):
    path = tmp_path / "best.pt"
    checkpoint.save(ckpt, path)
    loaded, stored = checkpoint.load_model(path)
    assert isinstance(loaded, VAE) and not loaded.training
    assert loaded.config == VAEConfig(**SMALL) and isinstance(loaded.config.channels, tuple)
    weights = loaded.state_dict()
    assert set(weights) == set(ckpt["model"])
    for name, value in ckpt["model"].items():
        assert torch.equal(weights[name], value), name  # the weights to use, not train_weights
    assert any(not torch.equal(ckpt["model"][k], ckpt["train_weights"][k]) for k in ckpt["model"])
    # channels-last on the CPU (utils.prepare_model), and the same function as a plain model with those weights
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in loaded.parameters() if p.dim() == 4)
    plain = VAE(VAEConfig(**SMALL))
    plain.load_state_dict(ckpt["model"])
    plain.eval()
    x = fake_images(3, seed=1)
    z = torch.randn(3, SMALL["latent_dim"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), plain.decode(z), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.encode(x), plain.encode(x), rtol=1e-5, atol=1e-5)
    # the rest of the file comes back as it was written
    assert stored["format"] == checkpoint.FORMAT and stored["checksum"] == ckpt["checksum"]
    assert stored["epoch"] == 1 and stored["history"] == ckpt["history"] and stored["partial"] is None
    assert checkpoint.model_config(stored, path) == VAEConfig(**SMALL)


def test_stored_optimizer_state_loads_into_adam(tmp_path, ckpt):
    path = tmp_path / "last.pt"
    checkpoint.save(ckpt, path)
    stored = checkpoint.load(path)
    checkpoint.require_resumable(stored, path)
    m = VAE(VAEConfig(**SMALL))
    m.load_state_dict(stored["train_weights"])
    optimizer = torch.optim.Adam(m.parameters(), lr=1e-3)
    optimizer.load_state_dict(stored["optimizer"])
    assert len(optimizer.state) == len(list(m.parameters()))


def test_config_dict_is_plain_values_and_round_trips():
    config = VAEConfig(**SMALL, fc_layers=2, norm="batch")
    plain = checkpoint.config_dict(config)
    assert plain["channels"] == [8, 16] and isinstance(plain["channels"], list)
    assert checkpoint.model_config({"config": plain}) == config


# ----------------------------------------------------------------------------- damaged or edited files


def test_checksum_refuses_an_edited_tensor(tmp_path, ckpt):
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name].clone()
    ckpt["model"][name].view(-1)[0] += 0.25
    edited = saved(ckpt, tmp_path / "edited.pt", renew=False)
    assert "damaged or edited" in refused(edited)
    assert "damaged or edited" in refused(edited, checkpoint.load_model)
    checkpoint.load(saved(ckpt, tmp_path / "renewed.pt"))  # control: the same values with a renewed checksum load


def rewrite_zip(src: Path, dst: Path, flip: bool) -> None:
    """Copy torch.save's zip archive member by member (a valid zip, CRCs recomputed), flipping one bit in the middle
    of the first tensor's bytes when `flip`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        members = [info.filename for info in zin.infolist()]
        assert any(n.endswith("/data/0") for n in members), members
        for info in zin.infolist():
            blob = zin.read(info)
            if flip and info.filename.endswith("/data/0"):
                blob = bytearray(blob)
                blob[len(blob) // 2] ^= 0x10
                blob = bytes(blob)
            zout.writestr(info, blob)


def test_checksum_refuses_a_flipped_bit_inside_tensor_data(tmp_path, ckpt):
    good = tmp_path / "good.pt"
    checkpoint.save(ckpt, good)
    copied, flipped = tmp_path / "copied.pt", tmp_path / "flipped.pt"
    rewrite_zip(good, copied, flip=False)
    checkpoint.load(copied)  # control: the rewritten archive itself is fine
    rewrite_zip(good, flipped, flip=True)
    assert zipfile.ZipFile(flipped).testzip() is None  # still a valid zip: only the checksum can tell
    assert "damaged or edited" in refused(flipped)


def test_flipped_byte_on_disk_is_refused_in_one_line(tmp_path, ckpt):
    """The same damage without repairing the zip's CRC: refused in one line, whichever check notices first."""
    path = tmp_path / "rotten.pt"
    checkpoint.save(ckpt, path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    blob = bytearray(path.read_bytes())
    header_len = 30 + int.from_bytes(blob[info.header_offset + 26 : info.header_offset + 28], "little") \
        + int.from_bytes(blob[info.header_offset + 28 : info.header_offset + 30], "little")
    blob[info.header_offset + header_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(blob))
    refused(path)


def test_folder_is_refused_saying_it_is_a_folder(tmp_path):
    assert "is a folder" in refused(tmp_path)


def test_missing_file(tmp_path):
    assert "no such checkpoint" in refused(tmp_path / "absent.pt")
    refused(tmp_path / "absent.pt", checkpoint.load_model)


def test_truncated_file(tmp_path, ckpt):
    good = tmp_path / "good.pt"
    checkpoint.save(ckpt, good)
    cut = tmp_path / "cut.pt"
    blob = good.read_bytes()
    cut.write_bytes(blob[: len(blob) // 2])
    refused(cut)
    refused(cut, checkpoint.load_model)


def test_text_and_empty_files(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\nsecond line\n")
    assert "not a checkpoint" in refused(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    refused(empty)


def test_no_format(tmp_path, ckpt):
    del ckpt["format"]
    refused(saved(ckpt, tmp_path / "x.pt"))
    bare = tmp_path / "bare.pt"
    torch.save(ckpt["model"]["to_stats.bias"], bare)  # a tensor, not a dict
    refused(bare)


@pytest.mark.parametrize("fmt", ["other/1", "vae-mnist", "vae-mnist/x", "vae-mnist/3", 1])
def test_foreign_format(tmp_path, ckpt, fmt):
    ckpt["format"] = fmt
    msg = refused(saved(ckpt, tmp_path / "x.pt"))
    assert f"format {fmt!r}" in msg, msg


def test_old_format_is_refused_saying_to_train_a_new_one(tmp_path):
    """A "vae-mnist/1" file (before the checksum and the checked values) is refused, not converted."""
    m = VAE(VAEConfig(**SMALL))
    config = checkpoint.config_dict(m.config)
    path = tmp_path / "old.pt"
    torch.save({"format": "vae-mnist/1", "config": config, "model": m.state_dict()}, path)
    for load in (checkpoint.load, checkpoint.load_model):
        msg = refused(path, load)
        assert "'vae-mnist/1'" in msg and "train a new one" in msg


class MakesMarker:
    """Unpickling this object opens (creates) `marker`: stands in for arbitrary code in a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_checkpoint(path: Path, marker: Path) -> None:
    payload = {"format": checkpoint.FORMAT, "config": checkpoint.config_dict(VAEConfig(**SMALL)), "model": {},
               "extra": MakesMarker(marker)}
    torch.save(payload, path)


UNPICKLE_PLAINLY = """
import pickle, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith("data.pkl"))
    obj = pickle.loads(z.read(name))
obj["extra"].close()
"""


def test_pickle_payload_is_real(tmp_path):
    """Control: unpickling the crafted file without weights_only really runs the payload."""
    folder = tmp_path / "control"
    folder.mkdir()
    path, marker = folder / "evil.pt", folder / "marker"
    hostile_checkpoint(path, marker)
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", UNPICKLE_PLAINLY, str(path)], check=True, timeout=60)
    assert marker.exists()


def test_pickle_payload_refused(tmp_path):
    folder = tmp_path / "victim"
    folder.mkdir()
    path, marker = folder / "evil.pt", folder / "marker"
    hostile_checkpoint(path, marker)
    assert "refused" in refused(path)
    assert not marker.exists()
    refused(path, checkpoint.load_model)
    assert not marker.exists()


# ----------------------------------------------------------------------------- every value by type and range


def set_config(key, value):
    return lambda c: c["config"].__setitem__(key, value)


def set_top(key, value):
    return lambda c: c.__setitem__(key, value)


def epoch_beyond(c: dict) -> None:
    n = c["config"]["epochs"] + 1
    c.update(epoch=n, history=[history_entry(i + 1) for i in range(n)])  # history agrees: only the epoch is wrong


# (edit of a valid checkpoint, a word the one-line message must hold: the check that caught it)
BAD_VALUES = {
    "latent_dim_float": (set_config("latent_dim", 32.0), "latent_dim"),
    "latent_dim_bool": (set_config("latent_dim", True), "latent_dim"),
    "latent_dim_missing": (lambda c: c["config"].pop("latent_dim"), "latent_dim"),
    "channels_one_width": (set_config("channels", [8]), "channels"),
    "activation_unknown": (set_config("activation", "tanh"), "activation"),
    "hidden_dim_negative": (set_config("hidden_dim", -1), "hidden_dim"),
    "lr_text": (set_config("lr", "fast"), "lr"),
    "lr_negative": (set_config("lr", -1), "lr"),
    "lr_nan": (set_config("lr", math.nan), "lr"),
    "lr_missing": (lambda c: c["config"].pop("lr"), "lr"),
    "batch_size_0": (set_config("batch_size", 0), "batch_size"),
    "precision_auto": (set_config("precision", "auto"), "precision"),
    "ema_1.5": (set_config("ema", 1.5), "ema"),
    "exclude_digit_11": (set_config("exclude_digit", 11), "exclude_digit"),
    "subset_0": (set_config("subset", 0), "subset"),
    "config_not_dict": (set_top("config", ["latent_dim", 8]), "config"),
    "model_missing": (lambda c: c.pop("model"), "model weights"),
    "model_not_tensors": (lambda c: c["model"].__setitem__("to_stats.bias", [0.0] * 16), "model weights"),
    "train_weights_empty": (set_top("train_weights", {}), "train_weights"),
    "epoch_negative": (set_top("epoch", -3), "epoch -3"),
    "epoch_beyond_config_epochs": (epoch_beyond, "epoch 21"),
    "best_val_loss_text": (set_top("best_val_loss", "x"), "best_val_loss"),
    "best_val_loss_negative": (set_top("best_val_loss", -1.0), "best_val_loss"),
    "history_text": (set_top("history", "none"), "history"),
    "history_missing_key": (lambda c: c["history"][0].pop("val_kl"), "history"),
    "history_length_not_epoch": (lambda c: c["history"].append(history_entry(2)), "one entry per completed epoch"),
    "optimizer_empty_dict": (set_top("optimizer", {}), "optimizer"),
    "optimizer_empty_state_after_steps": (lambda c: c["optimizer"]["state"].clear(), "optimizer state is empty"),
    "rng_missing_shuffle": (lambda c: c["rng"].pop("shuffle"), "random-generator"),
    "partial_step_0": (set_top("partial", {"step": 0}), "partial"),
    "partial_step_0_otherwise_valid": (set_top("partial", valid_partial(step=0)), "partial"),
    "partial_bad_sums_shape": (set_top("partial", valid_partial(sums=torch.zeros(3, dtype=torch.float64))), "partial"),
    "reference_codes_wrong_latent_size": (set_top("anomaly_reference", reference(latent_dim=7)), "anomaly reference"),
    "reference_calibration_std_0": (set_top("anomaly_reference", reference(std=0.0)), "anomaly reference"),
    "reference_local_model_wrong_shape": (set_top("anomaly_reference", reference() | {"local_model": {"weight": torch.zeros(4, 3)}}), "anomaly reference"),
    "reference_latent_map_wrong_size": (set_top("anomaly_reference", reference() | {"latent_map": latent_map(latent_dim=7)}), "anomaly reference"),
    "architecture_too_large": (lambda c: c["config"].update(hidden_dim=16384, fc_layers=16, channels=[1024, 1024]), "more than 50,000,000 weights"),
    "model_weight_wrong_shape": (lambda c: c["model"].__setitem__("to_stats.bias", torch.zeros(3)), "do not match the stored architecture"),
    "model_weight_renamed": (lambda c: c["model"].__setitem__("extra.weight", torch.zeros(3)), "do not match the stored architecture"),
    "model_weight_nan": (lambda c: c["model"]["to_stats.bias"].fill_(math.nan), "NaN"),
    "optimizer_moment_wrong_shape": (lambda c: c["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(1)), "optimizer"),
    "rng_noise_not_bytes": (lambda c: c["rng"].__setitem__("noise", torch.zeros(3)), "random-generator"),
}



@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_is_a_one_line_error(tmp_path, ckpt, case):
    edit, word = BAD_VALUES[case]
    edit(ckpt)
    path = saved(ckpt, tmp_path / f"{case}.pt")  # re-checksummed: the value check must catch it, not the checksum
    msg = refused(path)
    assert "checksum" not in msg, msg
    assert word in msg, msg
    refused(path, checkpoint.load_model)


# Edits that leave a valid checkpoint: the checks above must not be broader than the values training writes.
GOOD_VALUES = {
    "unchanged": lambda c: None,
    "precision_bf16": set_config("precision", "bf16"),
    "exclude_digit_0": set_config("exclude_digit", 0),
    "exclude_digit_9": set_config("exclude_digit", 9),
    "subset_100": set_config("subset", 100),
    "ema_0": set_config("ema", 0.0),
    "lr_schedule_cosine": set_config("lr_schedule", "cosine"),
    "epoch_equals_config_epochs": lambda c: c.update(epoch=c["config"]["epochs"],
                                                     history=[history_entry(i + 1) for i in range(c["config"]["epochs"])]),
    "interrupted_epoch": set_top("partial", valid_partial()),
    "anomaly_reference": set_top("anomaly_reference", reference()),
    "reference_without_test_scores": set_top("anomaly_reference", reference() | {"test_scores": None}),
    "reference_with_latent_map": set_top("anomaly_reference", reference() | {"latent_map": latent_map()}),
}


@pytest.mark.parametrize("case", list(GOOD_VALUES))
def test_good_value_loads(tmp_path, ckpt, case):
    GOOD_VALUES[case](ckpt)
    path = saved(ckpt, tmp_path / f"{case}.pt")
    checkpoint.load(path)
    checkpoint.load_model(path)


def test_batch_norm_buffers_need_no_optimizer_state(tmp_path):
    """BatchNorm's running statistics are in the weights but have no Adam state: still a complete optimizer state."""
    ckpt = build_checkpoint(norm="batch")
    assert any(k.endswith("running_mean") for k in ckpt["model"])
    path = tmp_path / "bn.pt"
    checkpoint.save(ckpt, path)
    loaded, _ = checkpoint.load_model(path)
    assert any(isinstance(layer, torch.nn.BatchNorm2d) for layer in loaded.modules())


def test_weights_that_do_not_match_the_config(tmp_path, ckpt):
    torch.manual_seed(0)
    ckpt["model"] = VAE(VAEConfig(**(SMALL | {"latent_dim": 4}))).state_dict()
    path = saved(ckpt, tmp_path / "mismatch.pt")
    assert "do not match" in refused(path, checkpoint.load_model)


def test_with_anomaly_reference_renews_the_checksum(tmp_path, ckpt):
    with_ref = checkpoint.with_anomaly_reference(ckpt, reference())
    assert "anomaly_reference" not in ckpt and with_ref["checksum"] != ckpt["checksum"]
    path = tmp_path / "best.pt"
    checkpoint.save(with_ref, path)
    assert torch.equal(checkpoint.load(path)["anomaly_reference"]["codes"], reference()["codes"])


# ----------------------------------------------------------------------------- resuming, trimming, the shipped file


def test_require_resumable(tmp_path, ckpt):
    path = tmp_path / "last.pt"
    checkpoint.require_resumable(ckpt, path)  # the full training state: fine
    weights_only = {k: ckpt[k] for k in ("format", "config", "model")}
    weights_only["checksum"] = checkpoint.checksum(weights_only)
    checkpoint.load(saved(weights_only, path))  # a usable file ...
    with pytest.raises(CheckpointError) as excinfo:  # ... that cannot be resumed
        checkpoint.require_resumable(checkpoint.load(path), path)
    msg = str(excinfo.value)
    assert str(path) in msg and "\n" not in msg and "optimizer" in msg and "resume" in msg, msg


def test_require_resumable_needs_train_weights_with_ema(tmp_path):
    path = tmp_path / "last.pt"
    no_live = build_checkpoint(ema=0.999, train_weights=False)
    checkpoint.save(no_live, path)
    with pytest.raises(CheckpointError) as excinfo:
        checkpoint.require_resumable(checkpoint.load(path), path)
    msg = str(excinfo.value)
    assert str(path) in msg and "\n" not in msg and "train_weights" in msg, msg
    without_ema = build_checkpoint(ema=0.0, train_weights=False)  # no average: the weights are the live ones
    checkpoint.save(without_ema, path)
    checkpoint.require_resumable(checkpoint.load(path), path)


def test_trim_keeps_what_use_needs(tmp_path, ckpt):
    ckpt = checkpoint.with_anomaly_reference(ckpt, reference())
    trimmed = checkpoint.trim(ckpt)
    assert set(trimmed) <= set(checkpoint.USE_KEYS)
    assert {"format", "checksum", "config", "model", "history", "anomaly_reference", "versions"} <= set(trimmed)
    assert not {"optimizer", "train_weights", "rng", "partial"} & set(trimmed)
    assert trimmed["checksum"] == checkpoint.checksum(trimmed) != ckpt["checksum"]
    path = tmp_path / "vae-mnist.pt"
    checkpoint.save(trimmed, path)
    full = tmp_path / "full.pt"
    checkpoint.save(ckpt, full)
    assert path.stat().st_size < full.stat().st_size
    loaded, stored = checkpoint.load_model(path)
    assert "optimizer" not in stored
    for name, value in ckpt["model"].items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(CheckpointError):
        checkpoint.require_resumable(stored, path)


@pytest.fixture
def shipped(tmp_path, monkeypatch, built) -> Path:
    path = tmp_path / "pretrained" / "vae-mnist.pt"
    path.parent.mkdir()
    checkpoint.save(checkpoint.trim(built), path)
    monkeypatch.setattr(checkpoint, "SHIPPED", path)
    return path


def test_for_use_falls_back_to_shipped_only_for_a_missing_default(tmp_path, shipped, built, capsys):
    default = tmp_path / "models_mnist" / "best.pt"
    assert checkpoint.for_use(default, default) == shipped
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and str(default) in out and "shipped" in out, out
    checkpoint.load_model(checkpoint.for_use(str(default), str(default)))  # str or Path alike; the result loads
    capsys.readouterr()

    other = tmp_path / "elsewhere.pt"  # a path the user chose is never swapped
    assert checkpoint.for_use(other, default) == other
    default.parent.mkdir()
    checkpoint.save(built, default)  # a trained file wins
    assert checkpoint.for_use(default, default) == default
    assert capsys.readouterr().out == ""


def test_for_use_without_shipped_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "SHIPPED", tmp_path / "absent" / "vae-mnist.pt")
    default = tmp_path / "best.pt"
    assert checkpoint.for_use(default, default) == default
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- generators


def test_restore_generators():
    shuffle, noise = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    torch.rand(3, generator=shuffle), torch.rand(7, generator=noise)
    rng = {"shuffle": shuffle.get_state(), "noise": noise.get_state(), "device": "cpu"}
    expected = torch.rand(4, generator=shuffle), torch.rand(4, generator=noise)
    gens = {"shuffle": torch.Generator(), "noise": torch.Generator()}
    assert checkpoint.restore_generators(rng, gens, device_type="cpu", seed=1, steps_done=10) == []
    assert torch.equal(torch.rand(4, generator=gens["shuffle"]), expected[0])
    assert torch.equal(torch.rand(4, generator=gens["noise"]), expected[1])

    # a noise state from another kind of device is re-seeded from the seed and the step count; the shuffle state is kept
    gens = {"shuffle": torch.Generator(), "noise": torch.Generator()}
    cuda_rng = rng | {"noise": torch.arange(16, dtype=torch.uint8), "device": "cuda"}
    assert checkpoint.restore_generators(cuda_rng, gens, device_type="cpu", seed=1, steps_done=10) == ["noise"]
    assert torch.equal(torch.rand(4, generator=gens["noise"]), torch.rand(4, generator=torch.Generator().manual_seed(1 + 1 + 20)))
    assert torch.equal(torch.rand(4, generator=gens["shuffle"]), expected[0])

    # a state of the wrong size from the same kind of device is damage, not a move: refused
    with pytest.raises(CheckpointError, match="noise generator state is unusable"):
        checkpoint.restore_generators(cuda_rng | {"device": "cpu"}, {"shuffle": torch.Generator(), "noise": torch.Generator()},
                                      device_type="cpu", seed=1, steps_done=0)


# ----------------------------------------------------------------------------- malformed training state
# Each of these files has values of the right kinds in the wrong places: without its check it would load, and fail
# later (a traceback on --resume) or crash load itself.


def shifted_optimizer_state(c: dict) -> None:
    c["optimizer"]["state"] = {i + 1000: v for i, v in c["optimizer"]["state"].items()}  # right count, no parameter's id


MALFORMED = {
    "optimizer_state_for_no_parameter": shifted_optimizer_state,
    "optimizer_param_groups_not_dicts": lambda c: c["optimizer"].__setitem__("param_groups", [1]),
    "partial_shuffle_at_start_not_bytes": set_top("partial", valid_partial(shuffle_at_start=torch.zeros(3))),
    "partial_sums_not_float": set_top("partial", valid_partial(sums=torch.zeros(2, dtype=torch.int64))),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_training_state_is_refused(tmp_path, ckpt, case):
    MALFORMED[case](ckpt)
    refused(saved(ckpt, tmp_path / f"{case}.pt"))


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_sparse_tensor_is_refused_in_one_line(tmp_path, ckpt):
    ckpt["versions"] = {"torch": torch.eye(3).to_sparse()}
    ckpt["checksum"] = "0" * 64
    path = tmp_path / "sparse.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError):  # not a RuntimeError from checksum(): a traceback
        checkpoint.load(path)
