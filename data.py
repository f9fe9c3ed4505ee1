"""MNIST: find the four IDX files, check and decode them into uint8 tensors, split them, and batch
them as floats."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from files import UserError


class DataError(UserError):
    """MNIST is missing, unreadable, or not the canonical data."""


TEST_IMAGES = 10_000  # the size of MNIST's test set
# name -> (IDX magic number, shape, md5 of the uncompressed content)
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28), "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (2049, (60000,), "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (2051, (TEST_IMAGES, 28, 28), "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (2049, (TEST_IMAGES,), "27ae3e4e09519cfbb04c329615203637"),
}
# --binarize: the one fixed draw of the evaluation images, the same for every --seed and device
BINARIZE_SEED = 0
HOW_TO_FIX = (
    "download the four MNIST files again, or pass --data-dir pointing at a folder that holds them"
)


def candidate_paths(data_dir: str | os.PathLike, name: str) -> list[Path]:
    """Where one file may lie: data_dir or torchvision's data_dir/MNIST/raw, gzipped or not, '-idx'
    or '.idx'."""
    spellings = [name, name.replace("-idx", ".idx")]
    folders = [Path(data_dir), Path(data_dir) / "MNIST" / "raw"]
    return [
        folder / (spelling + ext)
        for folder in folders
        for spelling in spellings
        for ext in (".gz", "")
    ]


def find_mnist_files(data_dir: str | os.PathLike) -> dict[str, Path | None]:
    """The first existing candidate for each of the four files, or None where there is none."""
    return {
        name: next((p for p in candidate_paths(data_dir, name) if p.is_file()), None)
        for name in MNIST_FILES
    }


def missing_files(data_dir: str | os.PathLike) -> list[str]:
    return [name for name, path in find_mnist_files(data_dir).items() if path is None]


def read_idx(
    path: str | os.PathLike, magic: int, shape: tuple[int, ...], md5: str | None
) -> np.ndarray:
    """Decode one IDX file (.gz or raw) after checking its magic number, dimensions, size and
    content md5. `shape` is the canonical file's: no more than its bytes are ever read or
    decompressed."""
    path = Path(path)
    refused = lambda reason: DataError(f"{path}: {reason}; {HOW_TO_FIX}")  # noqa: E731
    header = 4 + 4 * len(shape)
    limit = header + math.prod(shape)
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
            # one byte more tells a larger file (or a gzip bomb) without inflating it
            raw = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise refused(f"cannot read it ({err})") from None
    if len(raw) < header:
        raise refused(f"truncated ({len(raw)} bytes, shorter than its header)")
    if (found := int.from_bytes(raw[:4], "big")) != magic:
        raise refused(f"not an IDX file of this kind (magic number {found}, expected {magic})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(shape)))
    if dims[1:] != shape[1:]:
        raise refused(f"dimensions {dims}, expected (N, {', '.join(map(str, shape[1:]))})")
    if len(raw) > limit:
        raise refused(
            f"larger than the {limit:,} bytes an MNIST file of this kind holds (uncompressed)"
        )
    if len(raw) != (expected := header + math.prod(dims)):
        raise refused(
            f"{len(raw)} bytes where its header promises {expected} (truncated or padded)"
        )
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise refused("content differs from the canonical MNIST file (md5 mismatch)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def load_mnist(data_dir: str | os.PathLike = "data") -> dict[str, torch.Tensor]:
    """The checked data set as uint8 images (N, 28, 28) and int64 labels: train_images,
    train_labels, test_images, test_labels. (`python main.py` downloads the files first when they
    are absent.)"""
    found = find_mnist_files(data_dir)
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise DataError(
            f"{data_dir}: missing {join_names(missing)} (.gz or not, also looked in MNIST/raw); {HOW_TO_FIX}"
        )
    arrays = {name: read_idx(found[name], *spec) for name, spec in MNIST_FILES.items()}
    return {
        "train_images": torch.from_numpy(arrays["train-images-idx3-ubyte"].copy()),
        "train_labels": torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)),
        "test_images": torch.from_numpy(arrays["t10k-images-idx3-ubyte"].copy()),
        "test_labels": torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)),
    }


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n) cut into (train, validation) index sets; the same seed gives
    the same split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def run_split(
    labels: torch.Tensor,
    val_size: int,
    seed: int,
    exclude_digit: int | None = None,
    subset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's (train, validation) indices into the 60,000 training images: the seeded split,
    without the held-out digit (--exclude-digit), training cut to its first `subset` images
    (--subset)."""
    train_idx, val_idx = split_indices(len(labels), val_size, seed)
    if exclude_digit is not None:
        keep = labels != exclude_digit
        train_idx, val_idx = train_idx[keep[train_idx]], val_idx[keep[val_idx]]
    return train_idx[:subset], val_idx


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1]."""
    return images.unsqueeze(1).float().div_(255)


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each pixel drawn as Bernoulli(intensity): dynamic binarization when called afresh for every
    batch."""
    return torch.bernoulli(x, generator=generator)


def eval_images(images: torch.Tensor, binarized: bool, device: torch.device) -> torch.Tensor:
    """uint8 images -> float images on `device` for validation and evaluation; with --binarize,
    binarized once with a fixed CPU generator, so that every run, whatever its seed or device, is
    scored on the same binary images."""
    x = to_float(images.cpu())
    if binarized:
        x = binarize(x, torch.Generator().manual_seed(BINARIZE_SEED))
    return x.to(device)


def batches(images: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    """Float batches from uint8 images held in memory; shuffled when a generator is given."""
    n = images.shape[0]
    order = (
        torch.randperm(n, generator=generator, device="cpu").to(images.device)
        if generator is not None
        else None
    )
    for i in range(0, n, batch_size):
        idx = slice(i, i + batch_size) if order is None else order[i : i + batch_size]
        yield to_float(images[idx])
