"""MNIST: find the four IDX files, check them, download them when absent, decode, split and batch."""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import warnings
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
BINARIZE_SEED = 0  # --binarize: the one fixed draw of the evaluation images, the same for every --seed and device
HOW_TO_FIX = "download the four MNIST files again, or pass --data-dir pointing at a folder that holds them"


def candidate_paths(data_dir: str | os.PathLike, name: str) -> list[Path]:
    """Where one file may lie: data_dir or torchvision's data_dir/MNIST/raw, gzipped or not, '-idx' or '.idx'."""
    spellings = [name, name.replace("-idx", ".idx")]
    folders = [Path(data_dir), Path(data_dir) / "MNIST" / "raw"]
    return [folder / (spelling + ext) for folder in folders for spelling in spellings for ext in (".gz", "")]


def find_mnist_files(data_dir: str | os.PathLike) -> dict[str, Path | None]:
    """The first existing candidate for each of the four files, or None where there is none."""
    return {name: next((p for p in candidate_paths(data_dir, name) if p.is_file()), None) for name in MNIST_FILES}


def missing_files(data_dir: str | os.PathLike) -> list[str]:
    return [name for name, path in find_mnist_files(data_dir).items() if path is None]


def read_idx(path: str | os.PathLike, magic: int, shape: tuple[int, ...], md5: str | None) -> np.ndarray:
    """Decode one IDX file (.gz or raw) after checking its magic number, dimensions, size and content md5.
    `shape` is the canonical file's: no more than its bytes are ever read or decompressed."""
    path = Path(path)
    ndim = len(shape)
    header = 4 + 4 * ndim
    limit = header + math.prod(shape)
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read(limit + 1)  # one byte more tells a larger file (or a gzip bomb) without inflating it
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read it ({err}); {HOW_TO_FIX}") from None
    if len(raw) < header:
        raise DataError(f"{path}: truncated ({len(raw)} bytes, shorter than its header); {HOW_TO_FIX}")
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise DataError(f"{path}: not an IDX file of this kind (magic number {found_magic}, expected {magic}); {HOW_TO_FIX}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != shape[1:]:
        raise DataError(f"{path}: dimensions {dims}, expected (N, {', '.join(map(str, shape[1:]))}); {HOW_TO_FIX}")
    if len(raw) > limit:
        raise DataError(f"{path}: larger than the {limit:,} bytes an MNIST file of this kind holds (uncompressed); {HOW_TO_FIX}")
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes where its header promises {expected} (truncated or padded); {HOW_TO_FIX}")
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise DataError(f"{path}: content differs from the canonical MNIST file (md5 mismatch); {HOW_TO_FIX}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def download_mnist(data_dir: str | os.PathLike) -> None:
    """Fetch the four files with torchvision's MNIST (its mirrors, with progress) into data_dir/MNIST/raw."""
    from torchvision.datasets import MNIST

    data_dir = Path(data_dir)
    raw_dir = (data_dir / "MNIST" / "raw").absolute()
    made = [p for p in (raw_dir, *raw_dir.parents) if not p.exists()][::-1]  # folders the download will create
    print(f"{where_missing(data_dir)}; downloading MNIST with torchvision ...", flush=True)
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
        missing = missing_files(data_dir)  # the download may have fetched some before it failed
        names = f"{join_names(missing)} (.gz or not)"
        fix = (f"copy {names} into a folder and pass --data-dir FOLDER" if len(missing) == len(MNIST_FILES)
               else f"copy {names} into {data_dir}, or pass --data-dir FOLDER holding all four files")
        raise DataError(f"{where_missing(data_dir)}, and the download failed ({reason}); if you are offline, {fix}") from None


def where_missing(data_dir: Path) -> str:
    missing = missing_files(data_dir)
    return f"MNIST is not in {data_dir}" if len(missing) == len(MNIST_FILES) else f"{data_dir}: missing {join_names(missing)}"


def load_mnist(data_dir: str | os.PathLike = "data", download: bool = True) -> dict[str, torch.Tensor]:
    """The checked data set as uint8 images (N, 28, 28) and int64 labels: train_images, train_labels, test_images, test_labels."""
    if download and missing_files(data_dir):
        download_mnist(data_dir)
    found = find_mnist_files(data_dir)
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise DataError(f"{data_dir}: missing {join_names(missing)} (.gz or not, also looked in MNIST/raw); {HOW_TO_FIX}")
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


def eval_images(images: torch.Tensor, binarized: bool, device: torch.device) -> torch.Tensor:
    """uint8 images -> float images on `device` for validation and evaluation; with --binarize, binarized once with a
    fixed CPU generator, so that every run, whatever its seed or device, is scored on the same binary images."""
    x = to_float(images.cpu())
    if binarized:
        x = binarize(x, torch.Generator().manual_seed(BINARIZE_SEED))
    return x.to(device)


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


MAX_PIXELS = 4096 * 4096  # beyond this, decoding and resizing one picture takes gigabytes; a digit needs far fewer
MIN_SIDE = 8  # below this a picture is nearly all border, and the border is how the background is told from the ink


def load_digit_image(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an image file: (the picture as grayscale intensities in [0, 1], upright as a viewer shows it;
    the (1, 28, 28) model input)."""
    try:
        gray = read_picture(path)
        return gray, prepare_digit(gray)
    except ImageError as err:
        raise ImageError(f"{path}: {err}") from None


def read_picture(path: str | os.PathLike) -> torch.Tensor:
    """The image file as (H, W) intensities in [0, 1]; ImageError (not naming the file) if it cannot be one."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is the stricter limit
            with Image.open(path) as img:
                check_picture_size(*img.size)  # from the header, before the pixels are decoded
                return intensities(ImageOps.exif_transpose(img))  # phones store the picture sideways plus a tag
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("a folder, not an image file; give a PNG or JPEG of a single digit") from None
    except PermissionError as err:
        raise ImageError(f"cannot read it ({err.strerror}); check its permissions") from None
    except Image.DecompressionBombError:
        raise ImageError(f"more than the {MAX_PIXELS:,} pixels a digit picture may have; scale it down") from None
    except (UnidentifiedImageError, OSError, ValueError, EOFError) as err:  # what PIL raises for a damaged file
        reason = "not an image file PIL can read" if isinstance(err, UnidentifiedImageError) else f"unreadable image ({err})"
        raise ImageError(f"{reason}; give a PNG or JPEG of a single digit") from None


def check_picture_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(f"{width} x {height} pixels is more than the {MAX_PIXELS:,} a digit picture may have; scale it down")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"too small: {width} x {height} pixels; give a picture at least {MIN_SIDE} pixels on each side")


def intensities(img) -> torch.Tensor:
    """Any PIL image -> (H, W) float intensities in [0, 1]."""
    if img.mode.startswith("I;16"):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 65535)
    if img.mode in ("I", "F"):  # no fixed white level: stretch what is there to [0, 1]
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("the picture holds NaN or infinite values")
        span = arr.max() - arr.min()
        return torch.from_numpy(((arr - arr.min()) / span if span else arr * 0).astype(np.float32))
    return torch.from_numpy(np.asarray(flatten_alpha(img), dtype=np.float32) / 255)


def prepare_digit(gray: torch.Tensor) -> torch.Tensor:
    """(H, W) intensities in [0, 1], dark ink on light or light on dark -> the (1, 28, 28) model input, made as
    MNIST was (see to_ink and mnist_like). ImageError if it is not such a picture or holds no digit."""
    if not isinstance(gray, torch.Tensor) or gray.ndim != 2:
        raise ImageError(f"expected one grayscale picture of shape (H, W), got {tuple(getattr(gray, 'shape', ()))}")
    check_picture_size(gray.shape[1], gray.shape[0])
    gray = gray.detach().to("cpu", torch.float32)
    if not torch.isfinite(gray).all():
        raise ImageError("the picture holds NaN or infinite values")
    if gray.min() < 0 or gray.max() > 1:
        raise ImageError(f"intensities must lie in [0, 1], found {gray.min().item():g} to {gray.max().item():g}")
    ink = to_ink(gray)
    if ink is None:
        raise ImageError("the image is empty or all one colour, so there is no digit to find")
    return mnist_like(ink)[None]


def flatten_alpha(img):
    """Grayscale ('L') version of an 8-bit PIL image; transparent parts become the colour that contrasts with the ink."""
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
