"""Transposed convolution against nearest-neighbour upsampling + 3x3 convolution, in the decoder's
upsampling places.

    python benchmarks/upsampling.py [--device cpu] [--windows 7] [--steps 30]

The decoder doubles its resolution twice with 4x4 stride-2 transposed convolutions (7 -> 14 -> 28).
The usual alternative, nearest upsampling followed by a 3x3 convolution, gives the same output shape
with 2.25x the multiply-adds. This times both, forward + backward at batch 64 (channels-last on the
CPU, as main.py trains), in each place the default model has them, and prints `name: value` lines
(milliseconds, median of the timed windows, the two alternated window by window so that a drifting
machine affects both alike).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import parser, positive_int, run, sync  # noqa: E402
from config import (
    VAEConfig,  # noqa: E402
    pick_device,  # noqa: E402
)


def places(config: VAEConfig) -> list[tuple[int, int, int]]:
    """(in channels, out channels, input size) of every transposed conv in the decoder, plus the
    1-channel one that makes the logits when there is no output conv (--out-conv 0)."""
    c1, c2 = config.channels
    return (
        [(c2, c1, 7), (c1, config.out_conv, 14), (c1, 1, 14)]
        if config.out_conv
        else [(c2, c1, 7), (c1, 1, 14)]
    )


def timed(layer: nn.Module, x: torch.Tensor, steps: int, device: torch.device) -> float:
    """Milliseconds per forward + backward pass."""
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        y = layer(x)
        y.backward(torch.ones_like(y))
    sync(device)
    return (time.perf_counter() - t) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=positive_int(4096), default=64)
    p.add_argument(
        "--windows",
        type=positive_int(),
        default=7,
        help="timed windows per layer; the median is reported (default: 7)",
    )
    p.add_argument(
        "--steps",
        type=positive_int(),
        default=30,
        help="forward + backward passes per window (default: 30)",
    )
    args = p.parse_args(argv)

    device = pick_device(args.device)
    torch.set_flush_denormal(True)
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    print(f"device: {device}")
    print(f"batch_size: {args.batch_size}")
    for c_in, c_out, size in places(VAEConfig()):
        torch.manual_seed(0)
        x = (
            torch.randn(args.batch_size, c_in, size, size, device=device)
            .to(memory_format=fmt)
            .requires_grad_()
        )
        layers = {
            "transposed_conv": nn.ConvTranspose2d(c_in, c_out, 4, 2, 1),
            "upsample_conv": nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)
            ),
        }
        layers = {name: layer.to(device).to(memory_format=fmt) for name, layer in layers.items()}
        shapes = {tuple(layer(x).shape) for layer in layers.values()}
        assert shapes == {(args.batch_size, c_out, 2 * size, 2 * size)}, shapes
        ms: dict[str, list[float]] = {name: [] for name in layers}
        for name, layer in layers.items():  # warm-up
            timed(layer, x, max(1, args.steps // 3), device)
        for _ in range(args.windows):
            for name, layer in layers.items():
                ms[name].append(timed(layer, x, args.steps, device))
        place = f"{c_in}to{c_out}_at_{size}to{2 * size}"
        median = {name: statistics.median(v) for name, v in ms.items()}
        for name in layers:
            print(f"{name}_{place}_ms: {median[name]:.3f}")
        print(
            f"upsample_conv_over_transposed_{place}: "
            f"{median['upsample_conv'] / median['transposed_conv']:.2f}"
        )
    return 0


if __name__ == "__main__":
    run(main)
