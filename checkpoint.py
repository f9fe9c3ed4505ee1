"""The checkpoint file: what training writes, what loading checks, and rebuilding a model from it.

A checkpoint is one dict of plain values and tensors, so it loads with torch.load(path, weights_only=True):

    format         "vae-mnist/2"
    checksum       sha256 of everything else (checksum below): a file damaged on disk is refused, not used
    config         every setting, architecture and training (plain Python values)
    model          state_dict of the weights to use (with --ema, the weight average)
    train_weights  state_dict of the live weights Adam trains (only with --ema)
    optimizer      Adam's state_dict
    epoch          last completed epoch
    best_val_loss  lowest validation loss so far
    history        one dict per epoch: train/val loss, bce, kl, seconds
    rng            generator states for an exact resume, and the device type they belong to
    partial        where a Ctrl-C stopped inside an epoch (step, loss sums, seconds, shuffle state), else None
    versions       torch, torchvision, python
    anomaly_reference  (best.pt, once training has ended) what anomaly scores compare an image against
                   (anomaly.fit_reference) and the test digits' scores, for percentiles

Only format, checksum, config and model are needed to use a model (the shipped checkpoint holds little more: see
trim); --resume needs the training state too. Every value is checked by type and range as the file loads.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

import utils
from model import MAX_PARAMETERS, VAE, VAEConfig
from utils import UserError

FORMAT = "vae-mnist/2"
RESUME_KEYS = ("optimizer", "epoch", "best_val_loss", "history", "rng", "partial")
USE_KEYS = ("format", "checksum", "config", "model", "history", "anomaly_reference", "versions")  # what trim keeps
DEFAULT = "models_mnist/best.pt"  # what training writes, and what the other commands use
SHIPPED = Path(__file__).resolve().parent / "pretrained" / "vae-mnist.pt"  # a default run's best.pt, trimmed


class CheckpointError(UserError):
    """A file that is not a usable checkpoint of this project."""


# ----------------------------------------------------------------------------- reading


def load(path: str | os.PathLike, flag: str = "--checkpoint") -> dict:
    """Load and check a checkpoint with weights_only=True (no arbitrary object is ever unpickled), its tensors on the
    CPU. `flag` is the option that names the file, for the error message."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; pass {flag} the checkpoint file in it (best.pt or last.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint; train one with `python main.py` or pass {flag} PATH")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise CheckpointError(f"{path}: not a checkpoint (not a file torch.save wrote); pass {flag} PATH of a vae-mnist checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean "not a checkpoint we can read"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Unsupported global" in str(err) or isinstance(err, pickle.UnpicklingError):
            reason = "it contains pickled objects that are not plain tensors or values, so it was refused unread"
        raise CheckpointError(f"{path}: not a readable vae-mnist checkpoint ({reason[:200]})") from None
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("vae-mnist/"):
        raise CheckpointError(f"{path}: not a vae-mnist checkpoint (format {fmt!r})")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r}, but this code reads {FORMAT!r}; train a new one "
                              f"with `python main.py`, or use the version of this repository that wrote it")
    if not all_strided(ckpt) or ckpt.get("checksum") != checksum(ckpt):
        raise CheckpointError(f"{path}: its contents do not match its checksum (the file was damaged or edited); "
                              f"use another copy or train a new one")
    validate(ckpt, path)
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", flag: str = "--checkpoint") -> tuple[VAE, dict]:
    """The model a checkpoint describes, on `device`, in eval mode, and the checked checkpoint itself (its tensors on
    the CPU: only the model moves to the device)."""
    ckpt = load(path, flag=flag)
    model = VAE(model_config(ckpt, path))
    model.load_state_dict(ckpt["model"])  # validate() has matched every name and shape
    return utils.prepare_model(model, torch.device(device)).eval(), ckpt


def for_use(path: str | os.PathLike, default: str | os.PathLike = DEFAULT) -> Path:
    """The checkpoint a command uses: `path`; or, when `path` is the default and no model has been trained there
    yet, the shipped one (saying so in one line). A trained checkpoint, when present, always wins."""
    path = Path(path)
    if path == Path(default) and not path.exists() and SHIPPED.is_file():
        print(f"note: {path} does not exist yet, so this uses the shipped checkpoint {os.path.relpath(SHIPPED)} "
              f"(nothing is written beside it)")
        return SHIPPED
    return path


def is_shipped(path: str | os.PathLike) -> bool:
    """Whether `path` is the shipped checkpoint, however it is spelled: nothing is ever written beside it."""
    return Path(path).resolve() == SHIPPED.resolve()


def model_config(ckpt: dict, path: str | os.PathLike = "checkpoint") -> VAEConfig:
    """The VAEConfig stored in a checkpoint's config."""
    try:
        return VAEConfig(**{f.name: ckpt["config"][f.name] for f in fields(VAEConfig)})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: stored model config is invalid ({err})") from None


def config_dict(config: VAEConfig) -> dict:
    """A VAEConfig as plain values (tuples become lists) for a checkpoint."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def require_resumable(ckpt: dict, path: str | os.PathLike) -> None:
    """--resume needs the training state too, not only the weights."""
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if ckpt["config"].get("ema") and "train_weights" not in ckpt:
        missing.append("train_weights")
    if missing:
        raise CheckpointError(f"{path}: holds weights but no training state ({', '.join(missing)} missing), so it cannot be "
                              f"resumed; use it with `evaluate`/`sample`/`score`, or start a new run without --resume")


# ----------------------------------------------------------------------------- checking values


def is_int(v) -> bool:
    return type(v) is int


def is_number(v) -> bool:
    return type(v) in (int, float) and not math.isnan(v)


# The training settings a checkpoint's config holds, each with the test its value must pass.
CONFIG_CHECKS = {
    "epochs": lambda v: is_int(v) and v >= 1,
    "batch_size": lambda v: is_int(v) and v >= 1,
    "lr": lambda v: is_number(v) and 0 < v < math.inf,
    "seed": lambda v: is_int(v) and 0 <= v < 2**63,
    "val_size": lambda v: is_int(v) and v >= 1,
    "subset": lambda v: v is None or (is_int(v) and v >= 1),
    "exclude_digit": lambda v: v is None or (is_int(v) and 0 <= v <= 9),
    "binarize": lambda v: type(v) is bool,
    "kl_warmup": lambda v: is_int(v) and v >= 0,
    "lr_schedule": lambda v: v in ("constant", "cosine"),
    "precision": lambda v: v in ("fp32", "bf16"),
    "ema": lambda v: is_number(v) and 0 <= v < 1,
}
HISTORY_KEYS = ("epoch", "train_loss", "train_bce", "train_kl", "val_loss", "val_bce", "val_kl", "seconds")


def validate(ckpt: dict, path: str | os.PathLike) -> None:
    """Every value by type and range, so that a bad one is a one-line error now and not a traceback an epoch later."""
    def check(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{path}: {what}; this file cannot be used (train a new one with `python main.py`)")

    config = ckpt.get("config")
    check(isinstance(config, dict), "its config is missing or not a dict")
    architecture = model_config(ckpt, path)
    for key, ok in CONFIG_CHECKS.items():
        check(key in config and ok(config[key]), f"config {key} = {config.get(key)!r} is not a valid value")
    check(architecture.parameter_count() <= MAX_PARAMETERS, f"its architecture has more than {MAX_PARAMETERS:,} weights")
    with torch.device("meta"):  # the names and shapes the weights must have, without allocating them
        expected = VAE(architecture)
    shapes = {name: t.shape for name, t in expected.state_dict().items()}
    for key in ("model", "train_weights") if "train_weights" in ckpt else ("model",):
        weights = ckpt.get(key)
        check(is_tensor_dict(weights) and {name: t.shape for name, t in weights.items()} == shapes,
              f"its {key} weights do not match the stored architecture")
        check(is_finite_weights(weights), f"its {key} weights hold NaN or infinite values")
    if "epoch" in ckpt:
        check(is_int(ckpt["epoch"]) and 0 <= ckpt["epoch"] <= config["epochs"], f"epoch {ckpt['epoch']!r} is out of range")
    if "best_val_loss" in ckpt:
        check(is_number(ckpt["best_val_loss"]) and ckpt["best_val_loss"] > 0, f"best_val_loss {ckpt['best_val_loss']!r} is not a positive number")
    if "history" in ckpt:
        history = ckpt["history"]
        check(isinstance(history, list) and all(isinstance(h, dict) and all(is_number(h.get(k)) and math.isfinite(h[k])
                                                                            for k in HISTORY_KEYS) for h in history),
              "its history is not a list of per-epoch losses")
        check("epoch" not in ckpt or len(history) == ckpt["epoch"], "its history does not have one entry per completed epoch")
    if "optimizer" in ckpt:
        steps_taken = ckpt.get("epoch", 0) > 0 or ckpt.get("partial") is not None
        check(is_adam_state(ckpt["optimizer"], [p.shape for p in expected.parameters()], steps_taken),
              "its optimizer state is empty, incomplete or not Adam's state for this model's weights")
    if "rng" in ckpt:
        rng, names = ckpt["rng"], ["shuffle", "noise"] + (["binarize"] if config["binarize"] else [])
        check(isinstance(rng, dict) and isinstance(rng.get("device"), str)
              and all(isinstance(rng.get(n), torch.Tensor) and rng[n].dtype == torch.uint8 for n in names),
              "its random-generator states are missing or not byte tensors")
    if ckpt.get("partial") is not None:
        p = ckpt["partial"]
        check(isinstance(p, dict) and is_int(p.get("step")) and p["step"] >= 1 and is_number(p.get("seconds")) and p["seconds"] >= 0
              and isinstance(p.get("sums"), torch.Tensor) and p["sums"].shape == (2,) and p["sums"].is_floating_point()
              and isinstance(p.get("shuffle_at_start"), torch.Tensor) and p["shuffle_at_start"].dtype == torch.uint8,
              "its record of an interrupted epoch (partial) is malformed")
    if "anomaly_reference" in ckpt:
        check(is_reference(ckpt["anomaly_reference"], config["latent_dim"]), "its anomaly reference is malformed")


def is_tensor_dict(d) -> bool:
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def is_finite_weights(d: dict) -> bool:
    return all(torch.isfinite(v).all() for v in d.values() if v.is_floating_point())


def all_strided(value) -> bool:
    """Whether every tensor in a checkpoint is a plain dense one (what torch.save of a state_dict writes)."""
    if isinstance(value, torch.Tensor):
        return value.layout == torch.strided
    if isinstance(value, dict):
        return all(all_strided(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_strided(v) for v in value)
    return True


def is_adam_state(opt, shapes: list[torch.Size], steps_taken: bool) -> bool:
    """Adam's state_dict for parameters of these shapes in one group; with moment estimates of the same shapes for
    each once steps were taken."""
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and len(opt["param_groups"]) == 1 and isinstance(opt["param_groups"][0], dict)):
        return False
    if opt["param_groups"][0].get("params") != list(range(len(shapes))):
        return False
    if not steps_taken:
        return True
    state = opt["state"]
    return set(state) == set(range(len(shapes))) and all(
        isinstance(state[i], dict) and isinstance(state[i].get("step"), torch.Tensor)
        and all(isinstance(state[i].get(k), torch.Tensor) and state[i][k].shape == shape for k in ("exp_avg", "exp_avg_sq"))
        for i, shape in enumerate(shapes))


def is_reference(ref, latent_dim: int) -> bool:
    """The shape of anomaly.fit_reference's dict (plus the test scores and latent map training adds)."""
    from anomaly import LocalPixelModel  # here, not at the top: anomaly.py imports this module

    with torch.device("meta"):
        local_shapes = {name: t.shape for name, t in LocalPixelModel().state_dict().items()}
    local = ref.get("local_model") if isinstance(ref, dict) else None
    if not is_tensor_dict(local) or {name: t.shape for name, t in local.items()} != local_shapes:
        return False
    space = ref.get("latent_map")
    if space is not None and not (isinstance(space, dict) and all(isinstance(space.get(k), torch.Tensor) for k in ("mean", "axes", "points", "labels"))
                                  and space["mean"].shape == (latent_dim,) and space["axes"].shape == (latent_dim, 2)
                                  and space["points"].dim() == 2 and space["points"].shape[1] == 2
                                  and space["labels"].shape == space["points"].shape[:1]):
        return False
    codes, calibration = ref.get("codes"), ref.get("calibration")
    stats_ok = isinstance(calibration, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(is_number(s) and math.isfinite(s) for s in v) and v[1] > 0
        for v in calibration.values())
    scores = ref.get("test_scores")
    return (is_number(ref.get("local_weight")) and isinstance(codes, torch.Tensor) and codes.dim() == 2
            and codes.shape[1] == latent_dim and len(codes) > 0 and stats_ok
            and {"elbo", "complexity", "knn", "sum"} <= set(calibration)
            and (scores is None or (isinstance(scores, torch.Tensor) and scores.dim() == 1 and len(scores) > 0)))


def checksum(ckpt: dict) -> str:
    """sha256 of every key but "checksum", walked in a fixed order: tensors by dtype, shape and bytes (in row-major
    order, whatever their memory layout), other values by repr."""
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


# ----------------------------------------------------------------------------- writing


def build(config: dict, weights: dict, optimizer: dict, progress: dict, rng: dict, train_weights: dict | None = None) -> dict:
    """The dict that best.pt and last.pt hold, with its checksum. `weights` are the state_dict to use (the average,
    with --ema), `progress` carries epoch, best_val_loss, history and partial, `rng` the generator states."""
    ckpt = {"format": FORMAT, "config": config, "model": weights,
            **({"train_weights": train_weights} if train_weights is not None else {}),
            "optimizer": optimizer, **progress, "rng": rng, "versions": utils.versions()}
    return ckpt | {"checksum": checksum(ckpt)}


def save(ckpt: dict, path: str | os.PathLike) -> None:
    """Write atomically: on any failure (disk full, say) the previous file at `path` stays whole."""
    utils.save_atomic(ckpt, Path(path))


def with_anomaly_reference(ckpt: dict, reference: dict) -> dict:
    """The checkpoint with an anomaly reference added, and its checksum renewed."""
    ckpt = {k: v for k, v in ckpt.items() if k != "checksum"} | {"anomaly_reference": reference}
    return ckpt | {"checksum": checksum(ckpt)}


def trim(ckpt: dict) -> dict:
    """What using a model needs (config, the averaged weights, history, anomaly reference): the shipped file."""
    kept = {k: v for k, v in ckpt.items() if k in USE_KEYS and k != "checksum"}
    return kept | {"checksum": checksum(kept)}


def restore_generators(rng: dict, generators: dict[str, torch.Generator], device_type: str, seed: int, steps_done: int) -> list[str]:
    """Set each generator to its stored state. The shuffle generator always lives on the CPU, so it carries over
    anywhere; the noise and binarization generators live on the training device, and a state saved on another kind
    of device (rng["device"]: CUDA vs CPU) does not fit. Those are re-seeded with seed + 1 + 2 * steps_done (noise)
    and seed + 2 + 2 * steps_done (binarization): the run continues reproducibly, though not bit-identical to one that
    stayed on one device. Returns the names of the generators that were re-seeded."""
    reseeded = []
    for offset, (name, gen) in enumerate(generators.items()):
        if name != "shuffle" and rng["device"] != device_type:
            gen.manual_seed(seed + offset + 2 * steps_done)
            reseeded.append(name)
            continue
        try:
            gen.set_state(rng[name])
        except RuntimeError:  # a byte tensor of the wrong length for this kind of generator
            raise CheckpointError(f"the checkpoint's {name} generator state is unusable; start a new run without --resume") from None
    return reseeded
