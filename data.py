"""MNIST: find the four IDX files, check them, download them when absent, decode, split and batch."""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from utils import UserError


class DataError(UserError):
    """MNIST is missing, unreadable, or not the canonical data."""


# name -> (IDX magic number, shape, md5 of the uncompressed content)
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28), "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (2049, (60000,), "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28), "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (2049, (10000,), "27ae3e4e09519cfbb04c329615203637"),
}
HOW_TO_FIX = "download the four MNIST files again, or pass --data-dir pointing at a folder that holds them"


def candidate_paths(data_dir: str | os.PathLike, name: str) -> list[Path]:
    """Where one file may lie: data_dir or torchvision's data_dir/MNIST/raw, gzipped or not, '-idx' or '.idx'."""
    spellings = [name, name.replace("-idx", ".idx")]
    folders = [Path(data_dir), Path(data_dir) / "MNIST" / "raw"]
    return [folder / (spelling + ext) for folder in folders for spelling in spellings for ext in (".gz", "")]


def find_mnist_files(data_dir: str | os.PathLike) -> dict[str, Path | None]:
    """The first existing candidate for each of the four files, or None where there is none."""
    return {name: next((p for p in candidate_paths(data_dir, name) if p.is_file()), None) for name in MNIST_FILES}


def read_idx(path: str | os.PathLike, magic: int, shape: tuple[int, ...], md5: str | None) -> np.ndarray:
    """Decode one IDX file (.gz or raw) after checking its magic number, dimensions, size and content md5."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read it ({err}); {HOW_TO_FIX}") from None
    ndim = len(shape)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated ({len(raw)} bytes, shorter than its header); {HOW_TO_FIX}")
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise DataError(f"{path}: not an IDX file of this kind (magic number {found_magic}, expected {magic}); {HOW_TO_FIX}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != shape[1:]:
        raise DataError(f"{path}: dimensions {dims}, expected (N, {', '.join(map(str, shape[1:]))}); {HOW_TO_FIX}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes where its header promises {expected} (truncated or padded); {HOW_TO_FIX}")
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise DataError(f"{path}: content differs from the canonical MNIST file (md5 mismatch); {HOW_TO_FIX}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def download_mnist(data_dir: str | os.PathLike) -> None:
    """Fetch the four files with torchvision's MNIST (its mirrors, with progress) into data_dir/MNIST/raw."""
    from torchvision.datasets import MNIST

    data_dir = Path(data_dir)
    raw_dir = (data_dir / "MNIST" / "raw").absolute()
    made = [p for p in (raw_dir, *raw_dir.parents) if not p.exists()][::-1]  # folders the download will create
    print(f"MNIST not found in {data_dir}; downloading it with torchvision ...", flush=True)
    try:
        MNIST(str(data_dir), train=True, download=True)
    except (RuntimeError, OSError, ValueError) as err:  # torchvision wraps every failed mirror in RuntimeError
        for p in reversed(made):  # leave no empty folders behind
            try:
                p.rmdir()
            except OSError:
                pass
        text = " ".join(str(err).split())
        got = re.search(r"got: (.+?)(?= Tried |$)", text)  # torchvision: "... Tried <mirror>, got: <error> ..."
        reason = got.group(1) if got else text[:160]
        raise DataError(
            f"MNIST is not in {data_dir} and the download failed ({reason}); if you are offline, copy "
            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            f"t10k-labels-idx1-ubyte (.gz or not) into a folder and pass --data-dir FOLDER"
        ) from None


def load_mnist(data_dir: str | os.PathLike = "data", download: bool = True) -> dict[str, torch.Tensor]:
    """The checked data set as uint8 images (N, 28, 28) and int64 labels: train_images, train_labels, test_images, test_labels."""
    found = find_mnist_files(data_dir)
    missing = [name for name, path in found.items() if path is None]
    if missing and download:
        download_mnist(data_dir)
        found = find_mnist_files(data_dir)
        missing = [name for name, path in found.items() if path is None]
    if missing:
        raise DataError(f"{data_dir}: missing {', '.join(missing)} (.gz or not, also looked in MNIST/raw); {HOW_TO_FIX}")
    arrays = {name: read_idx(found[name], *spec) for name, spec in MNIST_FILES.items()}
    return {
        "train_images": torch.from_numpy(arrays["train-images-idx3-ubyte"].copy()),
        "train_labels": torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)),
        "test_images": torch.from_numpy(arrays["t10k-images-idx3-ubyte"].copy()),
        "test_labels": torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)),
    }


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n) cut into (train, validation) index sets; the same seed gives the same split."""
    if not 0 < val_size < n:
        raise DataError(f"--val-size must be between 1 and {n - 1}, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def run_split(config: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's (train, validation) indices into the 60,000 training images, as its config asks: the seeded split,
    without the held-out digit (--exclude-digit), training cut to --subset."""
    train_idx, val_idx = split_indices(len(labels), config["val_size"], config["seed"])
    if config.get("exclude_digit") is not None:
        keep = labels != config["exclude_digit"]
        train_idx, val_idx = train_idx[keep[train_idx]], val_idx[keep[val_idx]]
    if config.get("subset") is not None:
        train_idx = train_idx[: config["subset"]]
    return train_idx, val_idx


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1]."""
    return images.unsqueeze(1).float().div_(255)


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each pixel drawn as Bernoulli(intensity): dynamic binarization when called afresh for every batch."""
    return torch.bernoulli(x, generator=generator)


def batches(images: torch.Tensor, batch_size: int, generator: torch.Generator | None = None, start: int = 0):
    """Float batches from uint8 images held in memory; shuffled when a generator is given. Skips the first `start` batches."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator, device="cpu").to(images.device) if generator is not None else None
    for i in range(start * batch_size, n, batch_size):
        idx = slice(i, i + batch_size) if order is None else order[i : i + batch_size]
        yield to_float(images[idx])


# ----------------------------------------------------------------------------- the user's own digits


class ImageError(UserError):
    """A file that cannot be used as a digit image."""


def load_digit_image(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an image file: (the picture as grayscale intensities in [0, 1], as given; the (1, 28, 28) model input)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            gray = flatten_alpha(img)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        reason = "not an image file PIL can read" if isinstance(err, UnidentifiedImageError) else f"unreadable image ({err})"
        raise ImageError(f"{path}: {reason}; give a PNG or JPEG of a single digit") from None
    picture = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)
    ink = to_ink(picture)
    if ink is None:
        raise ImageError(f"{path}: the image is empty or all one colour, so there is no digit to find")
    return picture, mnist_like(ink)[None]


def flatten_alpha(img):
    """Grayscale ('L') version of any PIL image; transparent parts become the colour that contrasts with the ink."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32)
        lum = np.asarray(rgba.convert("L"), dtype=np.float32)
        if alpha.min() < 255:  # see-through background: lay it on white if the ink is dark, on black if light
            opaque = alpha > 127
            ink_is_dark = lum[opaque].mean() < 128 if opaque.any() else True
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if ink_is_dark else (0, 0, 0, 255))
            return Image.alpha_composite(background, rgba).convert("L")
        return rgba.convert("L")
    if img.mode in ("I", "I;16", "F"):
        arr = np.asarray(img, dtype=np.float64)
        span = arr.max() - arr.min()
        return Image.fromarray(((arr - arr.min()) / span * 255 if span else arr * 0).astype(np.uint8))
    return img.convert("L")


def to_ink(gray: torch.Tensor) -> torch.Tensor | None:
    """Intensities in [0, 1] -> ink in [0, 1] on a 0 background (inverted when the background is light); None if blank."""
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.median() > 0.5:
        gray = 1 - gray
        border = 1 - border
    background, peak = border.median(), gray.max()
    if peak - background < 0.1:
        return None
    return ((gray - background) / (peak - background)).clamp_(0, 1)


def mnist_like(ink: torch.Tensor) -> torch.Tensor:
    """As MNIST was made: crop to the ink, scale the longer side to 20 px keeping the aspect ratio, and paste
    into 28x28 so that the centre of mass lands on the centre."""
    rows, cols = (ink > 0.05).any(1).nonzero(), (ink > 0.05).any(0).nonzero()
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = crop.shape
    scale = 20 / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = torch.nn.functional.interpolate(crop[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].clamp(0, 1)
    ys, xs = torch.arange(size[0], dtype=torch.float32), torch.arange(size[1], dtype=torch.float32)
    total = small.sum()
    cy, cx = (small.sum(1) * ys).sum() / total, (small.sum(0) * xs).sum() / total
    top, left = int(round(13.5 - cy.item())), int(round(13.5 - cx.item()))
    out = torch.zeros(28, 28)
    y0, x0 = max(top, 0), max(left, 0)  # clip what would fall outside the 28x28 field
    y1, x1 = min(top + size[0], 28), min(left + size[1], 28)
    out[y0:y1, x0:x1] = small[y0 - top : y1 - top, x0 - left : x1 - left]
    return out
