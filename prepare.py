"""A user's photo or drawing -> a 28x28 digit prepared as MNIST was made.

read_picture turns an image file into grayscale intensities; prepare_digit finds the ink on the
paper (to_ink) and crops, scales and centres it the way MNIST's digits were (mnist_like).
"""

from __future__ import annotations

import functools
import os
import stat
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from files import UserError


class ImageError(UserError):
    """A file that cannot be used as a digit image."""


# beyond this, decoding and resizing one picture takes gigabytes; a digit needs far fewer
MAX_PIXELS = 4096 * 4096
# below this a picture is nearly all border, and the border is how the background is told from the
# ink
MIN_SIDE = 8
# larger pictures are averaged down to this first: the digit ends 20 px high; time grows with pixels
WORK_SIDE = 1024
COARSE_SIDE = 64  # the paper's lighting changes slowly: it is estimated on a copy this size
PAPER_DEGREE = 3  # the paper's lighting as a polynomial of this degree in x and y
# fits of that polynomial, each leaving out what the one before found to be ink
PAPER_FIT_ROUNDS = 4
GRID_SIDE = 64  # the digit's pieces are found on a grid this size
# a piece of ink with less than this fraction of the largest piece's area is a speck, not the digit
KEEP_PIECE = 0.1
# ink differs from its paper by at least a tenth of the paper's brightness, or there is no ink
MIN_CONTRAST = 0.1
# and by this many times the paper's noise (its standard deviation), so that grain is not ink
NOISE_MARGIN = 5
# ink starts at this fraction of its strokes' contrast: half way up a blurred stroke's edge
INK_CUT = 0.5
MNIST_CENTRE = 14.0  # MNIST's digits have their centre of mass on pixel (14, 14)


def load_digit_image(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an image file: (the picture as grayscale intensities in [0, 1], upright as a viewer
    shows it; the (1, 28, 28) model input)."""
    try:
        gray = read_picture(path)
        return gray, prepare_digit(gray)
    except ImageError as err:
        raise ImageError(f"{path}: {err}") from None


def read_picture(path: str | os.PathLike) -> torch.Tensor:
    """The image file as (H, W) intensities in [0, 1]; ImageError (not naming the file) if it cannot
    be one."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        check_regular_file(path)
        with warnings.catch_warnings():
            # MAX_PIXELS is the stricter limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_picture_size(*img.size)  # from the header, before the pixels are decoded
                if getattr(img, "n_frames", 1) > 1:  # an animated GIF, a multi-page TIFF
                    name, frames = os.fsdecode(path), img.n_frames
                    print(f"note: {name} holds {frames} frames; only the first frame is used")
                # phones store the picture sideways plus a tag
                return intensities(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError(
            "a folder, not an image file; give a PNG or JPEG of a single digit"
        ) from None
    except PermissionError as err:
        raise ImageError(f"cannot read it ({err.strerror}); check its permissions") from None
    except Image.DecompressionBombError:
        raise ImageError(
            f"more than the {MAX_PIXELS:,} pixels a digit picture may have; scale it down"
        ) from None
    # what PIL raises for a damaged file
    except (UnidentifiedImageError, OSError, ValueError, EOFError) as err:
        unreadable = isinstance(err, UnidentifiedImageError)
        reason = "not an image file PIL can read" if unreadable else f"unreadable image ({err})"
        raise ImageError(f"{reason}; give a PNG or JPEG of a single digit") from None


def check_regular_file(path: str | os.PathLike) -> None:
    """A FIFO, device or socket is refused without being opened: reading one could wait forever."""
    if not isinstance(path, (str, bytes, os.PathLike)):  # an open file object: the caller chose it
        return
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder gets its own message from open()
        raise ImageError(
            "not a regular file (a pipe, device or socket); give a PNG or JPEG of a single digit"
        )


def check_picture_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{width} x {height} pixels is more than the {MAX_PIXELS:,} a digit picture may have; "
            "scale it down"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"too small: {width} x {height} pixels; give a picture at least {MIN_SIDE} pixels on "
            "each side"
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


def flatten_alpha(img):
    """Grayscale ('L') version of an 8-bit PIL image; transparent parts become the colour that
    contrasts with the ink."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32)
        lum = np.asarray(rgba.convert("L"), dtype=np.float32)
        # see-through background: lay it on white if the ink is dark, on black if light
        if alpha.min() < 255:
            opaque = alpha > 127
            ink_is_dark = lum[opaque].mean() < 128 if opaque.any() else True
            background = Image.new(
                "RGBA", rgba.size, (255, 255, 255, 255) if ink_is_dark else (0, 0, 0, 255)
            )
            return Image.alpha_composite(background, rgba).convert("L")
        return rgba.convert("L")
    return img.convert("L")


# ---------------------------------------------------------------------- from picture to model input


def prepare_digit(gray: torch.Tensor) -> torch.Tensor:
    """(H, W) intensities in [0, 1], dark ink on light paper or light on dark -> the (1, 28, 28)
    model input, made as MNIST was (see to_ink and mnist_like). ImageError if it is not such a
    picture or holds no digit."""
    gray = checked(gray)
    if is_mnist_digit(gray):  # prepared again, it would be resampled: taken as it is
        return gray[None]
    ink = to_ink(shrink(gray, WORK_SIDE))
    if ink is None:
        raise ImageError(
            "the image is empty, all one colour or plain paper, so there is no digit to find"
        )
    return mnist_like(ink)[None]


def is_mnist_digit(gray: torch.Tensor) -> bool:
    """Whether a picture is already made as MNIST's digits were: 28x28, light ink on a black
    background, its centre of mass within a pixel of MNIST_CENTRE (every MNIST image's lies within
    half a pixel)."""
    if gray.shape != (28, 28) or gray.median() > 0 or gray.sum() == 0:
        return False
    rows, cols = centre_of_mass(gray)
    return abs(rows - MNIST_CENTRE) <= 1 and abs(cols - MNIST_CENTRE) <= 1


def centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    """(row, column) of an image's centre of mass, in pixel indices."""
    total = image.sum()
    rows = (image.sum(1) * torch.arange(image.shape[0], dtype=torch.float32)).sum() / total
    cols = (image.sum(0) * torch.arange(image.shape[1], dtype=torch.float32)).sum() / total
    return rows.item(), cols.item()


def checked(gray) -> torch.Tensor:
    """gray as a float32 CPU tensor, or ImageError saying why it is not a picture prepare_digit can
    take."""
    if not isinstance(gray, torch.Tensor) or gray.ndim != 2:
        raise ImageError(
            "expected one grayscale picture of shape (H, W), got "
            f"{tuple(getattr(gray, 'shape', ()))}"
        )
    check_picture_size(gray.shape[1], gray.shape[0])
    gray = gray.detach().to("cpu", torch.float32)
    if not torch.isfinite(gray).all():
        raise ImageError("the picture holds NaN or infinite values")
    if gray.min() < 0 or gray.max() > 1:
        raise ImageError(
            f"intensities must lie in [0, 1], found {gray.min().item():g} to {gray.max().item():g}"
        )
    return gray


def shrink(image: torch.Tensor, side: int) -> torch.Tensor:
    """The (H, W) image averaged down so that its longer side is at most `side` (unchanged if it
    already is)."""
    scale = side / max(image.shape)
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    return F.interpolate(image[None, None], size=size, mode="area")[0, 0]


def to_ink(gray: torch.Tensor) -> torch.Tensor | None:
    """(H, W) intensities -> ink in [0, 1] on a 0 background, whatever the lighting; None if the
    picture has no contrast at all with its paper.

    The paper's brightness is estimated everywhere and divided out (light falls on ink and paper
    alike), so what remains is the contrast of each pixel with its own patch of paper. Ink is told
    from paper by a threshold chosen from the image (see ink_from_contrast) and by the paper's
    grain, which dividing enlarges where the light is dim."""
    # from here on the ink is brighter than the paper
    bright_ink = gray if ink_is_light(gray) else 1 - gray
    paper = paper_level(bright_ink)
    above = bright_ink - paper
    above -= above.median()  # what offset the fit left: most of the picture is paper
    # the paper's noise in intensity (MAD as a standard deviation)
    grain = 1.4826 * above.abs().median()
    # how far ink can stand out there; for dark ink, the paper's own brightness
    room = (1 - paper).clamp_min(0.05)
    contrast = (above / room).clamp(0, 1)
    floor = NOISE_MARGIN * grain / room  # contrast that grain alone reaches too rarely to matter
    # grain averaged, strokes kept
    smooth = F.avg_pool2d(contrast[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    found = smooth > floor.clamp_min(MIN_CONTRAST)
    if not found.any():
        # The grain is as strong as any stroke (noise, a grid of pictures): no clean split of ink
        # from paper. Such a picture is still a picture, to reconstruct and score (very unusual),
        # so the contrast itself is its ink; only a page with no contrast beyond its lighting (its
        # grain under MIN_CONTRAST) is empty.
        return contrast if (grain / room).median() >= MIN_CONTRAST else None
    near = near_the_digit(found)
    return ink_from_contrast(contrast, smooth, found & near, floor) * near


def ink_is_light(gray: torch.Tensor) -> bool:
    """Light ink on dark paper? The picture's edge is paper: a smooth surface fitted to it (on a
    small copy, where grain is averaged out) gives the paper's brightness everywhere, and the ink is
    the side that strays farther."""
    coarse = shrink(gray, COARSE_SIDE)
    edge = torch.ones_like(coarse, dtype=torch.bool)
    edge[1:-1, 1:-1] = False
    basis = polynomial_basis(*coarse.shape)
    coef = torch.linalg.lstsq(basis[edge.flatten()], coarse[edge][:, None]).solution
    off_paper = coarse - polynomial_surface(coef, *coarse.shape)
    return (off_paper.max() > -off_paper.min()).item()


def paper_level(bright_ink: torch.Tensor) -> torch.Tensor:
    """The paper's level under each pixel, ink left out: a smooth surface (a polynomial of degree
    PAPER_DEGREE in x and y, which a lamp's gradient and a lens's vignette are close to) fitted to a
    small copy of the picture, first to all of it, then to the half below that fit, then again and
    again to what is not well above the last fit (the ink is brighter)."""
    coarse = shrink(bright_ink, COARSE_SIDE)
    basis = polynomial_basis(*coarse.shape)
    values, paper = coarse.flatten(), torch.ones(coarse.numel(), dtype=torch.bool)
    for fit in range(PAPER_FIT_ROUNDS):
        coef = torch.linalg.lstsq(basis[paper], values[paper, None]).solution
        residual = values - (basis @ coef)[:, 0]
        # bent towards the ink: its lower half is paper even where a bold digit fills a third
        if fit == 0:
            paper = residual <= residual.median()
            continue
        centre = residual[paper].median()
        spread = 1.4826 * (residual[paper] - centre).abs().median()
        paper = residual <= centre + 3 * spread + 1e-4  # within the paper's noise, or below it
    return polynomial_surface(coef, *bright_ink.shape)


@functools.lru_cache(maxsize=4)  # the demo's canvas has one size: its basis is made once
def polynomial_basis(height: int, width: int) -> torch.Tensor:
    """(height * width, terms): x^i y^j for i + j <= PAPER_DEGREE at each pixel's centre (see
    powers). Read only."""
    y, x = powers(height), powers(width)
    return (y[:, None, :, None] * x[None, :, None, :]).reshape(height * width, *low_degree().shape)[
        :, low_degree()
    ]


def polynomial_surface(coef: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (height, width) values of the polynomial with polynomial_basis's coefficients: (y powers)
    C (x powers)."""
    c = torch.zeros(low_degree().shape)
    c[low_degree()] = coef.flatten()
    return powers(height) @ c @ powers(width).T


def low_degree() -> torch.Tensor:
    """Which of the products y^j x^i (j rows, i columns) have degree j + i <= PAPER_DEGREE."""
    k = torch.arange(PAPER_DEGREE + 1)
    return k[:, None] + k[None, :] <= PAPER_DEGREE


def powers(n: int) -> torch.Tensor:
    """(n, PAPER_DEGREE + 1): t^k at the centres of n pixels, t from -1 to 1 across them (the same
    place whatever the picture's size, so that a fit on a small copy holds for the full picture)."""
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    return t[:, None] ** torch.arange(PAPER_DEGREE + 1)


def otsu(values: torch.Tensor, bins: int = 256) -> float:
    """The threshold that best splits values into two classes (Otsu 1979: most variance between the
    classes)."""
    lo, hi = values.min().item(), values.max().item()
    if hi - lo < 1e-6:
        return lo  # one value: one class
    p = torch.histc(values, bins, lo, hi).double()
    p /= p.sum()
    centres = lo + (hi - lo) * (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    below, mean_below = p.cumsum(0), (p * centres).cumsum(0)
    between = (mean_below[-1] * below - mean_below) ** 2 / (below * (1 - below)).clamp_min(1e-12)
    # the split lies between two bins
    return centres[between.argmax()].item() + 0.5 * (hi - lo) / bins


def near_the_digit(found: torch.Tensor) -> torch.Tensor:
    """Where the digit is: the pieces of `found` that cover at least KEEP_PIECE of the largest
    piece's area, and their immediate surroundings (a stroke's soft edge), so that a speck of dust
    or grain far off does not stretch the crop. Pieces are connected on a grid of at most GRID_SIDE
    cells a side, where strokes a few pixels apart join."""
    cell = -(-max(found.shape) // GRID_SIDE)  # pixels per cell, rounded up
    occupied = F.max_pool2d(found[None, None].float(), cell, cell, ceil_mode=True)[0, 0] > 0
    piece = connected_pieces(occupied)
    # cells in each piece, by its label
    size = torch.bincount(piece[occupied], minlength=occupied.numel())
    keep = occupied & (size[piece.clamp_min(0)] >= KEEP_PIECE * size.max())
    around = F.max_pool2d(keep[None, None].float(), 3, 1, 1)[0, 0] > 0
    return around.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[
        : found.shape[0], : found.shape[1]
    ]


def connected_pieces(occupied: torch.Tensor) -> torch.Tensor:
    """Each occupied cell labelled with the smallest index among the cells of its piece
    (8-connected); -1 where empty. Every round each cell takes the smallest label around it, then
    the label its label's cell has (pointer jumping), so that a label runs along a long stroke in a
    few rounds rather than one cell per round."""
    empty = float(occupied.numel())  # larger than any index
    labels = torch.where(
        occupied, torch.arange(occupied.numel(), dtype=torch.float32).view(occupied.shape), empty
    )
    while True:
        smallest = -F.max_pool2d(-labels[None, None], 3, 1, 1)[0, 0]
        new = torch.where(occupied, smallest, empty)
        # an occupied cell's label is an occupied cell's index
        new[occupied] = new.flatten()[new[occupied].long()]
        if torch.equal(new, labels):
            return torch.where(occupied, labels.long(), -1)
        labels = new


def ink_from_contrast(
    contrast: torch.Tensor, smooth: torch.Tensor, found: torch.Tensor, floor: torch.Tensor
) -> torch.Tensor:
    """Contrast (paper 0) -> ink in [0, 1]. Otsu's threshold splits what was found into the strokes'
    soft edges and their cores; the ink's own level is the cores' median contrast, and the cut is at
    INK_CUT of it, half way up a blurred stroke's edge. MNIST's digits were binary scans averaged
    down to 20 px, so where the picture has many pixels for each of those, the cut is sharp and
    mnist_like's averaging makes the grey edges; a small picture's grey levels carry the shape, so
    there the cut widens into a plain stretch."""
    # the strokes' cores, not their edges
    level = contrast[found & (smooth >= otsu(smooth[found]))].median().item()
    cut = level * INK_CUT
    rows, cols = found.any(1).nonzero(), found.any(0).nonzero()
    pixels_per_mnist_pixel = (
        max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1).item() / 20
    )
    # 1: a plain stretch from 0 to the ink's level; towards 0: a step
    soft = min(1.0, 1 / pixels_per_mnist_pixel)
    lo = floor.clamp_min(cut * (1 - soft))
    top = (lo + 1e-3).clamp_min(cut + (level - cut) * soft)
    return ((contrast - lo) / (top - lo)).clamp(0, 1)


def mnist_like(ink: torch.Tensor) -> torch.Tensor:
    """As MNIST was made: crop to the ink, scale the longer side to 20 px keeping the aspect ratio
    (averaging pixels when shrinking, as MNIST's anti-aliasing did), and paste into 28x28 so that
    the centre of mass lands on pixel (14, 14), where MNIST's digits have it (mean 13.99 over the
    training set, in pixel indices)."""
    rows, cols = (ink > 0.05).any(1).nonzero(), (ink > 0.05).any(0).nonzero()
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    # 20 / max(h, w), unless that makes a blob of a dot
    small = resized(crop, mnist_scale(crop)).clamp(0, 1)
    cy, cx = centre_of_mass(small)
    top, left = round(MNIST_CENTRE - cy), round(MNIST_CENTRE - cx)
    out = torch.zeros(28, 28)
    y0, x0 = max(top, 0), max(left, 0)  # clip what would fall outside the 28x28 field
    y1, x1 = min(top + small.shape[0], 28), min(left + small.shape[1], 28)
    out[y0:y1, x0:x1] = small[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


# ----------------------------------------------------------------------- how large the ink is drawn

# MNIST's strokes are thin: at its 20-px size, the ink (above half intensity) of 99.9% of the
# training digits vanishes within 4 erosions by a 3x3 square, and none needs more than 5. A blob (a
# dot, a filled disc) scaled to fill the 20-px box would need 10: it is drawn smaller instead, as
# thick as MNIST's thickest strokes, so that the model sees it for what it is.
MAX_STROKE_EROSIONS = 4


def mnist_scale(crop: torch.Tensor) -> float:
    """The scale mnist_like draws the cropped ink at: its longer side to 20 px, as MNIST's digits
    were, unless its strokes would then be thicker than any of MNIST's (MAX_STROKE_EROSIONS)."""
    scale = 20 / max(crop.shape)
    return scale * min(1.0, MAX_STROKE_EROSIONS / max(1, stroke_erosions(resized(crop, scale))))


def resized(image: torch.Tensor, scale: float) -> torch.Tensor:
    """An (H, W) image scaled by `scale` (each side at least 1 pixel): averaging pixels when
    shrinking, as MNIST's anti-aliasing did, bilinear when enlarging."""
    size = [max(1, round(n * scale)) for n in image.shape]
    mode = "area" if scale < 1 else "bilinear"
    return F.interpolate(image[None, None], size=size, mode=mode)[0, 0]


def stroke_erosions(ink: torch.Tensor) -> int:
    """How many erosions by a 3x3 square the ink above half intensity takes to vanish: about half
    the width of its thickest stroke, in pixels."""
    left = F.pad((ink > 0.5).float(), (1, 1, 1, 1))[None, None]  # paper around it, to erode from
    count = 0
    while left.any():
        left = -F.max_pool2d(-left, 3, 1, 1)
        count += 1
    return count
