"""A user's own picture of a digit -> the 28x28 input the model takes, prepared as MNIST digits were made.

read_picture(path)  the file as (H, W) grey intensities, upright, its size checked before decoding
prepare_digit(gray) ink separated from the background, cropped, scaled to 20 px and centred by mass in 28x28
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from files import UserError


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
        reason = (
            "not an image file PIL can read" if isinstance(err, UnidentifiedImageError) else f"unreadable image ({err})"
        )
        raise ImageError(f"{reason}; give a PNG or JPEG of a single digit") from None


def check_picture_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{width} x {height} pixels is more than the {MAX_PIXELS:,} a digit picture may have; scale it down"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"too small: {width} x {height} pixels; give a picture at least {MIN_SIDE} pixels on each side"
        )


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
    small = torch.nn.functional.interpolate(
        crop[None, None], size=size, mode="bilinear", antialias=True, align_corners=False
    )[0, 0].clamp(0, 1)
    ys, xs = torch.arange(size[0], dtype=torch.float32), torch.arange(size[1], dtype=torch.float32)
    total = small.sum()
    cy, cx = (small.sum(1) * ys).sum() / total, (small.sum(0) * xs).sum() / total
    top, left = int(round(13.5 - cy.item())), int(round(13.5 - cx.item()))
    out = torch.zeros(28, 28)
    y0, x0 = max(top, 0), max(left, 0)  # clip what would fall outside the 28x28 field
    y1, x1 = min(top + size[0], 28), min(left + size[1], 28)
    out[y0:y1, x0:x1] = small[y0 - top : y1 - top, x0 - left : x1 - left]
    return out
