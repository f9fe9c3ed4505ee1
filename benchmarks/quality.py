"""Model quality at the seed's budget: train one configuration with a fixed seed, then measure it on
the test set.

    python benchmarks/quality.py --data-dir ../shared/mnist [main.py training flags ...]
    python benchmarks/quality.py --data-dir ../shared/mnist --reuse models_mnist   # a finished run

Any flag main.py's training takes (--latent-dim, --hidden-dim, --binarize, ...) is passed through;
the budget is main.py's defaults (BCE + KL, Adam 1e-3, batch 64, 20 epochs) unless you override it.
The training run is a real `python main.py` run (its final evaluation included) and is timed on the
wall clock. Prints `name: value` lines: test loss, bce, kl, IWAE bound (k=1000 by default), active
units, seconds per epoch and full-run minutes.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import main as cli  # noqa: E402
from benchmarks.common import add_data_dir, main_py, parser, positive_int, run  # noqa: E402
from config import pick_device  # noqa: E402
from files import UserError  # noqa: E402


def changed_settings(ckpt: dict) -> str:
    """The run's settings that differ from the defaults, as name=value; precision has its own line
    (it is stored as what "auto" resolved to)."""
    stored = (checkpoint.train_config(ckpt), checkpoint.model_config(ckpt))
    changed = [
        f"{f.name}={getattr(c, f.name)}"
        for c in stored
        for f in fields(c)
        if getattr(c, f.name) != f.default and f.name != "precision"
    ]
    return " ".join(changed) or "defaults"


def train_run(args, train_flags: list[str], ckpt_dir: Path, tmp: str) -> float:
    """`python main.py` with the passed-through flags, its epoch lines echoed; its wall-clock
    seconds. When it fails, exit with its status (a user's mistake, status 2, it has already said in
    one line)."""
    cmd = main_py(args, *train_flags)
    cmd += ["--checkpoint-dir", str(ckpt_dir), "--image-dir", f"{tmp}/img", "--no-progress"]
    print("command: " + " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        if proc.returncode != 2:
            print(f"error: training failed with status {proc.returncode}", file=sys.stderr)
        sys.exit(proc.returncode)
    for line in proc.stdout.splitlines():
        if line.startswith("epoch "):
            print("  " + line, flush=True)
    return wall


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_data_dir(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--iwae-k",
        type=positive_int(10_000),
        default=1000,
        help="importance samples per test image (default: 1000)",
    )
    p.add_argument(
        "--reuse",
        metavar="CKPT_DIR",
        help="measure the finished run in CKPT_DIR (best.pt, last.pt) instead of training",
    )
    p.add_argument(
        "--keep",
        metavar="CKPT_DIR",
        help="train into CKPT_DIR and keep it (default: a temporary folder)",
    )
    args, train_flags = p.parse_known_args(argv)
    if args.reuse and train_flags:
        p.error(
            f"unrecognized arguments: {' '.join(train_flags)} "
            "(training flags do nothing with --reuse)"
        )
    # main.py's own check of its flags, before anything runs
    cli.build_parsers()["train"].parse_args(train_flags)

    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.reuse:
            ckpt_dir, wall = Path(args.reuse), None
            if not (ckpt_dir / "last.pt").is_file() or not (ckpt_dir / "best.pt").is_file():
                raise UserError(
                    f"--reuse {ckpt_dir}: not a finished run's folder "
                    "(it holds best.pt and last.pt)"
                )
        else:
            ckpt_dir = Path(args.keep or f"{tmp}/ckpt")
            wall = train_run(args, train_flags, ckpt_dir, tmp)
        last = checkpoint.load(ckpt_dir / "last.pt")
        model, _ = checkpoint.load_model(ckpt_dir / "best.pt", device)
        config = last["config"]
        mnist = data.load_mnist(args.data_dir)
        x = evaluate.test_images(mnist, config["binarize"], device)
        t = time.perf_counter()
        metrics, _ = evaluate.test_metrics(model, x, args.iwae_k, config["seed"])
        iwae_seconds = time.perf_counter() - t

    seconds = [h["seconds"] for h in last["history"]]
    print(f"device: {device}")
    print(f"config: {changed_settings(last)}")
    print(f"precision: {config['precision']}")
    print(f"epochs: {last['epoch']}")
    print(f"best_epoch: {min(last['history'], key=lambda h: h['val_loss'])['epoch']}")
    print(f"binarized: {config['binarize']}")
    print(f"test_loss: {metrics['test_loss']:.3f}")
    print(f"test_bce: {metrics['test_bce']:.3f}")
    print(f"test_kl: {metrics['test_kl']:.3f}")
    print(f"test_iwae_nll: {metrics['test_iwae_nll']:.3f}")
    print(f"iwae_k: {args.iwae_k}")
    print(f"active_units: {metrics['active_units']} of {metrics['latent_dim']}")
    print(
        f"seconds_per_epoch: {statistics.mean(seconds):.1f} (training steps only, mean over epochs)"
    )
    if wall is not None:
        what = (
            f"python main.py wall clock: data, {last['epoch']} epochs, validation, "
            "final evaluation, pictures"
        )
        print(f"full_run_minutes: {wall / 60:.2f} ({what})")
    print(f"iwae_seconds: {iwae_seconds:.0f}")
    return 0


if __name__ == "__main__":
    run(main)
