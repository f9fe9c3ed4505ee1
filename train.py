"""Train the VAE. Read it top to bottom: the step (where a batch becomes one Adam update), the run's
state, one epoch, validation and the checkpoints, then train(), the whole run. The command line
(commands.run_train) resolves the flags, loads and splits the data, then calls start() and train();
a notebook calls them the same way."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import checkpoint
import data
from config import TrainConfig, VAEConfig
from files import UserError
from model import VAE, mean_neg_elbo, neg_elbo_terms, on_device

# steps between reads of the running loss (progress bar, NaN check): one host sync each
CHECK_EVERY = 100
LOWER_LR = "Start a new run with a lower --lr (this run: {lr:g})"


def learning_rate(config: TrainConfig, at: float) -> float:
    """The learning rate `at` epochs into the run: constant, or a cosine decay to 0 (--lr-schedule)."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * at / config.epochs))
    return config.lr


def kl_weight(config: TrainConfig, at: float) -> float:
    """KL warm-up: the KL term's weight ramps from 0 to 1 over the first kl_warmup epochs."""
    return min(1.0, at / config.kl_warmup) if config.kl_warmup else 1.0


# ----------------------------------------------------------------------------- the step


def train_step(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    average: AveragedModel | None,
    x: torch.Tensor,
    noise: torch.Generator,
    kl_weight: float,
    precision: str,
):
    """One batch of float images x becomes one Adam update. Returns the batch's summed bce and kl as
    tensors, so that no step waits for the device to report a number.

    With precision "bf16" the convolutions and matrix products run in bf16 (torch.autocast); the
    loss is computed in fp32 from their outputs, and the weights and Adam's state stay fp32."""
    # z = mu + sigma * eps: the noise is drawn here, in fp32 from the run's own generator, whatever
    # autocast does inside
    eps = torch.randn(x.shape[0], model.latent_dim, generator=noise, device=x.device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        # no value check (NaN, [0, 1]): it would make every step wait for the device, and the
        # batches come from checked uint8 data
        logits, mu, logvar = model(x, eps=eps, check_values=False)
    bce, kl = neg_elbo_terms(logits.float(), x=x, mu=mu.float(), logvar=logvar.float())
    # the negative ELBO per image (KL down-weighted during --kl-warmup)
    loss = (bce + kl_weight * kl).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if average is not None:
        average.update_parameters(model)
    return bce.detach().sum(), kl.detach().sum()


@torch.no_grad()
def ema_with_warmup(
    averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor, *, decay: float
):
    """AveragedModel's averaging function for --ema: an exponential moving average whose decay ramps
    up as min(decay, (1 + n) / (10 + n)) after n updates (the first copies the weights), so that a
    short run is not dominated by its first weights. Integer buffers (BatchNorm's batch counter) are
    copied, not averaged."""
    if not averaged[0].is_floating_point():
        for a, c in zip(averaged, current):
            a.copy_(c)
        return
    weight = 1 - torch.clamp((1 + n) / (10 + n), max=decay)
    for a, c in zip(averaged, current):
        a.lerp_(c, weight)


# ----------------------------------------------------------------------------- the run's state


@dataclass
class Run:
    """What a run trains with and where it stands: set up once (start), fresh or resumed, then
    advanced an epoch at a time. Its progress (epoch, best_val_loss, history) is saved in every
    checkpoint and read back by --resume."""

    config: TrainConfig
    model_config: VAEConfig
    model: VAE  # the weights Adam trains
    optimizer: torch.optim.Adam  # fused: one kernel over all weights where torch has one
    # --ema: the weight average, which is validated and saved as "model"; else None
    average: AveragedModel | None
    # shuffle (on the CPU: the same order on every device), noise, binarize
    generators: dict[str, torch.Generator]
    train_x: torch.Tensor  # uint8 training images on the device
    val_x: torch.Tensor  # float validation images on the device
    folder: Path  # where best.pt and last.pt are written
    epoch: int = 0  # epochs completed
    # the lowest validation loss so far: best.pt holds the weights that reached it
    best_val_loss: float = math.inf
    history: list[dict] = field(default_factory=list)  # one dict per completed epoch

    @property
    def evaluated(self) -> VAE:
        """The weights that are validated, saved as best.pt's "model" and evaluated: the average,
        with --ema."""
        return self.average.module if self.average is not None else self.model

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_x) / self.config.batch_size)


def start(
    config: TrainConfig,
    model_config: VAEConfig,
    images: tuple,
    folder: str | Path,
    device="cpu",
    resume=None,
):
    """A run set up from its settings, its (training, validation) uint8 images (N, 28, 28) and the
    folder its checkpoints go to: fresh, or continuing `resume`, a checkpoint loaded by
    checkpoint.load(path, resume=True)."""
    device = torch.device(device)
    torch.manual_seed(config.seed)
    model = on_device(VAE(**asdict(model_config)), device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda")
    )
    # the random streams, each seeded from the seed: batch order, the step's noise, and --binarize's
    # pixels
    generators = {"shuffle": torch.Generator(), "noise": torch.Generator(device)}
    generators |= {"binarize": torch.Generator(device)} if config.binarize else {}
    for offset, gen in enumerate(generators.values()):
        gen.manual_seed(config.seed + offset)
    val_x = data.eval_images(images[1], binarized=config.binarize, device=device)
    # --ema: a running average of the weights (and of BatchNorm's statistics) is what gets validated
    # and saved
    averaging = functools.partial(ema_with_warmup, decay=config.ema)
    average = AveragedModel(model, multi_avg_fn=averaging, use_buffers=True) if config.ema else None
    run = Run(
        config,
        model_config,
        model,
        optimizer,
        average,
        generators,
        images[0].to(device),
        val_x,
        Path(folder),
    )
    if resume is not None:
        restore(run, resume, device)
    return run


def restore(run: Run, ckpt: dict, device: torch.device) -> None:
    """Weights, optimizer, weight average, generators and progress from a checkpoint saved at the
    end of an epoch."""
    run.model.load_state_dict(ckpt["train_weights"] if run.average else ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.epoch, run.best_val_loss, run.history = (
        ckpt["epoch"],
        ckpt["best_val_loss"],
        ckpt["history"],
    )
    # the average's weights, and how many updates it has had (where its decay ramp stands)
    if run.average:
        run.average.module.load_state_dict(ckpt["model"])
        run.average.n_averaged.fill_(run.epoch * run.batches_per_epoch)
    for offset, (name, gen) in enumerate(run.generators.items()):
        if name == "shuffle" or ckpt["rng"]["device"] == device.type:
            gen.set_state(ckpt["rng"][name])
        # a CUDA generator's state does not fit a CPU one: continue reproducibly, though not
        # bit-identically
        else:
            gen.manual_seed(run.config.seed + offset + 2 * run.epoch * run.batches_per_epoch)
            print(
                f"note: the {name} generator was re-seeded: the run was saved on {ckpt['rng']['device']}"
            )
    print(f"resuming from epoch {run.epoch}")


# ----------------------------------------------------------------------------- one epoch


def train_epoch(run: Run, epoch: int, should_stop: Callable[[], bool], show_progress: bool):
    """The steps of one epoch: (summed bce and kl, steps done, seconds). Returns early, with fewer
    steps, when should_stop() says so between steps; raises UserError as soon as the loss is NaN or
    infinite."""
    config, gens = run.config, run.generators
    sums = torch.zeros(2, device=run.train_x.device, dtype=torch.float64)
    step_losses = torch.zeros(run.batches_per_epoch, device=run.train_x.device, dtype=torch.float64)
    run.model.train()
    t0 = time.perf_counter()
    batches = data.batches(run.train_x, config.batch_size, gens["shuffle"])
    bar = tqdm(
        batches,
        f"epoch {epoch}/{config.epochs}",
        run.batches_per_epoch,
        leave=False,
        disable=not show_progress,
    )
    done = 0
    for x in bar:
        at = epoch - 1 + done / run.batches_per_epoch  # how far the run is, in epochs
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(config, at)
        if "binarize" in gens:
            x = data.binarize(x, gens["binarize"])
        weight = kl_weight(config, at)
        bce, kl = train_step(
            run.model, run.optimizer, run.average, x, gens["noise"], weight, config.precision
        )
        sums += torch.stack([bce, kl])
        step_losses[done] = bce + kl
        done += 1
        if done % CHECK_EVERY == 0:
            check_finite(step_losses[:done], epoch=epoch, lr=config.lr)
            b, k = (sums / min(done * config.batch_size, len(run.train_x))).tolist()
            bar.set_postfix(loss=f"{b + k:.2f}", bce=f"{b:.2f}", kl=f"{k:.2f}")
        if should_stop() and done < run.batches_per_epoch:
            break
    bar.close()
    check_finite(step_losses[:done], epoch=epoch, lr=config.lr)
    return sums, done, time.perf_counter() - t0


def check_finite(step_losses: torch.Tensor, epoch: int, lr: float) -> None:
    """Stop when the loss has become NaN or infinite, before anything is saved, naming the first bad
    step."""
    bad = (~torch.isfinite(step_losses)).nonzero()
    if len(bad):
        kept = (
            "the checkpoints already saved are kept as they were"
            if epoch > 1
            else "no checkpoint was written"
        )
        what = f"epoch {epoch}, step {int(bad[0]) + 1}: the training loss became {float(step_losses[bad[0]]):.0f}"
        raise UserError(
            f"{what}, so training stopped without saving; {kept}. {LOWER_LR.format(lr=lr)}"
        )


# ----------------------------------------------------------------------------- validation and
# checkpoints


def end_epoch(run: Run, epoch: int, sums: torch.Tensor, seconds: float) -> None:
    """Validate the evaluated weights, record the epoch, save last.pt (and best.pt when validation
    improved), then print the epoch's line: a line is never printed for an epoch that was not saved.
    """
    run.evaluated.eval()
    val = mean_neg_elbo(run.evaluated, run.val_x, seed=run.config.seed)
    if not math.isfinite(val["loss"]):  # the weights went bad on the epoch's last steps
        what = f"epoch {epoch}: the validation loss became {val['loss']}"
        raise UserError(
            f"{what}, so training stopped without saving. {LOWER_LR.format(lr=run.config.lr)}"
        )
    bce, kl = (sums / len(run.train_x)).tolist()
    trained = {"loss": bce + kl, "bce": bce, "kl": kl}
    record = (
        {"epoch": epoch}
        | {f"train_{k}": v for k, v in trained.items()}
        | {f"val_{k}": v for k, v in val.items()}
    )
    run.history = run.history + [record | {"seconds": seconds}]
    improved = val["loss"] < run.best_val_loss
    run.epoch, run.best_val_loss = epoch, min(val["loss"], run.best_val_loss)
    save(run, improved)
    line = f"epoch {epoch:3d}/{run.config.epochs}  train {bce + kl:8.3f}  val {val['loss']:8.3f} "
    line += f"(bce {val['bce']:.3f}, kl {val['kl']:.3f})  {seconds:6.1f}s" + (
        "  saved best.pt" if improved else ""
    )
    print(line, flush=True)


def save(run: Run, improved: bool) -> None:
    """last.pt always; best.pt too when validation improved. "model" holds the weights that were
    validated."""
    rng = {name: gen.get_state() for name, gen in run.generators.items()} | {
        "device": run.train_x.device.type
    }
    progress = {
        "epoch": run.epoch,
        "best_val_loss": run.best_val_loss,
        "history": run.history,
        "rng": rng,
    }
    live = {"train_weights": run.model.state_dict()} if run.average else {}
    config = checkpoint.config_dict(run.config, run.model_config)
    ckpt = checkpoint.build(
        config, run.evaluated.state_dict(), run.optimizer.state_dict(), progress | live
    )
    if improved:
        checkpoint.save(ckpt, run.folder / "best.pt")
    checkpoint.save(ckpt, run.folder / "last.pt")


# ----------------------------------------------------------------------------- the whole run


def train(
    run: Run, should_stop: Callable[[], bool] = lambda: False, show_progress: bool = True
) -> Run:
    """Train a run set up by start() until config.epochs are done or should_stop() asks between
    steps, validating after every epoch and saving best.pt and last.pt. Returns the run: run.epoch
    says how far it got (a stop inside an epoch keeps the epochs already saved; --resume repeats the
    rest)."""
    weights = sum(p.numel() for p in run.model.parameters())
    where = f"{run.train_x.device} ({run.config.precision}), {weights:,} parameters"
    print(
        f"training on {len(run.train_x)} images ({len(run.val_x)} for validation) on {where}",
        flush=True,
    )
    while run.epoch < run.config.epochs and not should_stop():
        epoch = run.epoch + 1
        sums, steps, seconds = train_epoch(run, epoch, should_stop, show_progress)
        if steps < run.batches_per_epoch:
            break
        end_epoch(run, epoch, sums, seconds)
    return run
