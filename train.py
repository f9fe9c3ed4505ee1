"""Train the VAE. Read it top to bottom: the step (a batch becomes one Adam update), the run, one
epoch, validation and the checkpoints, then train(), the whole run: `train.train(train.start(...))`
is what the command line and a notebook call (README, "Use it from Python")."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import checkpoint
import data
from config import TrainConfig, VAEConfig, float_settings, pick_device, resolve_precision
from files import UserError
from model import VAE, mean_neg_elbo, neg_elbo_terms, on_device

# steps between reads of the running loss (progress bar, NaN check): one host sync each
CHECK_EVERY = 100
LOWER_LR = "Start a new run with a lower lr (this run: {lr:g})"


def learning_rate(config: TrainConfig, at: float) -> float:
    """The learning rate `at` epochs into the run: constant, or a cosine decay to 0."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * at / config.epochs))
    return config.lr


def kl_weight(config: TrainConfig, at: float) -> float:
    """KL warm-up: the KL term's weight ramps from 0 to 1 over the first kl_warmup epochs."""
    return min(1.0, at / config.kl_warmup) if config.kl_warmup else 1.0


def train_step(model, optimizer, average, x, noise: torch.Generator, kl_weight: float, precision):
    """One batch of float images x becomes one Adam update; returns the batch's summed bce and kl as
    tensors (no step waits for the device). With precision "bf16" the convolutions and matrix
    products run in bf16 (autocast); the loss, the weights and Adam's state stay fp32."""
    # z = mu + sigma * eps: eps drawn in fp32 from the run's own generator, whatever autocast does
    eps = torch.randn(x.shape[0], model.latent_dim, generator=noise, device=x.device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        # the batches come from checked uint8 images: reading their values would wait for the device
        logits, mu, logvar = model(x, eps=eps, check_values=False)
    bce, kl = neg_elbo_terms(logits.float(), x=x, mu=mu.float(), logvar=logvar.float())
    # the negative ELBO per image (KL down-weighted during warm-up)
    loss = (bce + kl_weight * kl).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if average is not None:
        average.update_parameters(model)
    return bce.detach().sum(), kl.detach().sum()


@torch.no_grad()
def ema_with_warmup(averaged: list, current: list, n: torch.Tensor, *, decay: float) -> None:
    """AveragedModel's averaging for ema, its decay ramped up as min(decay, (1 + n) / (10 + n)) over
    n updates so that a short run is not dominated by its first weights; integer buffers copied."""
    if not averaged[0].is_floating_point():
        for a, c in zip(averaged, current):
            a.copy_(c)
        return
    weight = 1 - torch.clamp((1 + n) / (10 + n), max=decay)
    for a, c in zip(averaged, current):
        a.lerp_(c, weight)


@dataclass
class Run:
    """What a run trains with and where it stands (saved in checkpoints, read back on resume)."""

    config: TrainConfig  # its precision resolved: "fp32" or "bf16"
    model_config: VAEConfig
    model: VAE  # the weights Adam trains
    optimizer: torch.optim.Adam
    average: AveragedModel | None  # with ema, the weight average: validated and saved as "model"
    generators: dict[str, torch.Generator]  # shuffle (on the CPU), noise, binarize
    train_x: torch.Tensor  # uint8 training images on the device
    val_x: torch.Tensor  # float validation images on the device
    folder: Path  # where best.pt and last.pt are written
    epoch: int = 0  # epochs completed
    best_val_loss: float = math.inf  # the lowest validation loss so far: best.pt's weights
    history: list[dict] = field(default_factory=list)  # one dict per completed epoch

    @property
    def evaluated(self) -> VAE:
        """The weights that are validated, saved as "model" and evaluated: the average, with ema."""
        return self.average.module if self.average is not None else self.model

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_x) / self.config.batch_size)


def start(config, model_config, mnist: dict, folder, device="auto", resume=None) -> Run:
    """A run set up from its settings, MNIST as data.load_mnist returns it (split here) and a folder
    for its checkpoints; `resume`: a checkpoint from checkpoint.load(path, resume=True) to continue.
    ValueError: a device or precision not here, or under data.MIN_IMAGES to train or validate."""
    device = pick_device(str(device))
    folder = Path(folder)
    config = replace(config, precision=resolve_precision(config.precision, device))
    split = (config.val_size, config.seed, config.exclude_digit, config.subset)
    train_idx, val_idx = data.run_split(mnist["train_labels"], *split)
    torch.manual_seed(config.seed)
    model = on_device(VAE(**asdict(model_config)), device)
    fused = device.type in ("cpu", "cuda")  # one Adam kernel over all weights
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused)
    # the random streams, each seeded from the seed: batch order, the step's noise, binarized pixels
    generators = {"shuffle": torch.Generator(), "noise": torch.Generator(device)}
    if config.binarize:
        generators["binarize"] = torch.Generator(device)
    for offset, gen in enumerate(generators.values()):
        gen.manual_seed(config.seed + offset)
    val_x = data.eval_images(mnist["train_images"][val_idx], config.binarize, device)
    # ema: a running average of the weights (and of BatchNorm's statistics) is validated and saved
    averaging = functools.partial(ema_with_warmup, decay=config.ema)
    average = AveragedModel(model, multi_avg_fn=averaging, use_buffers=True) if config.ema else None
    train_x = mnist["train_images"][train_idx].to(device)
    run = Run(config, model_config, model, optimizer, average, generators, train_x, val_x, folder)
    if resume is not None:
        restore(run, resume, device)
    return run


def restore(run: Run, ckpt: dict, device: torch.device) -> None:
    """Weights, optimizer, average, generators and progress from an end-of-epoch checkpoint."""
    run.model.load_state_dict(ckpt["train_weights"] if run.average else ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.epoch = ckpt["epoch"]
    run.best_val_loss = ckpt["best_val_loss"]
    run.history = ckpt["history"]
    if run.average:  # the average's weights and update count (where its decay ramp stands)
        run.average.module.load_state_dict(ckpt["model"])
        run.average.n_averaged.fill_(run.epoch * run.batches_per_epoch)
    saved_on = ckpt["rng"]["device"]
    for offset, (name, gen) in enumerate(run.generators.items()):
        if name == "shuffle" or saved_on == device.type:
            gen.set_state(ckpt["rng"][name])
        else:  # a CUDA generator's state does not fit a CPU one: reproducible, not bit-identical
            gen.manual_seed(run.config.seed + offset + 2 * run.epoch * run.batches_per_epoch)
            print(f"note: the {name} generator was re-seeded: the run was saved on {saved_on}")
    print(f"resuming from epoch {run.epoch}")


def train_epoch(run: Run, epoch: int, should_stop: Callable[[], bool], show_progress: bool):
    """One epoch's steps: (summed bce and kl, steps done, seconds); fewer steps when should_stop()
    asks. UserError as soon as the loss is NaN or infinite."""
    config = run.config
    gens = run.generators
    steps = run.batches_per_epoch
    sums = torch.zeros(2, device=run.train_x.device, dtype=torch.float64)
    step_losses = torch.zeros(steps, device=run.train_x.device, dtype=torch.float64)
    run.model.train()
    t0 = time.perf_counter()
    batches = data.batches(run.train_x, config.batch_size, gens["shuffle"])
    desc = f"epoch {epoch}/{config.epochs}"
    bar = tqdm(batches, desc=desc, total=steps, leave=False, disable=not show_progress)
    done = 0
    for x in bar:
        at = epoch - 1 + done / steps  # how far the run is, in epochs
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(config, at)
        if "binarize" in gens:
            x = data.binarize(x, gens["binarize"])
        weight = kl_weight(config, at)
        step = (run.model, run.optimizer, run.average, x, gens["noise"], weight, config.precision)
        bce, kl = train_step(*step)
        sums += torch.stack([bce, kl])
        step_losses[done] = bce + kl
        done += 1
        if done % CHECK_EVERY == 0:
            check_finite(step_losses[:done], epoch=epoch, lr=config.lr)
            b, k = (sums / min(done * config.batch_size, len(run.train_x))).tolist()
            bar.set_postfix(loss=f"{b + k:.2f}", bce=f"{b:.2f}", kl=f"{k:.2f}")
        if should_stop() and done < steps:
            break
    bar.close()
    check_finite(step_losses[:done], epoch=epoch, lr=config.lr)
    return sums, done, time.perf_counter() - t0


def check_finite(step_losses: torch.Tensor, epoch: int, lr: float) -> None:
    """Stop before anything is saved when the loss is NaN or infinite, naming the first bad step."""
    bad = (~torch.isfinite(step_losses)).nonzero()
    if len(bad):
        what = f"epoch {epoch}, step {int(bad[0]) + 1}: the training loss became "
        what += f"{float(step_losses[bad[0]]):.0f}, so training stopped without saving"
        kept = "the checkpoints already saved are kept as they were"
        kept = kept if epoch > 1 else "no checkpoint was written"
        raise UserError(f"{what}; {kept}. {LOWER_LR.format(lr=lr)}")


def end_epoch(run: Run, epoch: int, sums: torch.Tensor, seconds: float) -> None:
    """Validate the evaluated weights, record the epoch, save last.pt (and best.pt when validation
    improved), then print the epoch's line: no line is printed for an epoch that was not saved."""
    run.evaluated.eval()
    val = mean_neg_elbo(run.evaluated, run.val_x, seed=run.config.seed)
    if not math.isfinite(val["loss"]):  # the weights went bad on the epoch's last steps
        what = f"epoch {epoch}: the validation loss became {val['loss']}"
        lower = LOWER_LR.format(lr=run.config.lr)
        raise UserError(f"{what}, so training stopped without saving. {lower}")
    bce, kl = (sums / len(run.train_x)).tolist()
    record = {"epoch": epoch, "train_loss": bce + kl, "train_bce": bce, "train_kl": kl}
    record |= {f"val_{k}": v for k, v in val.items()} | {"seconds": seconds}
    run.history = run.history + [record]  # a new list: a resumed run's is the checkpoint's
    improved = val["loss"] < run.best_val_loss
    run.epoch = epoch
    run.best_val_loss = min(val["loss"], run.best_val_loss)
    save(run, improved)
    line = f"epoch {epoch:3d}/{run.config.epochs}  train {bce + kl:8.3f}  val {val['loss']:8.3f} "
    line += f"(bce {val['bce']:.3f}, kl {val['kl']:.3f})  {seconds:6.1f}s"
    print(line + ("  saved best.pt" if improved else ""), flush=True)


def save(run: Run, improved: bool) -> None:
    """last.pt always; best.pt too when validation improved. "model" holds the validated weights."""
    rng = {name: gen.get_state() for name, gen in run.generators.items()}
    progress = {"epoch": run.epoch, "best_val_loss": run.best_val_loss, "history": run.history}
    progress["rng"] = rng | {"device": run.train_x.device.type}
    if run.average:
        progress["train_weights"] = run.model.state_dict()
    config = checkpoint.config_dict(run.config, run.model_config)
    optimizer = run.optimizer.state_dict()
    ckpt = checkpoint.build(config, run.evaluated.state_dict(), optimizer, progress)
    if improved:
        checkpoint.save(ckpt, run.folder / "best.pt")
    checkpoint.save(ckpt, run.folder / "last.pt")


def train(run: Run, should_stop: Callable[[], bool] = lambda: False, show_progress=True) -> Run:
    """Train a run from start() under float_settings() until config.epochs are done or should_stop()
    asks, validating and saving best.pt and last.pt after every epoch. run.epoch says how far it got
    (a stop keeps the epochs already saved; resuming repeats the rest)."""
    sizes = f"{len(run.train_x)} images ({len(run.val_x)} for validation) on {run.train_x.device}"
    weights = sum(p.numel() for p in run.model.parameters())
    print(f"training on {sizes} ({run.config.precision}), {weights:,} parameters", flush=True)
    with float_settings():
        while run.epoch < run.config.epochs and not should_stop():
            epoch = run.epoch + 1
            sums, steps, seconds = train_epoch(run, epoch, should_stop, show_progress)
            if steps < run.batches_per_epoch:
                break
            end_epoch(run, epoch, sums, seconds)
    return run
