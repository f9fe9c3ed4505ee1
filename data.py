"""MNIST in memory: the checked data set as uint8 tensors (its files are mnist_files.py's), a run's
train/validation split, and float batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mnist_files import (
    MNIST_FILES,
    DataError,
    download_mnist,
    find_mnist_files,
    join_names,
    missing_files,
    read_idx,
)

# binarize: the one fixed draw of the evaluation images, the same for every seed and device
BINARIZE_SEED = 0
# fewest training and validation images: fewer make the validation loss and the calibration noise
MIN_IMAGES = 100


def load_mnist(folder: str | os.PathLike = "data", download: bool = False, sets=("train", "test")):
    """The checked data set: train_images, train_labels, test_images, test_labels (uint8 images
    (N, 28, 28), int64 labels), only those of `sets`; download=True first fetches missing files into
    folder/MNIST/raw."""
    keys = dict(zip(MNIST_FILES, ("train_images", "train_labels", "test_images", "test_labels")))
    names = [name for name, key in keys.items() if key.split("_")[0] in sets]
    if download and missing_files(folder, names):
        download_mnist(Path(folder), names)
    found = find_mnist_files(folder, names)
    if missing := [name for name, path in found.items() if path is None]:
        looked = f"{folder}: missing {join_names(missing)} (.gz or not, also looked in MNIST/raw)"
        raise DataError(f"{looked}; download=True fetches them, or pass a folder that holds them")
    arrays = {keys[name]: read_idx(path, *MNIST_FILES[name]) for name, path in found.items()}
    # copied out of the files' read-only buffers; the labels as int64, as torch indexes with
    return {
        k: torch.from_numpy(a.astype(np.int64 if a.ndim == 1 else np.uint8))
        for k, a in arrays.items()
    }


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n) cut into (train, validation) index sets; the same seed gives
    the same split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def run_split(labels: torch.Tensor, val_size: int, seed: int, exclude_digit=None, subset=None):
    """A run's (train, validation) indices into the training images: the seeded split, without the
    held-out digit, the training part cut to its first `subset` images. ValueError when either part
    has fewer than MIN_IMAGES."""
    train_idx, val_idx = split_indices(len(labels), val_size, seed)
    if exclude_digit is not None:
        keep = labels != exclude_digit
        train_idx, val_idx = train_idx[keep[train_idx]], val_idx[keep[val_idx]]
    train_idx = train_idx[:subset]
    if min(len(train_idx), len(val_idx)) < MIN_IMAGES:
        sizes = f"train on {len(train_idx)} images and validate on {len(val_idx)}"
        raise ValueError(f"this run would {sizes}; each needs at least {MIN_IMAGES}")
    return train_idx, val_idx


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 28, 28) -> a new float32 tensor (B, 1, 28, 28) in [0, 1]; `images` is never
    changed. Float images are refused (ValueError), as is any other shape: scaling them again would
    make them 255 times too dark."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"to_float takes uint8 images (B, 28, 28), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.shape[1:] != (28, 28):
        got = f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(f"to_float takes uint8 images (B, 28, 28), got {got}")
    return images.unsqueeze(1).float() / 255


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each pixel drawn as Bernoulli(intensity): dynamic binarization, drawn afresh per batch."""
    return torch.bernoulli(x, generator=generator)


def eval_images(images: torch.Tensor, binarized: bool, device: torch.device) -> torch.Tensor:
    """uint8 images -> float images on `device` for validation and evaluation; binarized once with a
    fixed CPU generator, so that every run, whatever its seed or device, is scored alike."""
    x = to_float(images.cpu())
    if binarized:
        x = binarize(x, torch.Generator().manual_seed(BINARIZE_SEED))
    return x.to(device)


def batches(images: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    """Float batches from uint8 images held in memory; shuffled when a generator is given."""
    n = images.shape[0]
    if generator is not None:  # drawn on the CPU: the same order on every device
        order = torch.randperm(n, generator=generator, device="cpu").to(images.device)
    for i in range(0, n, batch_size):
        idx = slice(i, i + batch_size) if generator is None else order[i : i + batch_size]
        yield to_float(images[idx])
