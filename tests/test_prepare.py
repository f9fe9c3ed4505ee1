"""prepare.py: photos under uneven light, drawings, noise, hostile pictures, made from a drawn 7."""

import errno
import io
import zlib
from unittest.mock import Mock

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
    img, (w, h), stroke = Image.new("L", size, 255), size, max(3, min(size) // 10)
    ImageDraw.Draw(img).line([(w // 5, h // 6), (4 * w // 5, h // 6)], fill=0, width=stroke)
    ImageDraw.Draw(img).line([(4 * w // 5, h // 6), (2 * w // 5, 5 * h // 6)], fill=0, width=stroke)
    return img


# a 28x28 7 made as MNIST's digits were; a 7 as the browser demo's canvas gives it (light on black)
CLEAN_SEVEN = prepare.mnist_like(1 - torch.tensor(np.asarray(seven((200, 260)), np.float32)) / 255)
CANVAS = 1 - torch.tensor(np.asarray(seven((280, 280)), np.float32)) / 255
NOISE = torch.rand(100, 100, generator=torch.Generator().manual_seed(0))  # uniform, in [0, 1)
UPRIGHT = prepare.prepare_digit(torch.tensor(np.asarray(seven(), np.float32)) / 255)  # seven()'s


def one_line_image_error(path, *words: str) -> None:
    with pytest.raises(prepare.ImageError) as excinfo:
        prepare.load_digit_image(path)
    msg = str(excinfo.value)
    assert str(path) in msg and "\n" not in msg and all(w in msg for w in words), msg


# a PNG header's size, and what its refusal says (20000 x 20000 is over PIL's own limit too); at the
# limits (they are inclusive) the size is taken, and the 16 x 16 pixels under it are unreadable
SIZES = {s: f"{s} pixels is more than" for s in ("12000 x 12000", "4097 x 4096")}
SIZES |= {s: f"too small: {s} pixels; give" for s in ("40 x 1", "1 x 40", "1 x 1", "7 x 30")}
SIZES |= {s: "unreadable image" for s in ("4096 x 4096", "8 x 100", "100 x 8")}
SIZES["20000 x 20000"] = "scale it down"


@pytest.mark.parametrize("size", SIZES)
def test_a_picture_too_large_or_too_small_is_refused_from_its_header(tmp_path, size):
    """The file holds 16 x 16 pixels: the size is checked before they are decoded."""
    seven((16, 16)).save(tmp_path / "p.png")
    raw, (width, height) = bytearray((tmp_path / "p.png").read_bytes()), map(int, size.split(" x "))
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR data starts at byte 16
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # CRC of the chunk type and data
    (tmp_path / "p.png").write_bytes(bytes(raw))
    one_line_image_error(tmp_path / "p.png", SIZES[size])


@pytest.mark.parametrize("tag,angle", [(6, 90), (8, 270)])
def test_exif_orientation_is_applied(tmp_path, tag, angle):
    """A phone stores a picture sideways with a tag saying how to turn it (6: 90 degrees right)."""
    exif = Image.Exif()
    exif[0x0112] = tag
    seven().rotate(angle, expand=True).save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    seven().rotate(angle, expand=True).save(tmp_path / "untagged.jpg", quality=95)
    picture, x = prepare.load_digit_image(tmp_path / "tagged.jpg")
    _, sideways = prepare.load_digit_image(tmp_path / "untagged.jpg")
    assert picture.shape == (80, 60) and (x - UPRIGHT).abs().mean() < 0.02  # as a viewer sees it
    assert (sideways - UPRIGHT).abs().mean() > 0.05  # the test would notice a tag that is ignored


SAVERS = {  # one unusual way to store the same digit each
    "png16.png": lambda img, p: Image.fromarray(np.asarray(img, dtype=np.uint16) * 257).save(p),
    "cmyk.jpg": lambda img, p: img.convert("CMYK").save(p, quality=95),
    "animated.gif": lambda img, p: img.save(p, save_all=True, append_images=[img.rotate(90)]),
    "palette_transparent.png": lambda img, p: img.convert("P").save(p, transparency=255),  # paper
    "float.tiff": lambda img, p: Image.fromarray(np.asarray(img, np.float32) / 255, "F").save(p),
}


@pytest.mark.parametrize("name", SAVERS)
def test_unusual_formats_give_the_same_digit(tmp_path, name):
    SAVERS[name](seven(), tmp_path / name)
    _, x = prepare.load_digit_image(tmp_path / name)  # the first frame of an animation
    assert (x - UPRIGHT).abs().mean() < 0.02


def test_files_that_are_not_pictures_are_one_line_each(tmp_path, monkeypatch):
    """A float TIFF with NaN or infinity, a PNG cut after its header, empty, a folder, no access."""
    for bad in ("nan", "inf"):
        one_bad_pixel = np.pad(np.float32([[float(bad)]]), 31, constant_values=0.5)
        Image.fromarray(one_bad_pixel, "F").save(tmp_path / f"{bad}.tiff")
        one_line_image_error(tmp_path / f"{bad}.tiff", "NaN or infinite")
    Image.fromarray(np.uint8(NOISE.numpy() * 255)).save(tmp_path / "cut.png")  # incompressible
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:-200])
    one_line_image_error(tmp_path / "cut.png", "unreadable image")
    (tmp_path / "empty.png").write_bytes(b"")
    one_line_image_error(tmp_path / "empty.png", "not an image file")
    (tmp_path / "dir.png").mkdir()
    one_line_image_error(tmp_path / "dir.png", "a folder, not an image file")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG")  # unreadable (root could read it anyway):
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "secret.png"))
    monkeypatch.setattr(Image, "open", Mock(side_effect=denied))
    one_line_image_error(tmp_path / "secret.png", "Permission denied", "permissions")


def photo(digit: torch.Tensor, light_ink: bool = False, speck: bool = False) -> torch.Tensor:
    """A JPEG photo of the digit in dark ink on paper lit from the left; light_ink: its negative."""
    big = Image.fromarray(np.uint8(digit.numpy() * 255)).resize((168, 168))
    ink = np.pad(np.asarray(big, np.float32) / 255, ((30, 42), (140, 12)))  # 240 x 320
    ink[200:206, 10:16] = 1 if speck else 0
    scene = (0.9 - 0.75 * ink) * (1 - 0.6 * np.linspace(0, 1, 320, dtype=np.float32))
    scene = 1 - scene if light_ink else scene
    noisy = np.clip(scene * 255 + np.random.default_rng(0).normal(0, 4, scene.shape), 0, 255)
    blurred = Image.fromarray(np.uint8(noisy)).filter(ImageFilter.GaussianBlur(1.2))
    buf = io.BytesIO()
    blurred.save(buf, "JPEG", quality=75)
    return prepare.read_picture(buf)


@pytest.mark.parametrize("kind", ["dark ink", "light ink", "speck"])
def test_a_photo_under_uneven_light_prepares_close_to_its_digit(kind, monkeypatch):
    gray = photo(CLEAN_SEVEN, light_ink=kind == "light ink", speck=kind == "speck")
    assert (prepare.prepare_digit(gray)[0] - CLEAN_SEVEN).abs().mean() < 0.06  # 1-pixel shift: 0.04
    # the plain way (the border's median is paper, the rest stretched) takes its dim side for ink
    paper = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]]).median()
    ink, paper = (1 - gray, 1 - paper) if paper > 0.5 else (gray, paper)
    plain = prepare.mnist_like(((ink - paper) / (ink.max() - paper)).clamp(0, 1))
    assert (plain - CLEAN_SEVEN).abs().mean() > 0.1
    if kind == "speck":  # keeping every piece of ink, the digit shrinks
        monkeypatch.setattr(prepare, "near_the_digit", lambda found: torch.ones_like(found))
        assert (prepare.prepare_digit(gray)[0] - CLEAN_SEVEN).abs().mean() > 0.08


@pytest.mark.parametrize("source", ["seven", pytest.param("mnist", marks=needs_mnist)])
def test_an_upsampled_digit_prepares_to_itself(source):
    """A clean scan or the demo's canvas: a 7 or 20 MNIST digits, 10x larger, dark on white."""
    digits = CLEAN_SEVEN[None, None]
    if source == "mnist":
        digits = data.to_float(data.load_mnist(MNIST_DIR)["train_images"][:20])
    big = 1 - torch.nn.functional.interpolate(digits, size=(280, 280), mode="bilinear")
    prepared = torch.stack([prepare.prepare_digit(gray[0]) for gray in big])
    assert (prepared - digits).abs().mean() < (0.035 if source == "mnist" else 0.02)


def test_drawings_prepare_as_load_digit_image_does_and_scaled_as_mnist_digits(tmp_path):
    """The demo's canvas, from a file or not; a one-pixel '1', a dot, a 7 scaled as in MNIST; noise
    (no clean split of ink from paper, on grey paper too) prepared, not called empty, ink spread."""
    for x in (prepare.prepare_digit(0.5 + (NOISE - 0.5) * contrast)[0] for contrast in (1, 0.3)):
        assert x.gt(0.05).sum() > 200 and x.max() <= 1 and not torch.equal(x, x.flip(0))
    Image.fromarray((CANVAS.numpy() * 255).round().astype(np.uint8)).save(tmp_path / "canvas.png")
    picture, x = prepare.load_digit_image(tmp_path / "canvas.png")
    assert torch.equal(picture, CANVAS) and torch.equal(prepare.prepare_digit(CANVAS), x)
    assert x.shape == (1, 28, 28) and x[0, :3].max() < 0.05 and x.max() > 0.9  # light on dark
    x = prepare.prepare_digit(torch.nn.functional.pad(torch.ones(200, 1), (100, 179, 40, 40)))[0]
    rows, cols = (x > 0.05).any(1).nonzero(), (x > 0.05).any(0).nonzero()
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 <= 2
    assert abs((x.sum(0) * torch.arange(28.0)).sum() / x.sum() - prepare.MNIST_CENTRE) <= 0.5
    dot, digit = (drawings.draw(lines) for lines in ([[(140, 140)]], drawings.DIGITS["digit 7"]))
    dot, digit = prepare.prepare_digit(dot)[0], prepare.prepare_digit(digit)[0]
    assert 0 < prepare.stroke_erosions(dot) <= prepare.MAX_STROKE_EROSIONS < 10  # 10: a 20-px disc
    assert digit.gt(0.05).any(1).sum() == 20


REFUSED = {  # what is not a picture of a digit, and what its one line says
    "blank": (lambda: torch.zeros(280, 280), "empty"),
    "grey": (lambda: torch.full((240, 320), 0.6), "empty"),
    "lit page": (lambda: photo(torch.zeros(28, 28)), "empty"),  # lit unevenly, nothing written
    "faint grain": (lambda: 0.8 + (NOISE - 0.5) * 0.05, "empty"),  # grain that weak is paper
    "nan": (lambda: torch.full((280, 280), float("nan")), "NaN or infinite"),
    "inf": (lambda: CANVAS.index_fill(0, torch.tensor([5]), float("inf")), "NaN or"),
    "0-255": (lambda: CANVAS * 255, "[0, 1]"),
    "negative": (lambda: CANVAS - 0.5, "[0, 1]"),
    "3-d": (lambda: CANVAS[None], "shape (H, W)"),
    "1-d": (lambda: CANVAS[0], "shape (H, W)"),
    "numpy": (lambda: CANVAS.numpy(), "shape (H, W)"),
    "thin": (lambda: torch.ones(4, 280), "too small: 280 x 4 pixels"),
}


@pytest.mark.parametrize("make,words", REFUSED.values(), ids=REFUSED)
def test_prepare_digit_refuses_what_is_not_a_picture(make, words):
    with pytest.raises(prepare.ImageError) as excinfo:
        prepare.prepare_digit(make())
    assert words in str(excinfo.value) and "\n" not in str(excinfo.value)
