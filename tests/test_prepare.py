"""prepare.py: photos of digits on paper under uneven light, clean drawings, noise, and hostile
pictures (huge, tiny, rotated by EXIF, damaged, odd formats). The photos are made here from a drawn
digit: no MNIST files needed, except where marked."""

from __future__ import annotations

import errno
import io
import zlib

import numpy as np
import pytest
import torch
from helpers import MNIST_DIR, needs_mnist
from PIL import Image, ImageDraw, ImageFilter

import data
import prepare
from benchmarks import drawings


def seven(size=(60, 80)) -> Image.Image:
    """A dark '7' on white, upright: no rotation or mirror of it looks the same."""
    img, (w, h) = Image.new("L", size, 255), size
    stroke = max(3, min(w, h) // 10)
    ImageDraw.Draw(img).line([(w // 5, h // 6), (4 * w // 5, h // 6)], fill=0, width=stroke)
    ImageDraw.Draw(img).line([(4 * w // 5, h // 6), (2 * w // 5, 5 * h // 6)], fill=0, width=stroke)
    return img


def one_line_image_error(path, *words: str) -> None:
    with pytest.raises(prepare.ImageError) as excinfo:
        prepare.load_digit_image(path)
    msg = str(excinfo.value)
    assert str(path) in msg and "\n" not in msg and all(w in msg for w in words), msg


def png_claiming_size(path, width: int, height: int) -> None:
    """A 16 x 16 PNG whose header claims width x height pixels."""
    seven((16, 16)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR data starts at byte 16
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # CRC of the chunk type and data
    path.write_bytes(bytes(raw))


# the size a PNG's header claims, and what its refusal says; 12000 x 12000 is under PIL's own bomb
# limit, 20000 x 20000 over it (PIL refuses at open)
SIZES = {"12000 x 12000": "12000 x 12000 pixels is more than", "20000 x 20000": "scale it down"}
SIZES |= {
    size: f"too small: {size} pixels; give" for size in ("40 x 1", "1 x 40", "1 x 1", "7 x 30")
}


@pytest.mark.parametrize("size", SIZES)
def test_a_picture_too_large_or_too_small_is_refused_from_its_header(tmp_path, size):
    """The file holds 16 x 16 pixels: the size is checked before they are decoded."""
    png_claiming_size(tmp_path / "p.png", *map(int, size.split(" x ")))
    one_line_image_error(tmp_path / "p.png", SIZES[size])
    prepare.check_picture_size(4096, 4096)  # the limits are inclusive
    prepare.check_picture_size(prepare.MIN_SIDE, prepare.MIN_SIDE)
    for width, height in ((4097, 4096), (prepare.MIN_SIDE - 1, 100)):
        pytest.raises(prepare.ImageError, prepare.check_picture_size, width, height)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    """A phone stores the picture sideways with a tag saying how to turn it; the digit must be read
    upright (tag 6: turn 90 degrees clockwise to view, so the pixels are stored anticlockwise)."""
    seven().save(tmp_path / "upright.jpg", quality=95)
    turn = Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    exif = Image.Exif()
    exif[0x0112] = orientation
    seven().transpose(turn).save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    seven().transpose(turn).save(tmp_path / "untagged.jpg", quality=95)
    picture, x = prepare.load_digit_image(tmp_path / "tagged.jpg")
    (_, want), (_, sideways) = (
        prepare.load_digit_image(tmp_path / n) for n in ("upright.jpg", "untagged.jpg")
    )
    assert tuple(picture.shape) == (80, 60)  # height, width as a viewer shows it
    assert (x - want).abs().mean() < 0.02
    assert (sideways - want).abs().mean() > 0.05  # the test would notice a tag that is ignored


def see_through_paper(img: Image.Image, path) -> None:
    img.save(path, transparency=img.getpixel((0, 0)))  # the white paper's palette entry


SAVERS = {  # one unusual way to store the same digit each
    "png16.png": lambda img, p: Image.fromarray(np.asarray(img, dtype=np.uint16) * 257).save(p),
    "cmyk.jpg": lambda img, p: img.convert("CMYK").save(p, quality=95),
    "animated.gif": lambda img, p: img.convert("P").save(
        p, save_all=True, append_images=[Image.new("P", img.size, 0)], duration=100, loop=0
    ),
    "palette_transparent.png": lambda img, p: see_through_paper(img.convert("P"), p),
    "float.tiff": lambda img, p: Image.fromarray(np.asarray(img, np.float32) / 255, "F").save(p),
}


@pytest.mark.parametrize("name", SAVERS)
def test_unusual_formats_give_the_same_digit(tmp_path, name):
    seven().save(tmp_path / "plain.png")
    SAVERS[name](seven(), tmp_path / name)
    _, want = prepare.load_digit_image(tmp_path / "plain.png")
    _, x = prepare.load_digit_image(tmp_path / name)  # the first frame of an animation
    assert (x - want).abs().mean() < 0.02


def test_files_that_are_not_pictures_are_one_line_each(tmp_path, monkeypatch):
    """A float TIFF holding NaN or infinity; a PNG whose header is whole (open succeeds) but whose
    pixel data is cut; an empty file, a folder, and a file that cannot be read."""
    for bad in ("nan", "inf"):
        a = np.asarray(seven(), dtype=np.float32) / 255
        a[3, 3] = float(bad)
        Image.fromarray(a, "F").save(tmp_path / f"{bad}.tiff")
        one_line_image_error(tmp_path / f"{bad}.tiff", "NaN or infinite")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:-200])
    one_line_image_error(tmp_path / "cut.png", "unreadable image")
    (tmp_path / "empty.png").write_bytes(b"")
    one_line_image_error(tmp_path / "empty.png", "not an image file")
    (tmp_path / "dir.png").mkdir()
    one_line_image_error(tmp_path / "dir.png", "a folder, not an image file")

    def denied(path, *args, **kwargs):  # as root, a file without read permission can still be read
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)
    (tmp_path / "secret.png").write_bytes(b"\x89PNG")
    one_line_image_error(tmp_path / "secret.png", "Permission denied", "permissions")


def clean_seven() -> torch.Tensor:
    """A 28x28 '7', light on dark, made as MNIST's digits were."""
    return prepare.mnist_like(1 - torch.from_numpy(np.asarray(seven((200, 260)), np.float32) / 255))


def photo(digit: torch.Tensor, light_ink: bool = False, speck: bool = False) -> torch.Tensor:
    """The digit written in dark ink, 6x larger, on the right of a 320 x 240 sheet lit by a lamp on
    the left (the light falls by 60% across it), blurred, noisy, read back from a JPEG; light_ink:
    the negative of that; speck: a fleck of dirt in the far corner."""
    ink = np.zeros((240, 320), np.float32)
    big = Image.fromarray(np.uint8(digit.numpy() * 255)).resize((168, 168))
    ink[30:198, 140:308] = np.asarray(big) / 255
    ink[200:206, 10:16] = 1 if speck else 0
    scene = (0.9 - 0.75 * ink) * (1 - 0.6 * np.linspace(0, 1, 320, dtype=np.float32))
    scene = 1 - scene if light_ink else scene
    noisy = np.clip(scene * 255 + np.random.default_rng(0).normal(0, 4, scene.shape), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(np.uint8(noisy)).filter(ImageFilter.GaussianBlur(1.2)).save(
        buf, "JPEG", quality=75
    )
    return prepare.read_picture(buf)


def border_median_way(gray: torch.Tensor) -> torch.Tensor:
    """A plain preparation to compare with: the border's median is the background, the rest is
    stretched."""
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    gray, border = (1 - gray, 1 - border) if border.median() > 0.5 else (gray, border)
    return prepare.mnist_like(
        ((gray - border.median()) / (gray.max() - border.median())).clamp(0, 1)
    )


@pytest.mark.parametrize("light_ink", [False, True], ids=["dark ink", "light ink"])
def test_a_photo_under_uneven_light_prepares_close_to_its_digit(light_ink):
    digit = clean_seven()
    gray = photo(digit, light_ink=light_ink)
    assert (prepare.prepare_digit(gray)[0] - digit).abs().mean() < 0.06  # a 1-pixel shift: 0.04
    # the plain way takes the dim side of the paper for ink
    assert (border_median_way(gray) - digit).abs().mean() > 0.1


def test_a_speck_far_from_the_digit_does_not_shrink_it(monkeypatch):
    digit = clean_seven()
    assert (prepare.prepare_digit(photo(digit, speck=True))[0] - digit).abs().mean() < 0.06
    # keeping every piece, the test fails
    monkeypatch.setattr(prepare, "near_the_digit", lambda found: torch.ones_like(found))
    assert (prepare.prepare_digit(photo(digit, speck=True))[0] - digit).abs().mean() > 0.08


@pytest.mark.parametrize("source", ["seven", pytest.param("mnist", marks=needs_mnist)])
def test_an_upsampled_digit_prepares_to_itself(source):
    """A clean scan or the demo's canvas: a 7 or 20 MNIST digits, 10x larger, dark on white."""
    digits = clean_seven()[None, None]
    if source == "mnist":
        digits = data.to_float(data.load_mnist(MNIST_DIR)["train_images"][:20])
    big = 1 - torch.nn.functional.interpolate(digits, size=(280, 280), mode="bilinear")
    prepared = torch.stack([prepare.prepare_digit(gray[0]) for gray in big])
    assert (prepared - digits).abs().mean() < (0.035 if source == "mnist" else 0.02)


def canvas_with_seven() -> torch.Tensor:
    """White strokes on black, 280 x 280, as the browser demo's canvas gives them."""
    return 1 - torch.from_numpy(np.asarray(seven((280, 280)), dtype=np.float32) / 255)


def test_prepare_digit_is_what_load_digit_image_does(tmp_path):
    gray = canvas_with_seven()
    Image.fromarray((gray.numpy() * 255).round().astype(np.uint8)).save(tmp_path / "canvas.png")
    picture, x = prepare.load_digit_image(tmp_path / "canvas.png")
    assert torch.equal(picture, gray) and torch.equal(prepare.prepare_digit(gray), x)
    # light ink on a dark background
    assert x.shape == (1, 28, 28) and x[0, :3].max() < 0.05 and x.max() > 0.9


def test_prepare_digit_one_pixel_stroke():
    """A perfectly straight '1' one pixel wide: scaled to 20 pixels high, centred."""
    gray = torch.zeros(280, 280)
    gray[40:240, 100] = 1
    x = prepare.prepare_digit(gray)[0]
    rows, cols = (x > 0.05).any(1).nonzero(), (x > 0.05).any(0).nonzero()
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 <= 2
    assert abs((x.sum(0) * torch.arange(28.0)).sum() / x.sum() - prepare.MNIST_CENTRE) <= 0.5


def uniform_noise(side: int = 100) -> torch.Tensor:
    return torch.rand(side, side, generator=torch.Generator().manual_seed(0))


REFUSED = {  # what is not a picture of a digit, and what its one line says
    "blank": (lambda: torch.zeros(280, 280), "empty"),
    "grey": (lambda: torch.full((240, 320), 0.6), "empty"),
    "lit page": (lambda: photo(torch.zeros(28, 28)), "empty"),  # lit unevenly, nothing written
    "nan": (lambda: torch.full((280, 280), float("nan")), "NaN or infinite"),
    "inf": (lambda: canvas_with_seven().index_fill(0, torch.tensor([5]), float("inf")), "NaN or"),
    "0-255": (lambda: canvas_with_seven() * 255, "[0, 1]"),
    "negative": (lambda: canvas_with_seven() - 0.5, "[0, 1]"),
    "3-d": (lambda: canvas_with_seven()[None], "shape (H, W)"),
    "1-d": (lambda: canvas_with_seven()[0], "shape (H, W)"),
    "numpy": (lambda: canvas_with_seven().numpy(), "shape (H, W)"),
    "thin": (lambda: torch.ones(4, 280), "too small: 280 x 4 pixels"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_prepare_digit_refuses_what_is_not_a_picture(name):
    make, words = REFUSED[name]
    with pytest.raises(prepare.ImageError) as excinfo:
        prepare.prepare_digit(make())
    assert words in str(excinfo.value) and "\n" not in str(excinfo.value)


@pytest.mark.parametrize("contrast", [1.0, 0.3])
def test_noise_without_a_clean_split_of_ink_from_paper_is_prepared_not_called_empty(contrast):
    """Uniform random pixels, at full contrast and at 0.3 on grey paper: the picture is no digit,
    but it is one to reconstruct and score (very unusual), and its ink is spread over the field."""
    x = prepare.prepare_digit(0.5 + (uniform_noise() - 0.5) * contrast)[0]
    assert x.gt(0.05).sum() > 200 and x.max() <= 1 and not torch.equal(x, x.flip(0))
    with pytest.raises(prepare.ImageError, match="empty"):  # grain that weak is paper
        prepare.prepare_digit(0.8 + (uniform_noise() - 0.5) * 0.05)


def test_a_dot_is_drawn_no_thicker_than_mnist_strokes_and_a_digit_still_fills_20_pixels():
    dot, seven = (drawings.draw(lines) for lines in ([[(140, 140)]], drawings.DIGITS["digit 7"]))
    dot, seven = prepare.prepare_digit(dot)[0], prepare.prepare_digit(seven)[0]
    assert 0 < prepare.stroke_erosions(dot) <= prepare.MAX_STROKE_EROSIONS < 10  # 10: a 20-px disc
    assert seven.gt(0.05).any(1).sum() == 20
