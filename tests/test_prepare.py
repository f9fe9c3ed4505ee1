"""prepare.py: photos of digits on paper under uneven light, clean drawings, and hostile pictures
(huge, tiny, rotated by EXIF, damaged, odd formats). The photos are made here from a drawn digit: no
MNIST files needed, except where marked."""

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
    img = Image.new("L", size, 255)
    d = ImageDraw.Draw(img)
    w, h = size
    stroke = max(3, min(w, h) // 10)
    d.line([(w // 5, h // 6), (4 * w // 5, h // 6)], fill=0, width=stroke)
    d.line([(4 * w // 5, h // 6), (2 * w // 5, 5 * h // 6)], fill=0, width=stroke)
    return img


def one_line_image_error(path, *words: str) -> str:
    with pytest.raises(prepare.ImageError) as excinfo:
        prepare.load_digit_image(path)
    msg = str(excinfo.value)
    assert str(path) in msg and "\n" not in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


def png_claiming_size(path, width: int, height: int) -> None:
    """A small PNG whose header claims width x height pixels (its pixel data is that of a 16 x 16
    picture)."""
    seven((16, 16)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR data starts at byte 16
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # CRC of the chunk type and data
    path.write_bytes(bytes(raw))


def test_a_huge_picture_is_refused_before_decoding_and_the_size_limits_are_inclusive(tmp_path):
    """12000 x 12000 is under PIL's own bomb limit; decoding it would fail here only because the
    data is short, so the size message proves the size was checked before the pixels were read. 400
    million pixels: PIL refuses at open.
    """
    for side, words in ((12000, "12000 x 12000 pixels is more than"), (20000, "scale it down")):
        png_claiming_size(tmp_path / "huge.png", side, side)
        one_line_image_error(tmp_path / "huge.png", words, "scale it down")
    prepare.check_picture_size(4096, 4096)
    prepare.check_picture_size(prepare.MIN_SIDE, prepare.MIN_SIDE)
    for width, height in ((4097, 4096), (prepare.MIN_SIDE - 1, 100)):
        with pytest.raises(prepare.ImageError):
            prepare.check_picture_size(width, height)


@pytest.mark.parametrize("size", [(40, 1), (1, 40), (1, 1), (7, 30)])
def test_degenerate_picture_is_one_line_error(tmp_path, size):
    path = tmp_path / "thin.png"
    a = np.full(size[::-1], 255, np.uint8)
    a.flat[: a.size // 2] = 0  # ink in half of it, so that it is not merely blank
    Image.fromarray(a).save(path)
    one_line_image_error(path, f"too small: {size[0]} x {size[1]} pixels", "at least 8 pixels")


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    """A phone stores the picture sideways with a tag saying how to turn it; the digit must be read
    upright."""
    upright = seven()
    upright.save(tmp_path / "upright.jpg", quality=95)
    # tag 6: turn 90 degrees clockwise to view, so the stored pixels are the upright picture turned
    # anticlockwise
    stored = upright.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    stored.save(tmp_path / "untagged.jpg", quality=95)
    picture, x = prepare.load_digit_image(tmp_path / "tagged.jpg")
    _, want = prepare.load_digit_image(tmp_path / "upright.jpg")
    _, sideways = prepare.load_digit_image(tmp_path / "untagged.jpg")
    assert tuple(picture.shape) == (80, 60)  # height, width as a viewer shows it
    assert (x - want).abs().mean() < 0.02
    assert (sideways - want).abs().mean() > 0.05  # the test would notice a tag that is ignored


def save_as(img: Image.Image, path, kind: str) -> None:
    if kind == "png16":
        Image.fromarray(np.asarray(img, dtype=np.uint16) * 257).save(path)  # 16-bit grayscale PNG
    elif kind == "cmyk_jpeg":
        img.convert("CMYK").save(path, quality=95)
    elif kind == "animated_gif":
        img.convert("P").save(
            path, save_all=True, append_images=[Image.new("P", img.size, 0)], duration=100, loop=0
        )
    elif kind == "palette_transparent_png":
        p = img.convert("P")
        p.save(path, transparency=p.getpixel((0, 0)))  # the white background see-through
    elif kind == "float_tiff":
        Image.fromarray(np.asarray(img, dtype=np.float32) / 255, "F").save(path)


FORMATS = "png16.png cmyk_jpeg.jpg animated_gif.gif palette_transparent_png.png float_tiff.tiff"


@pytest.mark.parametrize("kind,suffix", [name.split(".") for name in FORMATS.split()])
def test_unusual_formats_give_the_same_digit(tmp_path, kind, suffix):
    seven().save(tmp_path / "plain.png")
    save_as(seven(), tmp_path / f"odd.{suffix}", kind)
    _, want = prepare.load_digit_image(tmp_path / "plain.png")
    _, x = prepare.load_digit_image(tmp_path / f"odd.{suffix}")  # the first frame of an animation
    assert (x - want).abs().mean() < 0.02


def test_files_that_are_not_pictures_are_one_line_each(tmp_path, monkeypatch):
    """A float TIFF holding NaN or infinity; a PNG whose header is whole (open succeeds) but whose
    pixel data is cut; an empty file, a folder, and a file that cannot be read."""
    for bad in ("nan", "inf"):
        a = np.asarray(seven(), dtype=np.float32) / 255
        a[3, 3] = float(bad)
        Image.fromarray(a, "F").save(tmp_path / f"{bad}.tiff")
        one_line_image_error(tmp_path / f"{bad}.tiff", "NaN or infinite")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(
        tmp_path / "cut.png"
    )
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
    the negative of that."""
    ink = np.zeros((240, 320), np.float32)
    ink[30:198, 140:308] = (
        np.asarray(Image.fromarray(np.uint8(digit.numpy() * 255)).resize((168, 168))) / 255
    )
    if speck:
        ink[200:206, 10:16] = 1  # a fleck of dirt in the far corner
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


@pytest.mark.parametrize(
    "light_ink", [False, True], ids=["dark ink on light paper", "light ink on dark paper"]
)
def test_a_photo_under_uneven_light_prepares_close_to_its_digit(light_ink):
    digit = clean_seven()
    gray = photo(digit, light_ink=light_ink)
    # a 1-pixel shift costs about 0.04
    assert (prepare.prepare_digit(gray)[0] - digit).abs().mean() < 0.06
    # the dim side of the paper was taken for ink
    assert (border_median_way(gray) - digit).abs().mean() > 0.1


def test_a_speck_far_from_the_digit_does_not_shrink_it(monkeypatch):
    digit = clean_seven()
    assert (prepare.prepare_digit(photo(digit, speck=True))[0] - digit).abs().mean() < 0.06
    # keep every piece
    monkeypatch.setattr(prepare, "near_the_digit", lambda found: torch.ones_like(found))
    # the test can fail
    assert (prepare.prepare_digit(photo(digit, speck=True))[0] - digit).abs().mean() > 0.08


def test_an_upsampled_digit_prepares_to_itself():
    """A clean scan or the demo's canvas: the digit 10x larger, dark on white, gives back the same
    28x28."""
    digit = clean_seven()
    big = torch.nn.functional.interpolate(digit[None, None], size=(280, 280), mode="bilinear")[0, 0]
    assert (prepare.prepare_digit(1 - big)[0] - digit).abs().mean() < 0.02


@needs_mnist
def test_upsampled_mnist_digits_prepare_to_themselves():
    digits = data.to_float(data.load_mnist(MNIST_DIR)["train_images"][:20])
    big = 1 - torch.nn.functional.interpolate(digits, size=(280, 280), mode="bilinear")
    prepared = torch.stack([prepare.prepare_digit(gray[0]) for gray in big])
    assert (prepared - digits).abs().mean() < 0.035


def canvas_with_seven() -> torch.Tensor:
    """White strokes on black, 280 x 280, as the browser demo's canvas gives them."""
    return 1 - torch.from_numpy(np.asarray(seven((280, 280)), dtype=np.float32) / 255)


def test_prepare_digit_is_what_load_digit_image_does(tmp_path):
    gray = canvas_with_seven()
    Image.fromarray((gray.numpy() * 255).round().astype(np.uint8)).save(tmp_path / "canvas.png")
    picture, x = prepare.load_digit_image(tmp_path / "canvas.png")
    assert torch.equal(picture, gray)
    assert torch.equal(prepare.prepare_digit(gray), x)
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


@pytest.mark.parametrize(
    "gray,words",
    [
        (torch.zeros(280, 280), "no digit"),
        (torch.full((240, 320), 0.6), "no digit"),
        (photo(torch.zeros(28, 28)), "no digit"),  # a page lit unevenly, with nothing written on it
        (torch.full((280, 280), float("nan")), "NaN or infinite"),
        (canvas_with_seven().index_fill(0, torch.tensor([5]), float("inf")), "NaN or infinite"),
        (canvas_with_seven() * 255, "[0, 1]"),
        (canvas_with_seven() - 0.5, "[0, 1]"),
        (canvas_with_seven()[None], "shape (H, W)"),
        (canvas_with_seven()[0], "shape (H, W)"),
        (canvas_with_seven().numpy(), "shape (H, W)"),
        (torch.ones(4, 280), "too small: 280 x 4 pixels"),
    ],
    ids=[
        "blank",
        "grey",
        "lit page",
        "nan",
        "inf",
        "0-255",
        "negative",
        "3-d",
        "1-d",
        "numpy",
        "thin",
    ],
)
def test_prepare_digit_refuses_what_is_not_a_picture(gray, words):
    with pytest.raises(prepare.ImageError) as excinfo:
        prepare.prepare_digit(gray)
    assert words in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_a_dot_is_drawn_no_thicker_than_mnist_strokes_and_a_digit_still_fills_20_pixels():
    dot, seven = (drawings.draw(lines) for lines in ([[(140, 140)]], drawings.DIGITS["digit 7"]))
    dot, seven = prepare.prepare_digit(dot)[0], prepare.prepare_digit(seven)[0]
    assert 0 < prepare.stroke_erosions(dot) <= prepare.MAX_STROKE_EROSIONS < 10  # 10: a 20-px disc
    assert seven.gt(0.05).any(1).sum() == 20
