"""How long one live update of the demo (`python main.py demo`) takes, in this process and without
the network.

    python benchmarks/demo_speed.py [--checkpoint models_mnist/best.pt] [--updates 100]
                                    [--device cpu]

An update is what the server does for each POST /api/digit: parse the JSON body of a 280x280 drawing
(as the page sends it), then demo.Demo.digit: prepare it as MNIST was made, encode, decode, and
score it with the default method (10 z samples, seed 0, as `python main.py reconstruct`). The
drawings are random pen strokes, 18 px wide like the page's. Prints `median_ms: X` and `p95_ms: Y`
for whole updates, and the same for the score alone; the page feels live under 100 ms.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import anomaly  # noqa: E402
import checkpoint  # noqa: E402
import demo  # noqa: E402
import prepare  # noqa: E402
from benchmarks.common import parser, positive_int, run  # noqa: E402
from config import pick_device  # noqa: E402
from files import UserError  # noqa: E402


def pen_drawing(gen: torch.Generator, size: int = 280, width: float = 18.0) -> torch.Tensor:
    """A stroke through 3 to 6 random points, dark ink on white, anti-aliased: what the page's
    canvas holds."""
    points = (
        torch.rand(int(torch.randint(3, 7, (1,), generator=gen)), 2, generator=gen) * 0.6 + 0.2
    ) * size
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    p = torch.stack([xs, ys], -1).reshape(-1, 1, 2)
    a, ab = points[:-1], points[1:] - points[:-1]
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-9)).clamp(0, 1)
    dist = (p - (a + t[..., None] * ab)).norm(dim=-1).min(1).values
    return 1 - (width / 2 - dist + 0.5).clamp(0, 1).reshape(size, size)


def request_body(gray: torch.Tensor) -> bytes:
    """The JSON the page posts: grey values rounded to 2 decimals, row by row."""
    pixels = [round(v, 2) for v in gray.flatten().tolist()]
    return json.dumps({"width": gray.shape[1], "height": gray.shape[0], "pixels": pixels}).encode()


def reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_drawing(payload: bytes) -> torch.Tensor:
    """What the server does with the body before the model sees it: JSON to a (height, width) float
    tensor."""
    body = json.loads(payload, parse_constant=reject_constant)
    return torch.tensor(body["pixels"], dtype=torch.float32).reshape(body["height"], body["width"])


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(1000 * s for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]


def open_demo(path: Path, device: torch.device) -> demo.Demo:
    """The demo as `python main.py demo` sets it up for this checkpoint."""
    model, ckpt = checkpoint.load_model(path, device, flag="--checkpoint")
    print(f"checkpoint: {checkpoint.describe(path, ckpt)}")
    try:
        reference = anomaly.reference_of(ckpt)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    return demo.Demo(model, reference, ckpt.get("latent_map"), binarize=ckpt["config"]["binarize"])


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        default=checkpoint.DEFAULT,
        help=f"checkpoint to time (default: {checkpoint.DEFAULT}; until training has written it, "
        "the shipped one)",
    )
    p.add_argument(
        "--updates",
        type=positive_int(),
        default=100,
        help="timed updates, each of another drawing (default: 100)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to compute (default: cpu)",
    )
    args = p.parse_args(argv)
    device = pick_device(args.device)
    app = open_demo(checkpoint.for_use(args.checkpoint), device)
    gen = torch.Generator().manual_seed(0)
    bodies = [request_body(pen_drawing(gen)) for _ in range(args.updates + 3)]

    for payload in bodies[:3]:  # warm up: first calls allocate and pick kernels
        app.digit(parse_drawing(payload))
    update_s, score_s = [], []
    for payload in bodies[3:]:
        t0 = time.perf_counter()
        app.digit(parse_drawing(payload))
        update_s.append(time.perf_counter() - t0)
        x = prepare.prepare_digit(parse_drawing(payload))[None].to(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            anomaly.score(
                app.model,
                x,
                method=app.method,
                samples=anomaly.SCORE_SAMPLES,
                seed=anomaly.SCORE_SEED,
                reference=app.reference,
            )
        score_s.append(time.perf_counter() - t0)
    median, p95 = percentiles_ms(update_s)
    score_median, score_p95 = percentiles_ms(score_s)
    print(
        f"{args.updates} updates of 280x280 drawings on {device} "
        f"({torch.get_num_threads()} threads), method {app.method}, "
        f"{anomaly.SCORE_SAMPLES} z samples, {app.model.latent_dim}-dim latent"
    )
    print(f"median_ms: {median:.1f}")
    print(f"p95_ms: {p95:.1f}")
    print(f"score_median_ms: {score_median:.1f}")
    print(f"score_p95_ms: {score_p95:.1f}")
    return 0


if __name__ == "__main__":
    run(main)
