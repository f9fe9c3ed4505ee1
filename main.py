"""Train, evaluate and use a convolutional VAE on MNIST.

    python main.py                      train with the defaults (20 epochs), then evaluate and draw pictures
    python main.py evaluate             test-set metrics and pictures for a checkpoint
    python main.py sample               a grid of new digits
    python main.py score                anomaly scores of the test digits
    python main.py reconstruct FILE...  score and reconstruct your own digit images
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import utils
from model import (VAE, CheckpointError, VAEConfig, config_dict, iwae_log_weights, iwae_nll, kl_per_dim, load_checkpoint,
                   model_config, neg_elbo_terms)
from utils import UserError

COMMANDS = ("train", "evaluate", "sample", "score", "reconstruct")
EVAL_BATCH = 250

# Training settings and their defaults. Every key is stored in a checkpoint's config; on --resume only
# `epochs` may change, because any other change would no longer continue the same run.
TRAIN_DEFAULTS = dict(
    epochs=20, batch_size=64, lr=1e-3, seed=1, val_size=5000, subset=None, exclude_digit=None,
    binarize=False, kl_warmup=0, lr_schedule="constant", precision="auto", ema=0.999,
)
# What a checkpoint written before a setting existed was trained with, so that --resume continues it faithfully.
SETTINGS_BEFORE_THEY_EXISTED = dict(precision="fp32", ema=0.0)
MODEL_DEFAULTS = config_dict(VAEConfig())


# ----------------------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    """argparse that says what is wrong in one line (exit 2) instead of dumping the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def decay(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def digit(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 9:
        raise argparse.ArgumentTypeError(f"must be a digit 0-9, got {text}")
    return value


def add_common(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    p.add_argument("--data-dir", default="data", help="folder holding the four MNIST IDX files (.gz or not; also looks in MNIST/raw); downloaded there when absent (default: data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to compute; auto picks cuda, then mps, then cpu (default: auto)")
    p.add_argument("--image-dir", default="images", help="where pictures are written (default: images)")
    if checkpoint:
        p.add_argument("--checkpoint", default="models_mnist/best.pt", help="checkpoint to use (default: models_mnist/best.pt)")


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iwae-k", type=positive_int, default=100, help="importance samples per test image for the IWAE bound on -log p(x) (default: 100)")
    p.add_argument("--seed", type=int, default=None, help="seed of the evaluation's z samples (default: the checkpoint's training seed)")


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    epilog = "other commands: " + ", ".join(f"python main.py {c} --help" for c in COMMANDS[1:])
    train = Parser(prog="main.py", description="Train the convolutional VAE on MNIST, keep the best checkpoint by validation loss, then evaluate it on the test set and draw pictures.", epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = train.add_argument_group("training (the seed's defaults)")
    g.add_argument("--epochs", type=positive_int, help=f"passes over the training set (default: {TRAIN_DEFAULTS['epochs']}); with --resume, the new total")
    g.add_argument("--batch-size", type=positive_int, help=f"images per Adam step (default: {TRAIN_DEFAULTS['batch_size']})")
    g.add_argument("--lr", type=positive_float, help=f"Adam learning rate (default: {TRAIN_DEFAULTS['lr']})")
    g.add_argument("--seed", type=int, help=f"seed of weights, split, shuffling and noise (default: {TRAIN_DEFAULTS['seed']})")
    g.add_argument("--val-size", type=positive_int, help=f"training images held out for validation (default: {TRAIN_DEFAULTS['val_size']})")
    g.add_argument("--subset", type=positive_int, help="train on only the first N training images, for quick runs (default: all)")
    g.add_argument("--exclude-digit", type=digit, help="leave this digit out of training and validation, to test anomaly detection on it (default: none)")
    g.add_argument("--binarize", action="store_true", default=None, help="dynamically binarized MNIST (pixels resampled as Bernoulli every draw; test set binarized once), as in the literature")
    g.add_argument("--kl-warmup", type=non_negative_int, help="epochs over which the KL weight ramps from 0 to 1 (default: 0, none); reported losses are always the plain BCE + KL")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], help="learning rate over the run: constant, or cosine decay to 0 (default: constant)")
    g.add_argument("--ema", type=decay, metavar="DECAY", help="keep an exponential moving average of the weights (Polyak averaging): after every Adam step, "
                   "average = DECAY * average + (1 - DECAY) * weights; validation, best.pt and the evaluation use the average, "
                   f"the optimizer keeps training the weights; the decay ramps up over the first steps as min(DECAY, (1+t)/(10+t)). "
                   f"0 turns it off (default: {TRAIN_DEFAULTS['ema']})")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="arithmetic of the training step: bf16 autocast (weights, Adam and every "
                   "reported loss stay fp32) or plain fp32 (TF32 matmuls on CUDA); auto picks bf16 on CPUs with Intel AMX, fp32 elsewhere, GPUs included, "
                   "where this small model's step is bound by kernel launches rather than arithmetic (default: auto)")
    m = train.add_argument_group("model")
    m.add_argument("--latent-dim", type=positive_int, help=f"size of z (default: {MODEL_DEFAULTS['latent_dim']})")
    m.add_argument("--channels", type=positive_int, nargs=2, metavar=("C1", "C2"), help=f"widths of the two stride-2 conv layers (default: {' '.join(map(str, MODEL_DEFAULTS['channels']))})")
    m.add_argument("--hidden-dim", type=int, help=f"width of the fully connected layers between conv features and z, 0 for none (default: {MODEL_DEFAULTS['hidden_dim']})")
    m.add_argument("--fc-layers", type=positive_int, help=f"number of those fully connected layers, in encoder and decoder each (default: {MODEL_DEFAULTS['fc_layers']})")
    m.add_argument("--res-blocks", type=int, help=f"residual blocks at 7x7 in encoder and decoder (default: {MODEL_DEFAULTS['res_blocks']})")
    m.add_argument("--out-conv", type=int, help=f"channels of an extra 3x3 convolution at 28x28 that makes the output logits, 0 for none (default: {MODEL_DEFAULTS['out_conv']})")
    m.add_argument("--norm", choices=["none", "batch"], help=f"normalisation after the hidden convolutions (default: {MODEL_DEFAULTS['norm']})")
    m.add_argument("--activation", choices=["relu", "silu", "elu", "leaky_relu", "gelu"], help=f"nonlinearity (default: {MODEL_DEFAULTS['activation']})")
    r = train.add_argument_group("files and running")
    add_common(r, checkpoint=False)
    r.add_argument("--checkpoint-dir", help="where best.pt and last.pt go (default: models_mnist, or the folder of --resume's file)")
    r.add_argument("--resume", nargs="?", const=True, metavar="PATH", help="continue training from a checkpoint (default PATH: CHECKPOINT_DIR/last.pt) with its stored settings")
    r.add_argument("--iwae-k", type=positive_int, default=100, help="importance samples per test image for the final IWAE bound (default: 100)")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the training step (default: off; see the README's speed table)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (epoch lines still print)")

    evaluate = Parser(prog="main.py evaluate", description="Test-set metrics (negative ELBO, IWAE bound, active units, KL per dimension) and pictures for a checkpoint; writes metrics.json beside it.")
    add_common(evaluate)
    add_eval(evaluate)

    sample = Parser(prog="main.py sample", description="Decode z ~ N(0, I) into a grid of new digits (IMAGE_DIR/samples.png).")
    add_common(sample)
    sample.add_argument("--n", type=positive_int, default=64, help="number of digits (default: 64)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the z draws (default: 0)")

    score = Parser(prog="main.py score", description="Anomaly score (negative ELBO in nats, higher = stranger) of every test digit; writes anomaly_scores.csv beside the checkpoint and IMAGE_DIR/anomalies.png.")
    add_common(score)
    score.add_argument("--samples", type=positive_int, default=10, help="z samples averaged per image (default: 10)")
    score.add_argument("--iwae-k", type=positive_int, default=None, help="also compute the IWAE bound with this many samples (default: off)")
    score.add_argument("--seed", type=int, default=0, help="seed of the z samples (default: 0)")

    reconstruct = Parser(prog="main.py reconstruct", description="Preprocess your own digit images as MNIST was made, reconstruct them and score them against the test set.")
    reconstruct.add_argument("files", nargs="+", metavar="FILE", help="PNG/JPEG/... images of single digits, any size, dark-on-light or light-on-dark")
    add_common(reconstruct)
    reconstruct.add_argument("--samples", type=positive_int, default=10, help="z samples averaged per image (default: 10)")
    reconstruct.add_argument("--seed", type=int, default=0, help="seed of the z samples (default: 0)")
    return {"train": train, "evaluate": evaluate, "sample": sample, "score": score, "reconstruct": reconstruct}


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles (native bf16 matrix units), as torch's own CPU feature check reports it."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so guarded: absent means "no"
    return bool(check()) if check is not None else False


def pick_precision(name: str, device: torch.device) -> str:
    """The training step's arithmetic: auto is bf16 autocast on CPUs with Intel AMX (native bf16 matrix units), else fp32."""
    if name == "auto":
        # Not bf16 on CUDA: at batch 64 this model's step is bound by kernel launches, not arithmetic, and autocast's
        # casts add launches (H200: 13,473 images/s with bf16 against 16,432 with fp32, which runs as TF32 there).
        return "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"
    if name == "bf16" and device.type == "mps":
        raise UserError("--precision bf16 is supported on cpu and cuda; on mps use --precision fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
    return name


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device auto or cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- training


def resolve_config(args: argparse.Namespace) -> tuple[dict, dict | None, Path]:
    """The run's full config, the checkpoint to resume from (or None), and the checkpoint folder."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "channels" in given:
        given["channels"] = list(given["channels"])
    keys = list(TRAIN_DEFAULTS) + list(MODEL_DEFAULTS)
    if not args.resume:
        config = {k: given.get(k, TRAIN_DEFAULTS.get(k, MODEL_DEFAULTS.get(k))) for k in keys}
        try:
            VAEConfig(**{k: config[k] for k in MODEL_DEFAULTS})
        except ValueError as err:
            raise UserError(f"invalid model settings: {err}") from None
        return config, None, Path(args.checkpoint_dir or "models_mnist")
    path = Path(args.checkpoint_dir or "models_mnist") / "last.pt" if args.resume is True else Path(args.resume)
    ckpt = load_checkpoint(path)
    # the stored settings, the architecture validated; settings the checkpoint predates take the values they had then
    config = dict(ckpt["config"]) | config_dict(model_config(ckpt, path))
    for key, value in SETTINGS_BEFORE_THEY_EXISTED.items():
        config.setdefault(key, value)
    for key in keys:
        if key in given and key != "epochs" and given[key] != config.get(key):
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"{flag} {given[key]} differs from the checkpoint's {config.get(key)}; --resume continues the stored run "
                f"(only --epochs may change): drop {flag}, or start a new run with another --checkpoint-dir"
            )
    if "epochs" in given:
        if given["epochs"] < ckpt["epoch"]:
            raise UserError(f"--epochs {given['epochs']} is fewer than the {ckpt['epoch']} epochs {path} already completed")
        config["epochs"] = given["epochs"]
    return config, ckpt, Path(args.checkpoint_dir) if args.checkpoint_dir else path.parent


def prepare_data(config: dict, mnist: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Train/validation uint8 image tensors on `device`, as the config asks (split, held-out digit, subset)."""
    train_idx, val_idx = data.split_indices(len(mnist["train_images"]), config["val_size"], config["seed"])
    if config["exclude_digit"] is not None:
        keep = mnist["train_labels"] != config["exclude_digit"]
        train_idx, val_idx = train_idx[keep[train_idx]], val_idx[keep[val_idx]]
    if config["subset"] is not None:
        train_idx = train_idx[: config["subset"]]
    return {"train": mnist["train_images"][train_idx].to(device), "val": mnist["train_images"][val_idx].to(device)}


def eval_images(images: torch.Tensor, binarized: bool, seed: int) -> torch.Tensor:
    """Float images for evaluation: binarized once with a fixed seed in --binarize mode, else intensities."""
    x = data.to_float(images)
    if binarized:
        x = data.binarize(x, torch.Generator(device=x.device).manual_seed(seed + 12345))
    return x


def held_out_test_images(mnist: dict[str, torch.Tensor], config: dict, device: torch.device) -> torch.Tensor:
    """The 10,000 test images as the checkpoint's run evaluates them (binarized once in --binarize runs)."""
    return eval_images(mnist["test_images"].to(device), config.get("binarize", False), config["seed"])


@torch.inference_mode()
def neg_elbo(model: VAE, x: torch.Tensor, seed: int, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Mean negative ELBO, bce and kl per image in nats over float images x, z sampled with a seeded generator."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    bce_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    kl_sum = torch.zeros_like(bce_sum)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        logits, mu, logvar = model(xb, gen)
        bce, kl = neg_elbo_terms(logits, xb, mu, logvar)
        bce_sum += bce.sum()
        kl_sum += kl.sum()
    bce, kl = bce_sum.item() / len(x), kl_sum.item() / len(x)
    return {"loss": bce + kl, "bce": bce, "kl": kl}


def prepare_model(model: VAE, device: torch.device) -> VAE:
    """The model on `device`: channels-last on the CPU (oneDNN's fast layout for these convs: 1.4x here);
    TF32 tensor cores for convs and matmuls on CUDA (fp32 range, 10-bit mantissa products)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


def make_optimizer(model: VAE, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam; the fused kernel where torch has one (one pass over the weights instead of a dozen)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))


def train_step_fn(model: VAE, opt: torch.optim.Optimizer, compile_step: bool, precision: str = "fp32",
                  average: "WeightAverage | None" = None):
    """One Adam step on a batch (and the weight average's update, if any); returns the batch's summed bce and kl
    as tensors (no host sync per step).

    The noise is drawn outside the differentiable part, so the compiled and the eager step consume the
    same random numbers; kl_weight is a tensor so that KL warm-up does not trigger recompiles.
    With precision "bf16" the convolutions and matrix products run in bf16 (torch.autocast); the loss is
    computed in fp32 from their outputs, and the weights and Adam's state stay fp32.
    """
    device_type = next(model.parameters()).device.type

    def loss_terms(x: torch.Tensor, eps: torch.Tensor, kl_weight: torch.Tensor):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            mu, logvar = model.encode(x)
            logits = model.decode(mu + eps * torch.exp(0.5 * logvar))
        mu, logvar = mu.float(), logvar.float()
        bce, kl = neg_elbo_terms(logits.float(), x, mu, logvar)
        return (bce + kl_weight * kl).mean(), bce.detach().sum(), kl.detach().sum()

    if compile_step:
        loss_terms = torch.compile(loss_terms, dynamic=False)

    def step(x: torch.Tensor, gen: torch.Generator, kl_weight: float):
        eps = torch.randn(x.shape[0], model.config.latent_dim, generator=gen, device=x.device)
        loss, bce, kl = loss_terms(x, eps, torch.tensor(kl_weight, device=x.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if average is not None:
            average.update()
        return bce, kl

    return step


class WeightAverage:
    """An exponential moving average of a model's weights (and float buffers), updated after every step in one
    fused pass (no host sync). The decay ramps up as min(decay, (1 + t) / (10 + t)) over the first steps, so a
    short run is not dominated by the initial weights."""

    def __init__(self, model: VAE, decay: float, updates: int = 0) -> None:
        self.decay, self.updates = decay, updates
        self.model = copy.deepcopy(model)
        self.live = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        self.avg = [t for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]
        for t in self.model.parameters():
            t.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.avg, self.live, 1 - decay)
        self.updates += 1


class StopFlag:
    """Ctrl-C sets a flag the training loop checks between steps, so a stop never lands mid-update; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.stop = False
        self.previous = None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupt: stopping after this step to save last.pt (Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def learning_rate(config: dict, epoch_progress: float) -> float:
    if config["lr_schedule"] == "cosine":
        return config["lr"] * 0.5 * (1 + math.cos(math.pi * epoch_progress / config["epochs"]))
    return config["lr"]


def train(args: argparse.Namespace) -> int:
    config, ckpt, ckpt_dir = resolve_config(args)
    device = pick_device(args.device)
    config["precision"] = pick_precision(config["precision"], device)
    mnist = data.load_mnist(args.data_dir)
    sets = prepare_data(config, mnist, device)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config["seed"])
    model = prepare_model(VAE(VAEConfig(**{k: config[k] for k in MODEL_DEFAULTS})), device)
    opt = make_optimizer(model, config["lr"], device)
    average = WeightAverage(model, config["ema"]) if config["ema"] else None
    evaluated = average.model if average else model  # the weights that are validated, saved as "model" and evaluated
    shuffle_gen = torch.Generator().manual_seed(config["seed"])
    noise_gen = torch.Generator(device=device).manual_seed(config["seed"] + 1)
    state = {"epoch": 0, "best_val_loss": math.inf, "history": [], "partial": None}
    if ckpt is not None:
        model.load_state_dict(ckpt["train_weights"] if average else ckpt["model"])
        if average:
            average.model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        shuffle_gen.set_state(ckpt["rng"]["shuffle"])
        noise_gen.set_state(ckpt["rng"]["noise"])
        state = {k: ckpt[k] for k in state if k in ckpt} | {"partial": ckpt.get("partial")}
        print(f"resuming from epoch {state['epoch']}" + (f", step {state['partial']['step']}" if state["partial"] else ""))
    if state["epoch"] >= config["epochs"]:
        print(f"already trained {state['epoch']} epochs (pass --epochs N, more than {state['epoch']}, to train longer); evaluating")
        run_evaluation(ckpt_dir / "best.pt", mnist, args.device, args.image_dir, args.iwae_k, seed=None)
        return 0

    train_x, val_x = sets["train"], eval_images(sets["val"], config["binarize"], config["seed"])
    n_batches = math.ceil(len(train_x) / config["batch_size"])
    if average and ckpt is not None:  # the steps taken so far set where the average's decay ramp stands
        average.updates = state["epoch"] * n_batches + (state["partial"]["step"] if state["partial"] else 0)
    step = train_step_fn(model, opt, args.compile, config["precision"], average)
    bin_gen = torch.Generator(device=device).manual_seed(config["seed"] + 2) if config["binarize"] else None
    if bin_gen is not None and ckpt is not None:
        bin_gen.set_state(ckpt["rng"]["binarize"])
    print(f"training on {len(train_x)} images ({len(val_x)} for validation) on {device} ({config['precision']}), "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    def checkpoint(partial: dict | None = None) -> dict:
        return {
            "format": "vae-mnist/1",
            "config": config,
            "model": evaluated.state_dict(),
            **({"train_weights": model.state_dict()} if average else {}),
            "optimizer": opt.state_dict(),
            "epoch": state["epoch"],
            "best_val_loss": state["best_val_loss"],
            "history": state["history"],
            "rng": {"shuffle": shuffle_gen.get_state(), "noise": noise_gen.get_state(), **({"binarize": bin_gen.get_state()} if bin_gen else {})},
            "partial": partial,
            "versions": utils.versions(),
        }

    with StopFlag() as stop:
        while state["epoch"] < config["epochs"] and not stop.stop:
            epoch = state["epoch"] + 1
            partial, state["partial"] = state["partial"], None
            if partial:  # replay this epoch's shuffle, then skip the batches already done
                shuffle_gen.set_state(partial["shuffle_at_start"])
            shuffle_start = shuffle_gen.get_state()
            first = partial["step"] if partial else 0
            sums = partial["sums"].to(device) if partial else torch.zeros(2, device=device, dtype=torch.float64)
            seconds = partial["seconds"] if partial else 0.0
            model.train()
            t0 = time.perf_counter()
            bar = tqdm(data.batches(train_x, config["batch_size"], shuffle_gen, start=first), total=n_batches, initial=first,
                       desc=f"epoch {epoch}/{config['epochs']}", leave=False, disable=not args.progress, dynamic_ncols=True)
            done = first
            for x in bar:
                progress = state["epoch"] + done / n_batches
                for group in opt.param_groups:
                    group["lr"] = learning_rate(config, progress)
                kl_weight = min(1.0, progress / config["kl_warmup"]) if config["kl_warmup"] else 1.0
                if bin_gen is not None:
                    x = data.binarize(x, bin_gen)
                bce, kl = step(x, noise_gen, kl_weight)
                sums[0] += bce
                sums[1] += kl
                done += 1
                if done % 100 == 0 and args.progress:
                    n_seen = min(done * config["batch_size"], len(train_x))
                    b, k = (sums / n_seen).tolist()
                    bar.set_postfix(loss=f"{b + k:.2f}", bce=f"{b:.2f}", kl=f"{k:.2f}")
                if stop.stop and done < n_batches:
                    break
            bar.close()
            seconds += time.perf_counter() - t0
            if done < n_batches:  # interrupted inside the epoch: save a resumable mid-epoch state and stop
                state["partial"] = {"step": done, "sums": sums.cpu(), "seconds": seconds, "shuffle_at_start": shuffle_start}
                utils.save_atomic(checkpoint(state["partial"]), ckpt_dir / "last.pt")
                break
            evaluated.eval()
            val = neg_elbo(evaluated, val_x, config["seed"])
            bce, kl = (sums / len(train_x)).tolist()
            state["epoch"] = epoch
            state["history"].append({"epoch": epoch, "train_loss": bce + kl, "train_bce": bce, "train_kl": kl,
                                     "val_loss": val["loss"], "val_bce": val["bce"], "val_kl": val["kl"], "seconds": seconds})
            improved = val["loss"] < state["best_val_loss"]
            if improved:
                state["best_val_loss"] = val["loss"]
            ckpt_now = checkpoint()
            if improved:
                utils.save_atomic(ckpt_now, ckpt_dir / "best.pt")
            utils.save_atomic(ckpt_now, ckpt_dir / "last.pt")
            print(f"epoch {epoch:3d}/{config['epochs']}  train {bce + kl:8.3f}  val {val['loss']:8.3f} "
                  f"(bce {val['bce']:.3f}, kl {val['kl']:.3f})  {seconds:6.1f}s" + ("  saved best.pt" if improved else ""), flush=True)

    if stop.stop:
        print(f"stopped; {ckpt_dir / 'last.pt'} holds the run so far. Resume with:\n  {resume_command(args, ckpt_dir)}", flush=True)
        return 130
    best = ckpt_dir / "best.pt"
    print(f"training done; evaluating {best} on the 10,000 test images")
    run_evaluation(best, mnist, args.device, args.image_dir, args.iwae_k, seed=None)
    return 0


def resume_command(args: argparse.Namespace, ckpt_dir: Path) -> str:
    parts = ["python", "main.py", "--resume", str(ckpt_dir / "last.pt")]
    parser = build_parsers()["train"]
    for flag in ("data_dir", "image_dir", "device"):
        if getattr(args, flag) != parser.get_default(flag):
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.epochs is not None:
        parts += ["--epochs", str(args.epochs)]
    return shlex.join(parts)


# ----------------------------------------------------------------------------- evaluation


def bce_floor(x: torch.Tensor) -> torch.Tensor:
    """Per-image sum of per-pixel binary entropies: the lowest bce any model can reach on these images."""
    p = x.double().flatten(1)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)).sum(1)


@torch.inference_mode()
def test_metrics(model: VAE, x: torch.Tensor, iwae_k: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Negative ELBO, IWAE bound, bce floor, active units and KL per dimension over float images x; also the posterior means."""
    batch_size = 100
    elbo = neg_elbo(model, x, seed)
    gen = torch.Generator(device=x.device).manual_seed(seed + 1)
    nll_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    kl_dims = torch.zeros(model.config.latent_dim, dtype=torch.float64, device=x.device)
    means = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        nll_sum += iwae_nll(iwae_log_weights(model, xb, iwae_k, gen)).sum()
        mu, logvar = model.encode(xb)
        kl_dims += kl_per_dim(mu, logvar).sum(0)
        means.append(mu)
    mu = torch.cat(means)
    floor = bce_floor(x).mean().item()
    kl_means = (kl_dims / len(x)).tolist()
    metrics = {
        "test_loss": elbo["loss"], "test_bce": elbo["bce"], "test_kl": elbo["kl"],
        "test_iwae_nll": nll_sum.item() / len(x), "iwae_k": iwae_k,
        "bce_floor": floor, "bce_above_floor": elbo["bce"] - floor,
        "active_units": int((mu.var(0) > 0.01).sum()), "latent_dim": model.config.latent_dim,
        "kl_per_dim": kl_means, "images": len(x), "seed": seed,
    }
    return metrics, mu


def print_metrics(m: dict) -> None:
    top = sorted(range(len(m["kl_per_dim"])), key=lambda d: -m["kl_per_dim"][d])[:5]
    rows = [
        ("negative ELBO (test loss)", f"{m['test_loss']:.3f}"),
        ("  reconstruction (bce)", f"{m['test_bce']:.3f}"),
        ("  KL(q(z|x) || p(z))", f"{m['test_kl']:.3f}"),
        (f"IWAE bound on -log p(x), k={m['iwae_k']}", f"{m['test_iwae_nll']:.3f}"),
        ("bce floor (pixel entropy of the data)", f"{m['bce_floor']:.3f}"),
        ("bce above the floor", f"{m['bce_above_floor']:.3f}"),
        ("active units (Var[mu] > 0.01)", f"{m['active_units']} of {m['latent_dim']}"),
        ("largest KL per dimension", ", ".join(f"z{d}: {m['kl_per_dim'][d]:.2f}" for d in top)),
    ]
    print(f"test set: {m['images']:,} images, checkpoint {m['checkpoint']} (epoch {m['epoch']}), seed {m['seed']}; nats per image")
    for name, value in rows:
        print(f"  {name:<40} {value}")


INTERPOLATION_PAIRS = ((0, 6), (1, 7), (2, 5), (3, 8), (4, 9), (7, 2))


@torch.inference_mode()
def draw_pictures(model: VAE, history: list[dict], x: torch.Tensor, labels: torch.Tensor, mu: torch.Tensor,
                  kl_means: list[float], image_dir: Path, seed: int) -> list[Path]:
    """Every picture `evaluate` promises, from the model and the test set (float images x, posterior means mu)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    written = [
        utils.plot_reconstructions(x[:12], model.reconstruct(x[:12]), image_dir / "reconstructed_image.png"),
        utils.plot_grid(model.sample(64, gen), "Samples: 64 digits decoded from z ~ N(0, I)", image_dir / "samples.png"),
    ]
    if history:
        written.append(utils.plot_loss_curves(history, image_dir / "loss_curves.png"))
    labels = labels.to(mu.device)
    rows, names = [], []
    for a, b in INTERPOLATION_PAIRS:
        ia, ib = (labels == a).nonzero(), (labels == b).nonzero()
        if len(ia) and len(ib):
            t = torch.linspace(0, 1, 10, device=mu.device)[:, None]
            rows.append(torch.sigmoid(model.decode((1 - t) * mu[ia[0, 0]] + t * mu[ib[0, 0]])))
            names.append(f"{a} -> {b}")
    column_labels = [f"{v:.2f}" for v in torch.linspace(0, 1, 10).tolist()]
    written.append(utils.plot_rows(rows, names, "Latent interpolation between test digits (decoded linear path between posterior means)",
                                   image_dir / "interpolation.png", column_labels=column_labels))
    centred = (mu - mu.mean(0)).double()
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    explained = (s.square() / s.square().sum()).tolist()
    written.append(utils.plot_latent_space((centred @ v[:2].T).float(), labels, explained, image_dir / "latent_space.png"))
    dims = sorted(range(len(kl_means)), key=lambda d: -kl_means[d])[:8]
    values = torch.linspace(-3, 3, 11, device=mu.device)
    rows = []
    for d in dims:
        z = mu[0].repeat(len(values), 1)
        z[:, d] = values
        rows.append(torch.sigmoid(model.decode(z)))
    written.append(utils.plot_rows(rows, [f"z{d} (KL {kl_means[d]:.1f})" for d in dims],
                                   f"Latent traversal: the {len(dims)} dimensions with most KL, swept from -3 to 3 (others at a test digit's mean)",
                                   image_dir / "latent_traversal.png", column_labels=[f"{v:+.1f}" for v in values.tolist()]))
    return written


def run_history(checkpoint: Path, ckpt: dict) -> list[dict]:
    """The whole run's per-epoch history: best.pt stops at its own epoch, so prefer the same run's last.pt."""
    last = checkpoint.parent / "last.pt"
    if checkpoint.name != "last.pt" and last.is_file():
        try:
            other = load_checkpoint(last)
        except CheckpointError:
            return ckpt.get("history", [])
        mine = ckpt.get("history", [])
        if other.get("config") == ckpt.get("config") or other.get("history", [])[: len(mine)] == mine:
            return other.get("history", mine)
    return ckpt.get("history", [])


def load_for_use(checkpoint: str | Path, device_name: str) -> tuple[VAE, dict, torch.device]:
    """The checkpoint's model ready for inference on the chosen device, and the checkpoint itself (read once)."""
    device = pick_device(device_name)
    ckpt = load_checkpoint(checkpoint, map_location=device)
    return prepare_model(VAE.from_loaded(ckpt, checkpoint, device), device), ckpt, device


def run_evaluation(checkpoint: str | Path, mnist: dict[str, torch.Tensor], device_name: str, image_dir: str, iwae_k: int,
                   seed: int | None, loaded: tuple[VAE, dict, torch.device] | None = None) -> dict:
    """`python main.py evaluate`, also run at the end of training: prints the table, writes metrics.json and the pictures.
    `loaded` is load_for_use's result when the caller already has it."""
    checkpoint = Path(checkpoint)
    model, ckpt, device = loaded or load_for_use(checkpoint, device_name)
    config = ckpt["config"]
    seed = config["seed"] if seed is None else seed
    x = held_out_test_images(mnist, config, device)
    t0 = time.perf_counter()
    metrics, mu = test_metrics(model, x, iwae_k, seed)
    metrics |= {"checkpoint": str(checkpoint), "epoch": ckpt.get("epoch"), "binarized": bool(config.get("binarize")),
                "exclude_digit": config.get("exclude_digit"), "seconds": time.perf_counter() - t0}
    print_metrics(metrics)
    utils.write_text_atomic(json.dumps(metrics, indent=2) + "\n", checkpoint.parent / "metrics.json")
    pictures = draw_pictures(model, run_history(checkpoint, ckpt), x, mnist["test_labels"], mu, metrics["kl_per_dim"], Path(image_dir), seed)
    print(f"wrote {checkpoint.parent / 'metrics.json'} and " + ", ".join(str(p) for p in pictures))
    return metrics


def cmd_evaluate(args: argparse.Namespace) -> int:
    loaded = load_for_use(args.checkpoint, args.device)  # a bad checkpoint is reported before the data set is read
    run_evaluation(args.checkpoint, data.load_mnist(args.data_dir), args.device, args.image_dir, args.iwae_k, args.seed, loaded)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    model, _, device = load_for_use(args.checkpoint, args.device)
    images = model.sample(args.n, torch.Generator(device=device).manual_seed(args.seed))
    path = utils.plot_grid(images, f"Samples: {args.n} digits decoded from z ~ N(0, I) (seed {args.seed})", Path(args.image_dir) / "samples.png")
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- anomaly scores


@torch.inference_mode()
def anomaly_scores(model: VAE, x: torch.Tensor, samples: int, seed: int, iwae_k: int | None = None, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """Per-image negative ELBO (score), bce and kl, each averaged over `samples` z draws; optionally the IWAE bound."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = {"score": [], "bce": [], "kl": []} | ({"iwae_nll": []} if iwae_k else {})
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        mu, logvar = model.encode(xb)
        bce = torch.zeros(len(xb), device=x.device)
        for _ in range(samples):  # kl is analytic: the same for every draw
            sample_bce, kl = neg_elbo_terms(model.decode(model.reparameterize(mu, logvar, gen)), xb, mu, logvar)
            bce += sample_bce
        bce /= samples
        out["score"].append(bce + kl)
        out["bce"].append(bce)
        out["kl"].append(kl)
        if iwae_k:
            out["iwae_nll"].append(iwae_nll(iwae_log_weights(model, xb, iwae_k, gen)))
    return {k: torch.cat(v).cpu() for k, v in out.items()}


def cmd_score(args: argparse.Namespace) -> int:
    model, ckpt, device = load_for_use(args.checkpoint, args.device)
    config = ckpt["config"]
    mnist = data.load_mnist(args.data_dir)
    x = held_out_test_images(mnist, config, device)
    labels = mnist["test_labels"]
    scores = anomaly_scores(model, x, args.samples, args.seed, args.iwae_k)
    columns = ["score", "bce", "kl"] + (["iwae_nll"] if args.iwae_k else [])
    lines = ["index,label," + ",".join(columns)]
    lines += [f"{i},{int(labels[i])}," + ",".join(f"{scores[c][i].item():.4f}" for c in columns) for i in range(len(labels))]
    csv_path = Path(args.checkpoint).parent / "anomaly_scores.csv"
    utils.write_text_atomic("\n".join(lines) + "\n", csv_path)

    s = scores["score"]
    q = torch.quantile(s.double(), torch.tensor([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99], dtype=torch.float64)).tolist()
    print(f"anomaly scores (negative ELBO, nats; {args.samples} z samples per image) of {len(s):,} test digits, checkpoint {args.checkpoint}")
    print(f"  mean {s.mean():.2f}  std {s.std():.2f}  min {s.min():.2f}  max {s.max():.2f}")
    print("  percentiles  " + "  ".join(f"p{p}: {v:.2f}" for p, v in zip((1, 5, 25, 50, 75, 95, 99), q)))
    print("  mean score by digit  " + "  ".join(f"{d}: {s[labels == d].mean():.1f}" for d in range(10)))
    held_out = config.get("exclude_digit")
    if held_out is not None:
        auc = utils.auroc(s, labels == held_out)
        print(f"  digit {held_out} was held out of training: AUROC of telling it from the other digits by score = {auc:.4f}")
    order = torch.argsort(s)
    sections = []
    for title, idx in (("16 most anomalous test digits (highest score)", order.flip(0)[:16]), ("16 most typical test digits (lowest score)", order[:16])):
        xb = x[idx.to(device)]
        sections.append((title, xb.cpu(), model.reconstruct(xb).cpu(), [f"{int(labels[i])}: {s[i]:.0f}" for i in idx]))
    path = utils.plot_anomalies(sections, Path(args.image_dir) / "anomalies.png")
    print(f"wrote {csv_path} and {path}")
    return 0


def test_set_scores(args: argparse.Namespace, model: VAE, config: dict, device: torch.device) -> torch.Tensor:
    """The test digits' scores: from anomaly_scores.csv beside the checkpoint when it is newer than the checkpoint, else computed."""
    csv_path = Path(args.checkpoint).parent / "anomaly_scores.csv"
    if csv_path.is_file() and csv_path.stat().st_mtime >= Path(args.checkpoint).stat().st_mtime:
        rows = csv_path.read_text().splitlines()[1:]
        if len(rows) == 10000:
            return torch.tensor([float(r.split(",")[2]) for r in rows])
    print("scoring the test set for comparison (run `python main.py score` once to keep these in anomaly_scores.csv)")
    mnist = data.load_mnist(args.data_dir)
    x = held_out_test_images(mnist, config, device)
    return anomaly_scores(model, x, args.samples, args.seed)["score"]


def cmd_reconstruct(args: argparse.Namespace) -> int:
    model, ckpt, device = load_for_use(args.checkpoint, args.device)
    inputs, failed = [], 0
    for name in args.files:
        try:
            original, x = data.load_digit_image(name)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        inputs.append((name, original, x))
    if inputs:
        test_scores = test_set_scores(args, model, ckpt["config"], device)
        for name, original, x in inputs:
            xb = x.to(device)[None]
            if ckpt["config"].get("binarize"):
                xb = data.binarize(xb, torch.Generator(device=device).manual_seed(args.seed))
            s = anomaly_scores(model, xb, args.samples, args.seed)
            score = s["score"].item()
            percentile = 100.0 * (test_scores <= score).double().mean().item()
            out = Path(args.image_dir) / f"reconstructed_{Path(name).stem}.png"
            title = f"{Path(name).name}: score {score:.1f} nats (bce {s['bce'].item():.1f}, kl {s['kl'].item():.1f}), above {percentile:.1f}% of test digits"
            utils.plot_user_reconstruction(original, xb[0], model.reconstruct(xb)[0], title, out)
            print(f"{name}: score {score:.2f} nats, percentile {percentile:.1f} among test digits; wrote {out}")
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Denormal floats (tiny values that build up in Adam's state as training goes on) are ~100x slower on x86
    # CPUs; flushing them to zero made training 1.5x faster here and changes results only at rounding level.
    torch.set_flush_denormal(True)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    args = build_parsers()[command].parse_args(argv)
    try:
        handler = {"train": train, "evaluate": cmd_evaluate, "sample": cmd_sample, "score": cmd_score, "reconstruct": cmd_reconstruct}
        return handler[command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
