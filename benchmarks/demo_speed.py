"""How long one live update of the demo (`python main.py demo`) takes, in this process and without the network.

    python benchmarks/demo_speed.py [--checkpoint models_mnist/best.pt] [--updates 100] [--device cpu]

An update is what the server does for each POST /api/digit: parse the JSON body of a 280x280 drawing (as the page
sends it), prepare it as MNIST was made, encode, decode, and score it with the default method (10 z samples, seed 0,
as `python main.py reconstruct`). The drawings are random pen strokes, 18 px wide like the page's. Prints
`median_ms: X` and `p95_ms: Y` for whole updates, and the same for the score alone; the page feels live under 100 ms.
"""
from __future__ import annotations

import argparse
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
import utils  # noqa: E402


def pen_drawing(gen: torch.Generator, size: int = 280, width: float = 18.0) -> torch.Tensor:
    """A stroke through 3 to 6 random points, dark ink on white, anti-aliased: what the page's canvas holds."""
    points = (torch.rand(int(torch.randint(3, 7, (1,), generator=gen)), 2, generator=gen) * 0.6 + 0.2) * size
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


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(1000 * s for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=checkpoint.DEFAULT, help="checkpoint to time (default: "
                        f"{checkpoint.DEFAULT}; until training has written it, the shipped one)")
    parser.add_argument("--updates", type=int, default=100, help="timed updates, each of another drawing (default: 100)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="where to compute (default: cpu)")
    args = parser.parse_args()
    try:
        app = demo.load(checkpoint.for_use(args.checkpoint), args.device)
    except utils.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    bodies = [request_body(pen_drawing(gen)) for _ in range(args.updates + 3)]

    def update(payload: bytes) -> dict:
        return app.digit(demo.drawing(json.loads(payload, parse_constant=demo.reject_constant)))

    for payload in bodies[:3]:  # warm up: first calls allocate and pick kernels
        update(payload)
    update_s, score_s = [], []
    for payload in bodies[3:]:
        t0 = time.perf_counter()
        answer = update(payload)
        update_s.append(time.perf_counter() - t0)
        x = torch.tensor(answer["prepared"], device=app.device)[None, None]
        t0 = time.perf_counter()
        with torch.inference_mode():
            anomaly.score(app.model, x, method=app.method, samples=demo.SAMPLES, seed=demo.SEED, reference=app.reference)
        score_s.append(time.perf_counter() - t0)
    median, p95 = percentiles_ms(update_s)
    score_median, score_p95 = percentiles_ms(score_s)
    print(f"{args.updates} updates of 280x280 drawings on {app.device} ({torch.get_num_threads()} threads), method {app.method}, "
          f"{demo.SAMPLES} z samples, {app.model.config.latent_dim}-dim latent")
    print(f"median_ms: {median:.1f}")
    print(f"p95_ms: {p95:.1f}")
    print(f"score_median_ms: {score_median:.1f}")
    print(f"score_p95_ms: {score_p95:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
