"""The MNIST files on disk: where they may lie, downloading them with torchvision, and checking
and decoding each into a uint8 array. data.load_mnist reads them through these; nothing here
knows about training."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import stat
import zlib
from pathlib import Path

import numpy as np

from files import UserError, check_path, refusal, remove_made


class DataError(UserError, ValueError):
    """MNIST is missing, unreadable or not the canonical data; the message says how to supply it."""


TEST_IMAGES = 10_000  # the size of MNIST's test set
# name -> (IDX magic number, shape, md5 of the uncompressed content)
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28), "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (2049, (60000,), "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (2051, (TEST_IMAGES, 28, 28), "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (2049, (TEST_IMAGES,), "27ae3e4e09519cfbb04c329615203637"),
}
HOW_TO_FIX = "download the four MNIST files again, or pass a folder that holds them"


def candidate_paths(data_dir: str | os.PathLike, name: str) -> list[Path]:
    """Where one file may lie: data_dir or torchvision's data_dir/MNIST/raw, as .gz or raw, spelled
    with '-idx' or '.idx'."""
    folders = [Path(data_dir), Path(data_dir) / "MNIST" / "raw"]
    spellings = [name, name.replace("-idx", ".idx")]
    return [d / (spelled + ext) for d in folders for spelled in spellings for ext in (".gz", "")]


def find_mnist_files(
    data_dir: str | os.PathLike, names: list[str] | None = None
) -> dict[str, Path | None]:
    """The first existing candidate for each of `names` (default: all four files), or None where
    there is none. A candidate that is there but is no regular file (a FIFO, a folder, a link to
    /dev/zero), or that the OS refuses, is a DataError naming it: never missing, so nothing is
    downloaded over it, and nothing waits on it."""
    how = "pass a folder that holds the MNIST files"
    try:
        check_path(data_dir, fix=how)
    except UserError as err:
        raise DataError(str(err)) from None
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"{data_dir} is a file, not a folder; {how}")
    return {name: first_candidate(data_dir, name) for name in names or MNIST_FILES}


def first_candidate(data_dir: str | os.PathLike, name: str) -> Path | None:
    for path in candidate_paths(data_dir, name):
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as err:
            raise DataError(f"{path}: {refusal(path, err)}; {HOW_TO_FIX}") from None
        if stat.S_ISREG(mode):
            return path
        kind = next(kind for test, kind in NOT_FILES if test(mode))
        raise DataError(f"{path} is {kind}, not a regular file; remove it, then {HOW_TO_FIX}")
    return None


# what a data file must not be: reading a FIFO waits for a writer, a device never ends
NOT_FILES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (lambda mode: True, "a device"),
)


def missing_files(data_dir: str | os.PathLike, names: list[str] | None = None) -> list[str]:
    """Which of `names` (default: all four files) are not in data_dir (see find_mnist_files)."""
    return [name for name, path in find_mnist_files(data_dir, names).items() if path is None]


def read_idx(path: str | os.PathLike, magic: int, shape: tuple, md5: str | None) -> np.ndarray:
    """Decode one IDX file (.gz or raw), checking its magic number, dimensions, size and md5.
    `shape` is the canonical file's: no more than its bytes are ever read or decompressed."""
    path = Path(path)

    def refused(reason: str) -> DataError:
        return DataError(f"{path}: {reason}; {HOW_TO_FIX}")

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
    if len(raw) != (promised := header + math.prod(dims)):
        raise refused(
            f"{len(raw)} bytes where its header promises {promised} (truncated or padded)"
        )
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise refused("content differs from the canonical MNIST file (md5 mismatch)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def download_mnist(folder: Path, names: list[str] | None = None) -> None:
    """Fetch the four files with torchvision (its mirrors, with progress) into folder/MNIST/raw. On
    failure (offline, say): a DataError naming those of `names` (default: all four) still missing;
    files that did not arrive whole are deleted and no empty folder is left, so the next try
    downloads again."""
    from torchvision.datasets import MNIST  # only here: reading the files needs no torchvision
    from torchvision.datasets.utils import check_integrity

    raw_dir = (folder / "MNIST" / "raw").absolute()
    made = [p for p in (raw_dir, *raw_dir.parents) if not p.exists()]  # innermost first
    print(f"{where_missing(folder)}; downloading MNIST with torchvision ...", flush=True)
    try:
        MNIST(str(folder), train=True, download=True)
    except BaseException as err:  # a Ctrl-C mid-download too: clean up, then let it end the command
        fetched = [(raw_dir / name, md5) for name, md5 in MNIST.resources]
        broken = [p for p, md5 in fetched if p.is_file() and not check_integrity(str(p), md5)]
        remove_made(made, broken)  # so that the next try downloads them again
        # torchvision wraps a failed mirror in these
        if not isinstance(err, (RuntimeError, OSError, ValueError)):
            raise
        raise DataError(download_failure(folder, err, names)) from None


def download_failure(folder: Path, err: Exception, names: list[str] | None = None) -> str:
    """One line: what is still missing, why the download failed, and how to supply the files."""
    text = " ".join(str(err).split())
    got = re.search(r"got: (.+?)(?= Tried |$)", text)  # torchvision: "Tried <mirror>, got: <error>"
    reason = got.group(1) if got else text[:160]
    wanted = names or list(MNIST_FILES)
    missing = missing_files(folder, wanted)  # the download may have fetched some before it failed
    files = f"{join_names(missing)} (.gz or not)"
    fix = f"copy {files} into a folder and pass that folder"
    if len(missing) < len(wanted):
        fix = f"copy {files} into {folder}, or pass a folder that holds all four files"
    failed = f"{where_missing(folder, wanted)}, and the download failed ({reason})"
    return f"{failed}; if you are offline, {fix}"


def where_missing(folder: Path, names: list[str] | None = None) -> str:
    missing = missing_files(folder, names)
    if len(missing) == len(names or MNIST_FILES):
        return f"MNIST is not in {folder}"
    return f"{folder}: missing {join_names(missing)}"
