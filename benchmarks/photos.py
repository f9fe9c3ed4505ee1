"""Phone photos of digits on paper: prepared by prepare.py, how close do they come to the digit
MNIST has?

    python benchmarks/photos.py [--split test] [--n 20] [--seed 0] [--data-dir DIR]
                                [--checkpoint FILE]

N digits of the split (a seeded draw) are each made into a synthetic photo: the digit upscaled onto
a larger sheet off its centre and turned a few degrees, dark ink on light paper, lit by a gradient
and a vignette, blurred, with sensor noise, saved as a JPEG. Each photo is read back from its JPEG
bytes as a file would be and prepared with prepare.prepare_digit. The table compares, over the N
digits, the mean anomaly percentile (combined score, among the 10,000 test digits) and the mean
absolute pixel difference from the clean digit as MNIST has it:
  clean           the digit as MNIST has it;
  clean, redrawn  the clean digit upsampled 10x, dark on white, prepared (the demo's and a clean
                  scan's case);
  photo           the photo, prepared;
  photo, plain    the photo, prepared the plain way (the border's median as background, a linear
                  stretch), for comparison.
Tune on --split train; the test digits are for the report. Prints figures, asserts nothing.
"""

from __future__ import annotations

import io
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import anomaly
import checkpoint
import data
import prepare
from benchmarks.common import add_data_dir, parser, positive_int, run


def lighting(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A lamp off to one side: brightness falling linearly across the sheet, times a vignette
    darkening the corners."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys, xs = ys / (height - 1) - 0.5, xs / (width - 1) - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    # 0 on the lit side, 1 on the far side
    along = (along - along.min()) / (along.max() - along.min())
    gradient = 1 - rng.uniform(0.35, 0.6) * along
    vignette = 1 - rng.uniform(0.1, 0.3) * (xs**2 + ys**2) / 0.5
    return gradient * vignette


def ink_on_sheet(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The digit (28x28 uint8) upscaled 6-9x and turned up to 5 degrees, placed off centre on a
    sheet about 2.5 times its size: ink coverage in [0, 1]."""
    side = round(28 * rng.uniform(6, 9))
    big = Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR)
    big = (
        np.asarray(
            big.rotate(rng.uniform(-5, 5), Image.Resampling.BILINEAR, expand=True), np.float32
        )
        / 255
    )
    width = round(side * rng.uniform(2.2, 3.0))
    height = round(width * 0.75)
    top = round((height - big.shape[0]) * rng.uniform(0.1, 0.9))  # anywhere but the very edge
    left = round((width - big.shape[1]) * rng.uniform(0.1, 0.9))
    sheet = np.zeros((height, width), np.float32)
    sheet[top : top + big.shape[0], left : left + big.shape[1]] = big
    return sheet


def photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A synthetic phone photo of the digit written on paper, as JPEG bytes."""
    ink = ink_on_sheet(digit, rng)
    paper, pen = rng.uniform(0.75, 0.92), rng.uniform(0.08, 0.25)  # how much light each reflects
    scene = (paper - (paper - pen) * ink) * lighting(*ink.shape, rng)
    img = Image.fromarray(np.round(scene * 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.8)))  # focus and camera shake
    noisy = np.asarray(img, np.float32) + rng.normal(0, 255 * rng.uniform(0.01, 0.03), ink.shape)
    out = io.BytesIO()
    quality = int(rng.integers(60, 90))
    Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)).save(
        out, "JPEG", quality=quality
    )
    return out.getvalue()


def plain_prepare(gray: torch.Tensor) -> torch.Tensor:
    """A plain preparation to compare with: the border's median is the background, the rest
    stretched linearly; cropped, scaled to 20 px (bilinear) and centred on (13.5, 13.5)."""
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.median() > 0.5:
        gray, border = 1 - gray, 1 - border
    background, peak = border.median(), gray.max()
    if peak - background < 0.1:
        return torch.zeros(1, 28, 28)  # nothing stands out of the background: no digit
    ink = ((gray - background) / (peak - background)).clamp_(0, 1)
    rows, cols = (ink > 0.05).any(1).nonzero(), (ink > 0.05).any(0).nonzero()
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = 20 / max(crop.shape)
    size = (max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale)))
    small = F.interpolate(crop[None, None], size=size, mode="bilinear", antialias=True)[0, 0].clamp(
        0, 1
    )
    cy = (small.sum(1) * torch.arange(size[0])).sum() / small.sum()
    cx = (small.sum(0) * torch.arange(size[1])).sum() / small.sum()
    top, left = round(13.5 - cy.item()), round(13.5 - cx.item())
    out = torch.zeros(28, 28)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + size[0], 28), min(left + size[1], 28)
    out[y0:y1, x0:x1] = small[y0 - top : y1 - top, x0 - left : x1 - left]
    return out[None]


def redrawn(digit: np.ndarray) -> torch.Tensor:
    """The clean digit upsampled 10x (bilinear) and inverted: dark on white, as the demo's canvas or
    a scan has it."""
    big = Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR)
    return 1 - torch.from_numpy(np.asarray(big, np.float32) / 255)


def prepared_sets(digits: np.ndarray, seed: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Each way of preparing the digits as (N, 1, 28, 28), and the milliseconds prepare_digit took
    per photo."""
    rng = np.random.default_rng(seed)
    sets = {"clean": [], "clean, redrawn": [], "photo": [], "photo, plain": []}
    times = []
    for digit in digits:
        gray = prepare.read_picture(io.BytesIO(photo(digit, rng)))  # read back as a file is
        t = time.perf_counter()
        sets["photo"].append(prepare.prepare_digit(gray))
        times.append(1000 * (time.perf_counter() - t))
        sets["photo, plain"].append(plain_prepare(gray))
        sets["clean"].append(torch.from_numpy(digit.astype(np.float32) / 255)[None])
        sets["clean, redrawn"].append(prepare.prepare_digit(redrawn(digit)))
    return {name: torch.stack(xs) for name, xs in sets.items()}, times


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument(
        "--checkpoint",
        default="pretrained/vae-mnist.pt",
        help="model and anomaly reference to score with",
    )
    add_data_dir(p)
    p.add_argument(
        "--n", type=positive_int(10_000), default=20, help="how many digits (default 20)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="which digits, and every random choice in their photos"
    )
    p.add_argument(
        "--split",
        choices=("train", "test"),
        default="test",
        help="draw the digits from here: tune on train, report on test (default)",
    )
    p.add_argument("--per-digit", action="store_true", help="also print each digit's figures")
    args = p.parse_args(argv)
    mnist = data.load_mnist(args.data_dir)
    model, ckpt = checkpoint.load_model(args.checkpoint, flag="--checkpoint")
    images, labels = mnist[f"{args.split}_images"], mnist[f"{args.split}_labels"]
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    sets, times = prepared_sets(images[pick].numpy(), args.seed)
    ref = ckpt["anomaly_reference"]
    rank = {
        name: [
            anomaly.percentile(ref["test_scores"], v)
            for v in anomaly.score(model, x, reference=ref).tolist()
        ]
        for name, x in sets.items()
    }
    diff = {name: (x - sets["clean"]).abs().mean((1, 2, 3)) for name, x in sets.items()}
    print(f"{args.n} {args.split} digits (seed {args.seed}), {Path(args.checkpoint).name}")
    print(f"{'preparation':<16} {'mean percentile':>16} {'mean |x - clean|':>17}")
    for name in sets:
        print(f"{name:<16} {statistics.mean(rank[name]):>16.1f} {diff[name].mean().item():>17.4f}")
    gap = statistics.mean(rank["photo"]) - statistics.mean(rank["clean"])
    print(f"photos_minus_clean: {gap:+.1f} percentile points")
    print(
        f"prepare_digit per photo: {statistics.median(times):.0f} ms median "
        f"({torch.get_num_threads()} thread)"
    )
    if args.per_digit:
        print("digit  label  " + "  ".join(f"{name:>14}" for name in sets) + "  |photo - clean|")
        for i, label in enumerate(labels[pick].tolist()):
            print(
                f"{pick[i].item():>5}  {label:>5}  "
                + "  ".join(f"{rank[name][i]:>14.1f}" for name in sets)
                + f"  {diff['photo'][i].item():>15.4f}"
            )

    return 0


if __name__ == "__main__":
    run(main)
