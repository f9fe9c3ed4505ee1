"""Train, evaluate and use a convolutional VAE on MNIST. This file only reads the command line and dispatches:

    python main.py                      train with the defaults (20 epochs), then evaluate and draw pictures  (train.py)
    python main.py evaluate             test-set metrics and pictures for a checkpoint                          (evaluate.py)
    python main.py sample               a grid of new digits                                                    (evaluate.py)
    python main.py score                anomaly scores of the test digits                                       (anomaly.py)
    python main.py reconstruct FILE...  score and reconstruct your own digit images                             (anomaly.py)
    python main.py demo                 a page on http://127.0.0.1:8000 to draw a digit and watch the VAE answer  (demo.py)

A user's mistake (bad flag, data, checkpoint, folder or image) ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import signal
import sys

import torch

import anomaly
import demo
import evaluate
import train
from checkpoint import DEFAULT as DEFAULT_CHECKPOINT
from train import COMMON_DEFAULTS, MODEL_DEFAULTS, TRAIN_DEFAULTS
from utils import UserError

COMMANDS = ("train", "evaluate", "sample", "score", "reconstruct", "demo")


class Parser(argparse.ArgumentParser):
    """argparse that says what is wrong in one line (exit 2) instead of dumping the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, low=None, high=None, what="a number"):
    """An argparse type: `kind` (int or float) within [low, high], finite, else a one-line error naming the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}") from None
        if value != value or abs(value) == float("inf") or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_int = number(int, 1, what="a positive integer")
iwae_samples = number(int, 1, 10_000, what="a whole number from 1 to 10,000")  # k x 100 images x latent noise is drawn at once
batch_size = number(int, 1, 4096, what="a whole number from 1 to 4,096")  # a batch's activations must fit in memory
digit_count = number(int, 1, 1024, what="a whole number from 1 to 1,024")  # one picture holds them all
score_samples = number(int, 1, 1000, what="a whole number from 1 to 1,000")
non_negative_int = number(int, 0, what="0 or a positive integer")
positive_float = number(float, 1e-300, what="a positive number")
seed = number(int, 0, 2**63 - 1, what="an integer from 0 to 2**63 - 1")  # the run also seeds generators with seed + 1, seed + 2, ...
decay = number(float, 0, 0.999999999, what="a number in [0, 1)")
digit = number(int, 0, 9, what="a digit 0-9")


def add_common(p: argparse.ArgumentParser, checkpoint: bool = True, files: bool = True) -> None:
    """--device, and unless files is False --data-dir and --image-dir, and unless checkpoint is False --checkpoint."""
    if files:
        p.add_argument("--data-dir", default=COMMON_DEFAULTS["data_dir"], help="folder holding the four MNIST IDX files (.gz or not; also looks in MNIST/raw); downloaded there when absent (default: data)")
        p.add_argument("--image-dir", default=COMMON_DEFAULTS["image_dir"], help="where pictures are written (default: images)")
    p.add_argument("--device", default=COMMON_DEFAULTS["device"], choices=["auto", "cpu", "cuda", "mps"], help="where to compute; auto picks cuda, then mps, then cpu (default: auto)")
    if checkpoint:
        p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"checkpoint to use (default: {DEFAULT_CHECKPOINT}; "
                       "until training has written it, the shipped pretrained/vae-mnist.pt)")


def add_iwae_k(p) -> None:
    p.add_argument("--iwae-k", type=iwae_samples, default=100, help="importance samples per test image for the IWAE bound on -log p(x), "
                   "at most 10,000; fewer is faster and looser (default: 100)")


def add_training_flags(g) -> None:
    d = TRAIN_DEFAULTS
    g.add_argument("--epochs", type=positive_int, help=f"passes over the training set (default: {d['epochs']}); with --resume, the new total")
    g.add_argument("--batch-size", type=batch_size, help=f"images per Adam step, at most 4,096 (default: {d['batch_size']})")
    g.add_argument("--lr", type=positive_float, help=f"Adam learning rate (default: {d['lr']})")
    g.add_argument("--seed", type=seed, help=f"seed of weights, validation split, shuffling and noise; on one machine and device the same seed gives the same run (default: {d['seed']})")
    g.add_argument("--val-size", type=positive_int, help=f"training images held out for validation, which picks best.pt (default: {d['val_size']})")
    g.add_argument("--subset", type=positive_int, help="train on only the first N training images, for quick runs (default: all)")
    g.add_argument("--exclude-digit", type=digit, help="leave this digit out of training and validation, to test anomaly detection on it (default: none)")
    g.add_argument("--binarize", action="store_true", default=None, help="binarized MNIST as in the literature: training pixels redrawn as Bernoulli(intensity) "
                   "at every use, evaluation on one fixed binarization of the test set")
    g.add_argument("--kl-warmup", type=non_negative_int, help="epochs over which the KL term's weight ramps from 0 to 1 (default: 0, none); "
                   "reported losses are always the plain BCE + KL")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], help="learning rate over the run: constant, or cosine decay to 0 (default: constant)")
    g.add_argument("--ema", type=decay, metavar="DECAY", help="keep an exponential moving average of the weights (Polyak averaging), which "
                   "smooths out Adam's step-to-step jitter: validation, best.pt and the evaluation use the average, Adam keeps training the "
                   f"weights; the decay ramps up as min(DECAY, (1+t)/(10+t)) over the first steps. 0 turns it off (default: {d['ema']})")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="arithmetic of the training step: bf16 autocast (weights, Adam and every "
                   "reported loss stay fp32) or fp32 (TF32 matrix products on CUDA); auto picks bf16 only on CPUs with Intel AMX, "
                   "where bf16 matrix units make it faster, and fp32 elsewhere (default: auto)")


def add_model_flags(m) -> None:
    d = MODEL_DEFAULTS
    m.add_argument("--latent-dim", type=positive_int, help=f"size of z (default: {d['latent_dim']})")
    m.add_argument("--channels", type=positive_int, nargs=2, metavar=("C1", "C2"), help=f"widths of the two stride-2 conv layers; the decoder mirrors them (default: {d['channels'][0]} {d['channels'][1]})")
    m.add_argument("--hidden-dim", type=non_negative_int, help=f"width of the fully connected layers between conv features and z, 0 for none (default: {d['hidden_dim']})")
    m.add_argument("--fc-layers", type=positive_int, help=f"number of those fully connected layers, in encoder and decoder each (default: {d['fc_layers']})")
    m.add_argument("--res-blocks", type=non_negative_int, help=f"residual blocks (two 3x3 convs) at 7x7 in encoder and decoder (default: {d['res_blocks']})")
    m.add_argument("--out-conv", type=non_negative_int, help=f"channels of an extra 3x3 convolution at 28x28 that makes the output logits, 0 for none (default: {d['out_conv']})")
    m.add_argument("--norm", choices=["none", "batch"], help=f"normalisation after the hidden convolutions (default: {d['norm']})")
    m.add_argument("--activation", choices=["relu", "silu", "elu", "leaky_relu", "gelu"], help=f"nonlinearity (default: {d['activation']})")


def add_running_flags(r) -> None:
    add_common(r, checkpoint=False)
    r.add_argument("--checkpoint-dir", help="where best.pt and last.pt go (default: models_mnist, or the folder of --resume's file)")
    r.add_argument("--resume", nargs="?", const=True, metavar="PATH", help="continue training from a checkpoint (default PATH: CHECKPOINT_DIR/last.pt) with its stored settings; "
                   "only --epochs may change")
    add_iwae_k(r)
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (epoch lines still print)")


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=anomaly.METHODS, default=anomaly.DEFAULT_METHOD, help="combined: the larger of the ELBO's z-score and "
                   "the z-scored sum of complexity and knn, the best at telling a digit the model never saw; complexity: the negative "
                   "ELBO minus 1.5 times a local pixel model's nats, so simple images no longer pass as typical; knn: mean distance of "
                   "the image's code to the 5 nearest codes of training images; elbo: the plain negative ELBO. All but elbo use the "
                   "reference stored in best.pt, or fit one from --data-dir when training was stopped before storing it. See docs/anomaly.md "
                   f"(default: {anomaly.DEFAULT_METHOD})")
    p.add_argument("--samples", type=score_samples, default=10, help="z samples averaged per image, at most 1,000 (default: 10)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the z samples (default: 0)")


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    epilog = "other commands: " + ", ".join(f"python main.py {c} --help" for c in COMMANDS[1:])
    parsers = {"train": Parser(prog="main.py", epilog=epilog, description="Train the convolutional VAE on MNIST, keep the best checkpoint by "
                                "validation loss, then evaluate it on the test set and draw pictures.")}
    add_training_flags(parsers["train"].add_argument_group("training"))
    add_model_flags(parsers["train"].add_argument_group("model"))
    add_running_flags(parsers["train"].add_argument_group("files and running"))

    p = parsers["evaluate"] = Parser(prog="main.py evaluate", description="Test-set metrics (negative ELBO, IWAE bound, active units, KL per dimension) and pictures for a checkpoint; writes metrics.json beside it.")
    add_common(p)
    add_iwae_k(p)
    p.add_argument("--seed", type=seed, default=None, help="seed of the evaluation's z samples (default: the checkpoint's training seed)")

    p = parsers["sample"] = Parser(prog="main.py sample", description="Decode z ~ N(0, I) into a grid of new digits (IMAGE_DIR/samples.png).")
    add_common(p)
    p.add_argument("--n", type=digit_count, default=64, help="number of digits, at most 1,024 (default: 64)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the z draws (default: 0)")

    p = parsers["score"] = Parser(prog="main.py score", description="Anomaly score (higher = stranger) of every test digit; writes anomaly_scores.csv beside the checkpoint and IMAGE_DIR/anomalies.png.")
    add_common(p)
    add_scoring_flags(p)

    p = parsers["reconstruct"] = Parser(prog="main.py reconstruct", description="Prepare your own digit pictures as MNIST was made, reconstruct them, and score them against the test digits.")
    p.add_argument("files", nargs="+", metavar="FILE", help="PNG/JPEG/... images of single digits, any size, dark-on-light or light-on-dark")
    add_common(p)
    add_scoring_flags(p)

    p = parsers["demo"] = Parser(prog="main.py demo", description="Serve a page on which you draw a digit and watch the VAE answer: "
                                 "the digit as the model sees it, its reconstruction, anomaly score and place in the latent space, "
                                 "sliders that move its code, and random samples. Works offline; Ctrl-C stops it.")
    add_common(p, files=False)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on; anything but a loopback address lets other machines in (default: 127.0.0.1)")
    p.add_argument("--port", type=number(int, 0, 65535, what="a port from 0 (any free one) to 65535"), default=8000, help="port to serve on (default: 8000)")
    return parsers


HANDLERS = {"train": train.train, "evaluate": evaluate.run, "sample": evaluate.sample, "score": anomaly.run_score, "reconstruct": anomaly.run_reconstruct, "demo": demo.run}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Denormal floats (tiny values that build up in Adam's state as training goes on) are ~100x slower on x86 CPUs;
    # flushing them to zero changes results only at rounding level.
    torch.set_flush_denormal(True)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    args = build_parsers()[command].parse_args(argv)
    try:
        return HANDLERS[command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping: a further Ctrl-C would only break the exit
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
