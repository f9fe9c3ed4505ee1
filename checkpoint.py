"""The checkpoint file: what training writes, what loading checks, and what --resume reads back.

A checkpoint is one dict of plain values and tensors, so it loads with torch.load(path, weights_only=True):

    format         "vae-mnist/1"
    config         every setting, architecture and training (plain Python values)
    model          state_dict of the weights to use (with --ema, the weight average)
    train_weights  state_dict of the live weights Adam trains (only with --ema)
    optimizer      Adam's state_dict
    epoch          last completed epoch
    best_val_loss  lowest validation loss so far
    history        one dict per epoch: train/val loss, bce, kl, seconds
    rng            generator states for an exact resume, and the device type they belong to
    partial        where a Ctrl-C stopped inside an epoch, else None
    versions       torch, torchvision, python
    anomaly_reference  (best.pt, once training has ended) what anomaly scores compare an image against: a local pixel
                   model, codes of training images, and score statistics of validation images (anomaly.fit_reference)

A file with only format, config and model (say, saved from a notebook) loads for use but cannot be resumed.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

import utils
from utils import UserError

FORMAT = "vae-mnist/1"
RESUME_KEYS = ("optimizer", "epoch", "best_val_loss", "history", "rng")

# What a run was trained with before a training setting existed, so that --resume continues it as it was.
TRAINING_BEFORE_IT_EXISTED = dict(precision="fp32", ema=0.0)


class CheckpointError(UserError):
    """A file that is not a usable checkpoint of this project."""


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", flag: str = "--checkpoint") -> dict:
    """Load and check a checkpoint with weights_only=True: no arbitrary object is ever unpickled.
    `flag` is the option that names the file, for the error message."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint; train one with `python main.py` or pass {flag} PATH")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise CheckpointError(f"{path}: not a checkpoint (not a file torch.save wrote); pass {flag} PATH of a vae-mnist checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean "not a checkpoint we can read"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Unsupported global" in str(err) or isinstance(err, pickle.UnpicklingError):
            reason = "it contains pickled objects that are not plain tensors or values, so it was refused unread"
        raise CheckpointError(f"{path}: not a readable vae-mnist checkpoint ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path}: not a vae-mnist checkpoint (no format tag)")
    fmt = ckpt["format"]
    name, _, version = str(fmt).partition("/")
    if name != "vae-mnist" or not re.fullmatch(r"[0-9]+", version):
        raise CheckpointError(f"{path}: not a vae-mnist checkpoint (format {fmt!r})")
    if int(version) > 1:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is newer than this code reads ({FORMAT}); update the code")
    for key in ("config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint is missing {key!r}")
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path}: stored config is not a dict")
    return ckpt


def require_resumable(ckpt: dict, path: str | os.PathLike) -> None:
    """--resume needs the training state too, not only the weights."""
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: holds weights but no training state ({', '.join(missing)} missing), so it cannot be "
                              f"resumed; use it with `evaluate`/`sample`/`score`, or start a new run without --resume")


def build(config: dict, model: torch.nn.Module, train_weights: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
          state: dict, generators: dict[str, torch.Generator], device: torch.device) -> dict:
    """The dict that best.pt and last.pt hold; `state` carries epoch, best_val_loss, history and partial."""
    return {
        "format": FORMAT,
        "config": config,
        "model": model.state_dict(),
        **({"train_weights": train_weights.state_dict()} if train_weights is not None else {}),
        "optimizer": optimizer.state_dict(),
        "epoch": state["epoch"],
        "best_val_loss": state["best_val_loss"],
        "history": state["history"],
        "rng": {name: gen.get_state() for name, gen in generators.items()} | {"device": device.type},
        "partial": state["partial"],
        "versions": utils.versions(),
    }


def save(ckpt: dict, path: str | os.PathLike) -> None:
    """Write atomically: on any failure (disk full, say) the previous file at `path` stays whole."""
    utils.save_atomic(ckpt, Path(path))


def restore_generators(ckpt: dict, generators: dict[str, torch.Generator], seed: int, steps_done: int) -> list[str]:
    """Set each generator to its stored state. The shuffle generator always lives on the CPU, so it carries over
    anywhere; the noise and binarization generators live on the training device, and a state saved on another kind
    of device (CUDA vs CPU) does not fit. Those are re-seeded with seed + 1 + 2 * steps_done (noise) and
    seed + 2 + 2 * steps_done (binarization): the run continues reproducibly, though not bit-identical to one that
    stayed on one device. Returns the names of the generators that were re-seeded."""
    reseeded = []
    for offset, (name, gen) in enumerate(generators.items()):
        try:
            gen.set_state(ckpt["rng"][name])
        except (RuntimeError, KeyError, TypeError):
            if name == "shuffle":
                raise CheckpointError("the checkpoint's shuffle generator state is unusable; start a new run without --resume") from None
            gen.manual_seed(seed + offset + 2 * steps_done)
            reseeded.append(name)
    return reseeded
