"""Model quality at the seed's budget: train one configuration with a fixed seed, then measure it on the test set.

    python benchmarks/quality.py --data-dir ../shared/mnist [main.py training flags ...]
    python benchmarks/quality.py --data-dir ../shared/mnist --reuse models_mnist   # measure a finished run instead

Any flag main.py's training takes (--latent-dim, --hidden-dim, --binarize, ...) is passed through; the budget is
main.py's defaults (BCE + KL, Adam 1e-3, batch 64, 20 epochs) unless you override it. The training run is a real
`python main.py` run (its final evaluation included) and is timed on the wall clock. Prints `name: value` lines:
test loss, bce, kl, IWAE bound (k=1000 by default), active units, seconds per epoch and full-run minutes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import checkpoint  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DIR", "data"), help="folder with the four MNIST files (default: $MNIST_DIR or data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--iwae-k", type=int, default=1000, help="importance samples per test image (default: 1000)")
    p.add_argument("--reuse", metavar="CKPT_DIR", help="measure the finished run in CKPT_DIR (best.pt, last.pt) instead of training")
    p.add_argument("--keep", metavar="CKPT_DIR", help="train into CKPT_DIR and keep it (default: a temporary folder)")
    args, train_flags = p.parse_known_args()

    device = utils.pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.reuse:
            ckpt_dir, wall = Path(args.reuse), None
        else:
            ckpt_dir = Path(args.keep or f"{tmp}/ckpt")
            cmd = [sys.executable, str(ROOT / "main.py"), *train_flags, "--data-dir", args.data_dir, "--device", args.device,
                   "--checkpoint-dir", str(ckpt_dir), "--image-dir", f"{tmp}/img", "--no-progress"]
            print("command: " + " ".join(cmd[1:]), flush=True)
            t = time.perf_counter()
            proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"training failed with status {proc.returncode}")
            for line in proc.stdout.splitlines():
                if line.startswith("epoch "):
                    print("  " + line, flush=True)
        last = checkpoint.load(ckpt_dir / "last.pt")
        model, _ = checkpoint.load_model(ckpt_dir / "best.pt", device)
        config = last["config"]
        mnist = data.load_mnist(args.data_dir, download=False)
        x = evaluate.test_images(mnist, config, device)
        t = time.perf_counter()
        metrics, _ = evaluate.test_metrics(model, x, args.iwae_k, config["seed"])
        iwae_seconds = time.perf_counter() - t

    seconds = [h["seconds"] for h in last["history"]]
    defaults = train.TRAIN_DEFAULTS | train.MODEL_DEFAULTS
    # settings that differ from the defaults; precision has its own line (it is stored as what "auto" resolved to)
    flags = " ".join(f"{k}={v}" for k, v in config.items() if v != defaults.get(k) and k != "precision")
    print(f"device: {device}")
    print(f"config: {flags or 'defaults'}")
    print(f"precision: {config.get('precision', 'fp32')}")
    print(f"epochs: {last['epoch']}")
    print(f"best_epoch: {min(last['history'], key=lambda h: h['val_loss'])['epoch']}")
    print(f"binarized: {bool(config.get('binarize'))}")
    print(f"test_loss: {metrics['test_loss']:.3f}")
    print(f"test_bce: {metrics['test_bce']:.3f}")
    print(f"test_kl: {metrics['test_kl']:.3f}")
    print(f"test_iwae_nll: {metrics['test_iwae_nll']:.3f}")
    print(f"iwae_k: {args.iwae_k}")
    print(f"active_units: {metrics['active_units']} of {metrics['latent_dim']}")
    print(f"seconds_per_epoch: {statistics.mean(seconds):.1f} (training steps only, mean over epochs)")
    if wall is not None:
        print(f"full_run_minutes: {wall / 60:.2f} (python main.py wall clock: data, {last['epoch']} epochs, validation, final evaluation, pictures)")
    print(f"iwae_seconds: {iwae_seconds:.0f}")


if __name__ == "__main__":
    main_()
