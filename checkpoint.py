"""The checkpoint file: what training writes, how a file is checked as it loads, and rebuilding a
model from it.

A checkpoint is one dict of plain values and tensors, so it loads with torch.load(path,
weights_only=True):

    format             "vae-mnist/3"
    checksum           sha256 of everything else (checksum below): a damaged file is refused
    config             every setting of the run: TrainConfig's and VAEConfig's fields, plain values
                       (precision as the run trained: "fp32" or "bf16", never "auto")
    model              state_dict of the weights to use (with --ema, the weight average)
    train_weights      state_dict of the weights Adam trains (only with --ema)
    optimizer          Adam's state_dict
    epoch              epochs completed
    best_val_loss      lowest validation loss so far
    history            one dict per epoch: train/val loss, bce, kl, seconds
    rng                the generators' states at the end of that epoch, and their device type
    versions           torch, torchvision, python
    anomaly_reference  (best.pt, once training has ended) what anomaly scores compare against
                       (anomaly.py), with test_scores: the test digits' sorted scores
    latent_map         (likewise) the 2-D map of the latent space that the pictures and the demo
                       draw, with kl_per_dim: the test digits' mean KL per dimension (evaluate.py)

Loading checks the file before anything is copied: its records (stored, not compressed: torch.load
would inflate a few kB into gigabytes) and size, every tensor's bytes against the bytes stored, the
checksum, the config (rebuilt as TrainConfig and VAEConfig), and the weights' names, shapes and
dtypes against the architecture; for --resume also the optimizer and generator states. Any failure
is one CheckpointError line (see `refused`).

Versions and upgrades. FORMAT names the layout of the dict above; this code reads "vae-mnist/3"
only, and names the format of any other file it is given. Settings change without a new format:
- a setting added to TrainConfig or VAEConfig: a file written before it existed lacks it, and
  `load` fills it in with the field's `absent` value (config.setting), which must reproduce how the
  old code ran (by default the field's default; give `absent=` when the default differs from the
  old behaviour). The file is upgraded in memory; a run resumed from it writes every setting.
- a setting removed: the stored value is ignored (remove it only if ignoring it keeps the
  weights' meaning).
A change to the dict's keys, the weights' names or their meaning needs a new FORMAT, and with it a
reader of "vae-mnist/3" files that converts them (and the shipped file re-saved, its weights
bit-identical).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import platform
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch

import config as settings
import files
from config import TrainConfig, VAEConfig
from files import UserError, write_bytes_atomic
from model import VAE, on_device

FORMAT = "vae-mnist/3"
DEFAULT = Path("models_mnist/best.pt")  # what training writes, and what the other commands use
# a default run's best.pt, trimmed
SHIPPED = Path(__file__).resolve().parent / "pretrained" / "vae-mnist.pt"
RESUME_KEYS = ("optimizer", "epoch", "best_val_loss", "history", "rng")
# what trim keeps
USE_KEYS = ("format", "config", "model", "history", "versions", "anomaly_reference", "latent_map")
HISTORY_KEYS = (
    "epoch",
    "train_loss",
    "train_bce",
    "train_kl",
    "val_loss",
    "val_bce",
    "val_kl",
    "seconds",
)
# a last.pt of the largest model (50 M weights, average, Adam's two moments) is 0.8 GB
MAX_BYTES = 1_000_000_000
# the pickled structure around the tensors: configs and history take a few kB
MAX_PICKLE_BYTES = 16 << 20


class CheckpointError(UserError):
    """A file that is not a usable checkpoint of this project."""


# ----------------------------------------------------------------------------- reading


def load(path: str | os.PathLike, flag: str | None = None, resume: bool = False) -> dict:
    """Load and check a checkpoint, its tensors on the CPU; with `resume`, also the training state
    --resume needs. No arbitrary object is ever unpickled (weights_only=True). `flag` names the
    option that gave the path."""
    path = Path(path)
    stored = check_archive(path, flag)
    with refused(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        check_format(ckpt, path)
        check_tensor_bytes(ckpt, stored)  # before the checksum makes any tensor contiguous
        if ckpt.get("checksum") != checksum(ckpt):
            raise CheckpointError(
                f"{path}: its contents do not match its checksum (the file was damaged or edited); "
                "use another copy or train a new one"
            )
        ckpt["config"] = completed(ckpt.get("config"))
        train_config(ckpt)  # rebuilt, so every setting is checked against its range
        expected = {name: (t.shape, t.dtype) for name, t in meta_model(ckpt).state_dict().items()}
        for key in ("model", "train_weights") if "train_weights" in ckpt else ("model",):
            check_weights(ckpt[key], expected, key)
        check_history(ckpt)
        if resume:
            check_resumable(ckpt, path)
    return ckpt


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", flag: str | None = None
) -> tuple[VAE, dict]:
    """The model a checkpoint describes, on `device`, in eval mode, and the checked checkpoint
    itself (its tensors on the CPU: only the model moves)."""
    ckpt = load(path, flag=flag)
    model = VAE(**asdict(model_config(ckpt)))
    with refused(path):
        model.load_state_dict(ckpt["model"], strict=True)
    return on_device(model, device).eval(), ckpt


@contextmanager
def refused(path: Path):
    """The one wrapper: whatever torch or a config raises while a file is read and checked becomes
    one line."""
    try:
        yield
    except CheckpointError:
        raise
    except (
        pickle.UnpicklingError,
        RuntimeError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        IndexError,
        EOFError,
        OSError,
    ) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        if "Unsupported global" in reason or "Weights only load failed" in reason:
            reason = (
                "it contains pickled objects that are not plain tensors or values, so it was "
                "refused unread"
            )
        raise CheckpointError(
            f"{path}: not a usable vae-mnist checkpoint ({reason}); train a new one with "
            "`python main.py`"
        ) from None


def passing(flag: str | None) -> str:
    """How a message asks for another file: by the flag that gave the path (the command line names
    it), else by the path a caller passes."""
    return f"pass {flag} PATH of" if flag else "pass the path of"


def check_archive(path: Path, flag: str | None) -> int:
    """The file is a zip archive as torch.save writes one: records stored uncompressed, no larger
    than the file and MAX_BYTES. Returns how many bytes of tensor data it stores. A path the OS
    refuses, a TorchScript model and a file in torch.save's legacy format are named as what they
    are."""
    files.check_path(path, flag)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; {passing(flag)} the checkpoint file in it (best.pt or last.pt)"
        )
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such checkpoint; train one with `python main.py` or {passing(flag)} one"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file; {passing(flag)} a vae-mnist checkpoint")
    records = archive_records(path, flag)
    total = sum(r.file_size for r in records)
    pickled = sum(r.file_size for r in records if r.filename.endswith(".pkl"))
    if any(r.compress_type != zipfile.ZIP_STORED for r in records) or total > path.stat().st_size:
        raise CheckpointError(
            f"{path}: holds compressed records, which torch.save never writes; refused unread"
        )
    if total > MAX_BYTES:
        raise CheckpointError(
            f"{path}: {total:,} bytes of data, more than a checkpoint of the largest model this "
            f"program trains holds ({MAX_BYTES:,}); refused unread"
        )
    if pickled > MAX_PICKLE_BYTES:
        raise CheckpointError(
            f"{path}: its pickled structure is {pickled:,} bytes, more than the "
            f"{MAX_PICKLE_BYTES:,} a checkpoint needs; refused unread"
        )
    return sum(r.file_size for r in records if "/data/" in r.filename)


def archive_records(path: Path, flag: str | None) -> list[zipfile.ZipInfo]:
    """The records of the zip archive torch.save writes; a file that is not one (unreadable, in
    torch.save's legacy format, not a zip) or a TorchScript model is named as what it is."""
    use_instead = f"{passing(flag)} a best.pt or last.pt that `python main.py` wrote"
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({err.strerror or err}); {use_instead}")
    except (zipfile.BadZipFile, ValueError, EOFError):
        if is_legacy_torch_save(path):
            raise CheckpointError(
                f"{path}: a file in torch.save's legacy (non-zip) format, not a checkpoint this "
                f"program wrote; {use_instead}"
            ) from None
        raise CheckpointError(
            f"{path}: not a checkpoint (not a file torch.save wrote); {use_instead}"
        ) from None
    if any(r.filename.endswith("/constants.pkl") or "/code/" in r.filename for r in records):
        raise CheckpointError(
            f"{path}: a TorchScript model (torch.jit.save), not a checkpoint: it holds no settings "
            f"to rebuild this program's model from; {use_instead}"
        )
    return records


# how every file of torch.save's legacy format begins: pickle protocol 2, then its magic number
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def is_legacy_torch_save(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC
    except OSError:
        return False


def tensors(value):
    """Every tensor in a nested structure of dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)


def check_format(ckpt, path: Path) -> None:
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    use_instead = "pass the best.pt or last.pt that `python main.py` wrote"
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(
            f"{path}: a plain state_dict (weights without the settings that rebuild their model), "
            f"not a vae-mnist checkpoint; {use_instead}"
        )
    if not isinstance(fmt, str) or not fmt.startswith("vae-mnist/"):
        raise CheckpointError(f"{path}: not a vae-mnist checkpoint (format {fmt!r}); {use_instead}")
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {fmt!r}, but this code reads {FORMAT!r}; train a new one "
            "with `python main.py`, or use the version of this repository that wrote it"
        )


def check_tensor_bytes(ckpt: dict, stored: int) -> None:
    """Dense tensors whose bytes add up to no more than the file stores: an expanded view or many
    views of one storage (a few kB that claim gigabytes) is refused before anything is made
    contiguous."""
    claimed = 0
    for t in tensors(ckpt):
        if t.layout != torch.strided:
            raise ValueError(f"it holds a {t.layout} tensor; checkpoints hold dense ones")
        claimed += t.numel() * t.element_size()
    if claimed > stored:
        raise ValueError(f"its tensors claim {claimed:,} bytes but the file stores {stored:,}")


def train_config(ckpt: dict) -> TrainConfig:
    return stored_config(ckpt, TrainConfig)


def model_config(ckpt: dict) -> VAEConfig:
    return stored_config(ckpt, VAEConfig)


def completed(config) -> dict:
    """A stored config with every setting it lacks (written before the setting existed) filled in
    with the value that reproduces how it ran (see the module's docstring)."""
    if not isinstance(config, dict):
        raise ValueError("its config is not a dict of settings")
    return settings.with_absent(VAEConfig, settings.with_absent(TrainConfig, config))


def stored_config(ckpt: dict, kind: type):
    """The checkpoint's config rebuilt as `kind` (TrainConfig or VAEConfig), which checks every
    value's range; settings it lacks take their `absent` value."""
    config = completed(ckpt.get("config"))
    rebuilt = kind(**{f.name: config[f.name] for f in fields(kind)})
    try:
        settings.check(rebuilt)
    except ValueError as err:
        raise ValueError(f"config {err}") from None
    return rebuilt


def meta_model(ckpt: dict) -> VAE:
    """The checkpoint's architecture on the meta device: names, shapes and dtypes, no memory."""
    with torch.device("meta"):
        return VAE(**asdict(model_config(ckpt)))


def check_weights(weights, expected: dict, key: str) -> None:
    if (
        not isinstance(weights, dict)
        or {k: (getattr(v, "shape", None), getattr(v, "dtype", None)) for k, v in weights.items()}
        != expected
    ):
        raise ValueError(f"its {key} weights do not match the stored architecture")
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise ValueError(f"its {key} weights hold NaN or infinite values")


def check_history(ckpt: dict) -> None:
    history = ckpt.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(h, dict)
        and all(type(h.get(k)) in (int, float) and math.isfinite(h[k]) for k in HISTORY_KEYS)
        for h in history
    ):
        raise ValueError("its history is not a list of per-epoch losses")


def check_resumable(ckpt: dict, path: Path) -> None:
    """What --resume restores: the training state, Adam's moments shaped as the weights, usable
    generator states."""
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if ckpt["config"]["ema"] and "train_weights" not in ckpt:
        missing.append("train_weights")
    if missing:
        raise CheckpointError(
            f"{path}: holds weights but no training state ({', '.join(missing)} missing), so it "
            "cannot be resumed; use it with evaluate, sample or score, or start a new run "
            "without --resume"
        )
    epoch = ckpt["epoch"]
    if (
        type(epoch) is not int
        or not 1 <= epoch <= ckpt["config"]["epochs"]
        or len(ckpt["history"]) != epoch
    ):
        raise ValueError(f"epoch {epoch!r} is out of range or does not match its history")
    if type(ckpt["best_val_loss"]) not in (int, float) or not ckpt["best_val_loss"] > 0:
        raise ValueError(f"best_val_loss {ckpt['best_val_loss']!r} is not a positive number")
    if not is_adam_state(ckpt["optimizer"], [p.shape for p in meta_model(ckpt).parameters()]):
        raise ValueError("its optimizer state is not Adam's state for this model's weights")
    rng, names = (
        ckpt["rng"],
        ("shuffle", "noise") + (("binarize",) if ckpt["config"]["binarize"] else ()),
    )
    if not isinstance(rng, dict) or not all(isinstance(rng.get(n), torch.Tensor) for n in names):
        raise ValueError("its random-generator states are missing")
    if rng.get("device") not in ("cpu", "cuda", "mps") or any(
        rng[n].dtype != torch.uint8 for n in names
    ):
        raise ValueError(
            f"its random-generator states are not a generator's (device {rng.get('device')!r})"
        )
    for name in names:
        # another device's states are re-seeded, not used
        if name == "shuffle" or rng.get("device") == "cpu":
            torch.Generator().set_state(rng[name])  # raises for a state that is not a generator's


def is_adam_state(opt, shapes: list[torch.Size]) -> bool:
    """Adam's state_dict for parameters of these shapes, in one group, with moment estimates of the
    same shapes."""
    try:
        (group,) = opt["param_groups"]
        state = opt["state"]
        return (
            group["params"] == list(range(len(shapes)))
            and set(state) == set(range(len(shapes)))
            and all(
                state[i][k].shape == shape
                for i, shape in enumerate(shapes)
                for k in ("exp_avg", "exp_avg_sq")
            )
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------- which checkpoint, and what it is


def for_use(path: str | os.PathLike) -> Path:
    """The checkpoint a command uses: `path`; or, when `path` is the default and no model has been
    trained there yet, the shipped one. A trained checkpoint, when present, always wins."""
    path = Path(path)
    if path == DEFAULT and not path.exists() and SHIPPED.is_file():
        return SHIPPED
    return path


def is_shipped(path: str | os.PathLike) -> bool:
    """Whether `path` is the shipped checkpoint, however it is spelled: nothing is ever written
    beside it."""
    return Path(path).resolve() == SHIPPED.resolve()


def describe(path: str | os.PathLike, ckpt: dict) -> str:
    """One line naming the checkpoint and what it is, so that a smoke test never passes for the real
    model."""
    config, history = ckpt["config"], ckpt.get("history") or []
    shipped = is_shipped(path)
    # as the README names it
    where = "pretrained/vae-mnist.pt" if shipped and Path(path).is_absolute() else str(path)
    if not history:
        return f"{where}: a model with no training history"
    digit = config["exclude_digit"]
    if config["subset"]:  # the subset is drawn from what is left once the digit is taken out
        images = f"the first {config['subset']:,} training images"
        images += "" if digit is None else f" with no {digit}s"
    else:
        images = f"{60_000 - config['val_size']:,} training images"
        images += "" if digit is None else f" minus their {digit}s"
    what = "the shipped model" if shipped else "a model trained here"
    return (
        f"{where}: {what}, epoch {history[-1]['epoch']} of {config['epochs']} on {images}, "
        f"validation loss {history[-1]['val_loss']:.2f}"
    )


def run_history(path: Path, ckpt: dict) -> list[dict]:
    """The whole run's per-epoch history: best.pt stops at its own epoch, so prefer the same run's
    last.pt."""
    mine, last = ckpt.get("history", []), path.parent / "last.pt"
    if path.name == "last.pt" or not last.is_file():
        return mine
    try:
        other = load(last)
    except CheckpointError:
        return mine
    same_run = other["config"] == ckpt["config"] and other["history"][: len(mine)] == mine
    return other["history"] if same_run else mine


# ----------------------------------------------------------------------------- writing


def build(config: dict, weights: dict, optimizer: dict, progress: dict) -> dict:
    """The dict that best.pt and last.pt hold, with its checksum: `weights` is the state_dict to use
    (the average, with --ema); `progress` holds epoch, best_val_loss, history and rng (and
    train_weights, with --ema)."""
    import torchvision

    versions = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }
    ckpt = {"format": FORMAT, "config": config, "model": weights, "optimizer": optimizer} | progress
    return with_keys(ckpt, versions={k: str(v) for k, v in versions.items()})


def save(ckpt: dict, path: str | os.PathLike) -> None:
    """Write atomically: on any failure (disk full, say) the previous file at `path` stays whole.
    Serialised in memory first, so that a failing disk raises an OSError from the write itself
    (torch's own writer would hide it)."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    write_bytes_atomic(buffer.getbuffer(), path)


def with_keys(ckpt: dict, **extra) -> dict:
    """The checkpoint with keys added (the anomaly reference, the latent map), checksum renewed."""
    ckpt = {k: v for k, v in ckpt.items() if k != "checksum"} | extra
    return ckpt | {"checksum": checksum(ckpt)}


def trim(ckpt: dict) -> dict:
    """What using a model needs (config, the averaged weights, history, anomaly reference, map): the
    shipped file."""
    return with_keys({k: v for k, v in ckpt.items() if k in USE_KEYS})


def checksum(ckpt: dict) -> str:
    """sha256 of every key but "checksum", walked in a fixed order: tensors by dtype, shape and
    bytes (in row-major order, whatever their memory layout), other values by repr."""
    h = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"<tensor {t.dtype} {tuple(value.shape)}>".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            h.update(b"{")
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
            h.update(b"}")
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for item in value:
                feed(item)
            h.update(b"]")
        else:
            h.update(f"{type(value).__name__}:{value!r};".encode())

    feed({k: v for k, v in ckpt.items() if k != "checksum"})
    return h.hexdigest()


def config_dict(train: TrainConfig, model: VAEConfig) -> dict:
    """Both configs as one dict of plain values (tuples become lists), as checkpoints store them."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in (asdict(train) | asdict(model)).items()
    }
