"""Helpers that write tiny IDX files (the MNIST container format) for the data tests.

IDX layout: a big-endian 4-byte magic number (2051 for 3-d uint8 images, 2049 for 1-d uint8 labels),
then one big-endian 4-byte size per dimension, then the uint8 values in C order.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
FILE_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(array: np.ndarray, magic: int | None = None, dims: tuple[int, ...] | None = None) -> bytes:
    """The IDX encoding of a uint8 array; magic and dims may be overridden to build broken files."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    if dims is None:
        dims = array.shape
    header = int(magic).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in dims)
    return header + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray, gz: bool | None = None, **kwargs) -> bytes:
    """Write `array` as an IDX file (gzipped when gz, or by default when the name ends in .gz); returns the uncompressed bytes."""
    path = Path(path)
    raw = idx_bytes(array, **kwargs)
    if gz is None:
        gz = path.suffix == ".gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return raw


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size), dtype=np.uint8)


def random_labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, size=(n,), dtype=np.uint8)


def write_tiny_mnist(
    folder: str | Path, n_train: int = 6, n_test: int = 4, gz: bool = True, dotted: bool = False
) -> dict[str, np.ndarray]:
    """Write all four files with structurally valid but non-canonical content; returns name -> array written."""
    folder = Path(folder)
    arrays = {
        "train-images-idx3-ubyte": random_images(n_train, seed=1),
        "train-labels-idx1-ubyte": random_labels(n_train, seed=2),
        "t10k-images-idx3-ubyte": random_images(n_test, seed=3),
        "t10k-labels-idx1-ubyte": random_labels(n_test, seed=4),
    }
    for name, array in arrays.items():
        spelled = name.replace("-idx", ".idx") if dotted else name
        write_idx(folder / (spelled + (".gz" if gz else "")), array, gz=gz)
    return arrays


def write_gzip_of_zeros(path: str | Path, head: bytes, megabytes: int) -> None:
    """A small .gz that inflates to `head` followed by `megabytes` MB of zeros: the same 1 MB gzip member repeated
    (a gzip file may hold several members, read one after the other), so writing it costs almost nothing."""
    member = gzip.compress(bytes(1 << 20))
    with open(path, "wb") as f:
        f.write(gzip.compress(head))
        for _ in range(megabytes):
            f.write(member)
