"""Drawings on the demo's pad that are no digit, beside ordinary drawn digits: which does the model
flag?

    python benchmarks/drawings.py [--checkpoint FILE] [--device cpu] [--only NAME...]

Each drawing is made as the demo's pad makes it: black strokes 18 px wide with round ends on a white
280 x 280 canvas (drawn 4x larger and averaged down, as a browser smooths its strokes). The demo's
own code (demo.Demo.digit) prepares it as MNIST was made, scores it (the combined score) and places
the score among the test digits' stored scores: typical below their 90th percentile, unusual from
it, very unusual from the 99th. The digits are drawn the same way, stroke by stroke, and a few MNIST
test digits are scaled up to the pad's size (as a clean scan would be). Prints one line per drawing,
then how many non-digits are flagged (unusual or very unusual) and how many digits stay typical.
Asserts nothing.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image, ImageDraw

import anomaly
import checkpoint
import data
import demo
import main as cli
from benchmarks.common import add_data_dir, parser, run

PAD = 280  # the demo's canvas, in pixels a side
PEN = 18  # its stroke width
SMOOTH = 4  # drawn this many times larger, then averaged down
# what a drawing is meant to be
DRAWN, SCANNED, OTHER, LIKE = "drawn digit", "scanned digit", "non-digit", "reads as a digit"

# Strokes on the 280 x 280 pad, each a list of (x, y) points joined by the pen: digits as a mouse
# draws them, and letters that are no digit.
DIGITS = {
    "digit 1": [[(120, 80), (150, 55), (138, 225)]],
    "digit 2": [
        [(90, 100), (110, 65), (150, 55), (185, 78), (188, 112), (165, 148), (95, 222), (200, 222)]
    ],
    "digit 3": [
        [
            (90, 72),
            (140, 55),
            (183, 80),
            (175, 122),
            (135, 138),
            (182, 160),
            (190, 200),
            (150, 228),
            (90, 214),
        ]
    ],
    "digit 4": [[(130, 55), (85, 165), (205, 165)], [(170, 95), (168, 228)]],
    "digit 5": [
        [(192, 58), (108, 58), (98, 132), (145, 122), (188, 148), (194, 194), (160, 226), (96, 214)]
    ],
    "digit 7": [[(85, 60), (195, 60), (128, 225)]],
}
LETTERS = {
    "letter A": [[(80, 225), (140, 55), (200, 225)], [(105, 160), (175, 160)]],
    "letter E": [[(190, 60), (95, 60), (95, 220), (190, 220)], [(95, 140), (170, 140)]],
    "letter H": [[(90, 55), (90, 225)], [(190, 55), (190, 225)], [(90, 140), (190, 140)]],
    "letter K": [[(95, 55), (95, 225)], [(190, 60), (98, 145), (195, 225)]],
    "letter M": [[(70, 225), (85, 55), (140, 170), (195, 55), (210, 225)]],
    "letter W": [[(60, 60), (100, 220), (140, 110), (180, 220), (220, 60)]],
}
SHAPES = {
    "square": [[(70, 70), (210, 70), (210, 210), (70, 210), (70, 70)]],
    "triangle": [[(140, 55), (225, 215), (55, 215), (140, 55)]],
    "plus": [[(140, 50), (140, 230)], [(50, 140), (230, 140)]],
    "cross": [[(60, 60), (220, 220)], [(220, 60), (60, 220)]],
    "horizontal line": [[(50, 140), (230, 140)]],
    "two lines": [[(60, 100), (220, 100)], [(60, 180), (220, 180)]],
    "hash": [
        [(110, 50), (100, 230)],
        [(180, 50), (170, 230)],
        [(55, 105), (225, 105)],
        [(55, 175), (225, 175)],
    ],
    "zigzag": [[(40, 100), (80, 180), (120, 100), (160, 180), (200, 100), (240, 180)]],
}


def circle(cx: float, cy: float, rx: float, ry: float, turns: float = 1.0, shrink: float = 0.0):
    """Points along an ellipse (or, with shrink, a spiral closing in), as a hand goes round."""
    steps = round(48 * turns)
    out = []
    for i in range(steps + 1):
        t = 2 * math.pi * turns * i / steps
        k = 1 - shrink * i / steps
        out.append((cx + k * rx * math.sin(t), cy - k * ry * math.cos(t)))
    return out


def scribble(seed: int, points: int = 14) -> list:
    """A seeded random walk across the pad: a scribble."""
    rng = np.random.default_rng(seed)
    return [[tuple(p) for p in rng.uniform(50, 230, size=(points, 2)).tolist()]]


def strokes() -> dict[str, tuple[bool, list]]:
    """Every drawing made of strokes: name -> (what it is meant to be, strokes)."""
    made = {name: (DRAWN, s) for name, s in DIGITS.items()}
    made |= {
        "digit 0": (DRAWN, [circle(140, 140, 55, 85)]),
        "digit 6": (
            DRAWN,
            [
                [
                    (172, 58),
                    (130, 92),
                    (104, 140),
                    (98, 185),
                    (112, 220),
                    (145, 228),
                    (176, 208),
                    (180, 175),
                    (160, 150),
                    (125, 148),
                    (100, 170),
                ]
            ],
        ),
        "digit 8": (DRAWN, [circle(140, 95, 42, 40), circle(140, 182, 52, 45)]),
        "digit 9": (DRAWN, [circle(135, 100, 45, 42), [(180, 100), (165, 225)]]),
    }
    made |= {name: (OTHER, s) for name, s in {**LETTERS, **SHAPES}.items()}
    made["spiral"] = (OTHER, [circle(140, 140, 95, 95, turns=3, shrink=0.9)])
    made["circle outline"] = (LIKE, [circle(140, 140, 90, 90)])  # how many people write a 0
    made |= {f"scribble {seed}": (OTHER, scribble(seed)) for seed in range(3)}
    return made


def draw(lines: list, discs: list = ()) -> torch.Tensor:
    """The pad with these strokes (round ends and joins) and filled discs (x, y, radius): (280, 280)
    grey values in [0, 1], white paper, black ink, as the page sends them."""
    big = Image.new("L", (PAD * SMOOTH, PAD * SMOOTH), 255)
    pen = ImageDraw.Draw(big)
    r = PEN * SMOOTH / 2
    for line in lines:
        points = [(x * SMOOTH, y * SMOOTH) for x, y in line]
        pen.line(points, fill=0, width=PEN * SMOOTH)
        for x, y in points:  # the round ends and joins of a browser's lineCap and lineJoin
            pen.ellipse((x - r, y - r, x + r, y + r), fill=0)
    for x, y, radius in discs:
        pen.ellipse([c * SMOOTH for c in (x - radius, y - radius, x + radius, y + radius)], fill=0)
    small = big.resize((PAD, PAD), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255)


def scanned_digits(data_dir: str, per_class: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The first test digits of each class, scaled up to the pad's size, dark on white: name -> (the
    pad's grey values, the digit as MNIST has it)."""
    mnist = data.load_mnist(data_dir)
    out = {}
    for d in range(10):
        for i in (mnist["test_labels"] == d).nonzero()[:per_class, 0].tolist():
            digit = mnist["test_images"][i]
            big = Image.fromarray(255 - digit.numpy()).resize((PAD, PAD), Image.Resampling.BILINEAR)
            pad = torch.from_numpy(np.asarray(big, np.float32) / 255)
            out[f"scanned {d} (test #{i})"] = pad, data.to_float(digit[None])
    return out


def drawings() -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (what it is meant to be, the pad's grey values)."""
    made = {name: (digit, draw(lines)) for name, (digit, lines) in strokes().items()}
    made["dot"] = (OTHER, draw([[(140, 140)]]))  # a click
    made["dot off centre"] = (OTHER, draw([[(70, 210)]]))
    made["two dots"] = (OTHER, draw([[(100, 140)], [(180, 140)]]))
    made["small disc"] = (OTHER, draw([], discs=[(140, 140, 30)]))
    made["filled disc"] = (OTHER, draw([], discs=[(140, 140, 90)]))
    return made


def report(page: demo.Demo, made: dict, scans: dict) -> None:
    """One line per drawing, then how many of each kind are typical (or flagged)."""
    typical, total = Counter(), Counter()
    for name, (kind, gray) in made.items():
        answer = page.digit(gray)
        typical[kind] += answer["verdict"] == "typical"
        total[kind] += 1
        print(f"{name}: {answer['description']} ({kind})")
    for name, (gray, digit) in scans.items():
        answer = page.digit(gray)
        value = anomaly.score(page.model, digit, reference=page.reference).item()
        as_mnist = page.percentile(value)
        typical[SCANNED] += answer["verdict"] == "typical"
        typical["as MNIST"] += anomaly.verdict(as_mnist) == "typical"
        total[SCANNED] += 1
        print(f"{name}: {answer['description']} (as MNIST has it: {as_mnist:.1f}%)")
    print(f"non-digits flagged: {total[OTHER] - typical[OTHER]} of {total[OTHER]}")
    print(f"drawn digits typical: {typical[DRAWN]} of {total[DRAWN]}")
    print(
        f"scanned digits typical: {typical[SCANNED]} of {total[SCANNED]} (as MNIST has them: "
        f"{typical['as MNIST']})"
    )
    print(f"shapes that read as a digit, typical: {typical[LIKE]} of {total[LIKE]}")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument(
        "--checkpoint", default=str(checkpoint.SHIPPED), help="default: the shipped model"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="default: cpu")
    p.add_argument(
        "--only", nargs="+", metavar="WORD", help="only the drawings whose name has WORD"
    )
    p.add_argument(
        "--scans",
        type=cli.number(int, 0, 100),
        default=1,
        help="MNIST test digits of each class scaled up to the pad (0: none, and no data is read; "
        "default: 1)",
    )
    add_data_dir(p)
    args = p.parse_args(argv)
    model, ckpt = checkpoint.load_model(
        args.checkpoint, torch.device(args.device), flag="--checkpoint"
    )
    page = demo.Demo(model, anomaly.reference_of(ckpt), None, ckpt["config"]["binarize"])
    made = drawings()
    scans = scanned_digits(args.data_dir, args.scans) if args.scans else {}
    if args.only:
        made = {k: v for k, v in made.items() if any(word in k for word in args.only)}
        scans = {k: v for k, v in scans.items() if any(word in k for word in args.only)}
    print(f"checkpoint: {args.checkpoint}")
    report(page, made, scans)
    return 0


if __name__ == "__main__":
    run(main)
