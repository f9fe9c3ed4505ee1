"""Train the VAE. Read it top to bottom: the settings, the step (where a batch becomes an update), one epoch,
validation and the checkpoints, then train(), the whole run.

    python main.py [flags]      train with the defaults (20 epochs), then evaluate and draw pictures
    python main.py --resume     continue models_mnist/last.pt
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import anomaly
import checkpoint
import data
import evaluate
import utils
from model import MAX_PARAMETERS, VAE, VAEConfig, neg_elbo_terms
from utils import UserError

# Training settings and their defaults. Every key is stored in a checkpoint's config; on --resume only
# `epochs` may change, because any other change would no longer continue the same run.
TRAIN_DEFAULTS = dict(
    epochs=20, batch_size=64, lr=1e-3, seed=1, val_size=5000, subset=None, exclude_digit=None,
    binarize=False, kl_warmup=0, lr_schedule="constant", precision="auto", ema=0.999,
)
MODEL_DEFAULTS = checkpoint.config_dict(VAEConfig())
COMMON_DEFAULTS = dict(data_dir="data", image_dir="images", device="auto")  # flags every command takes
CHECK_EVERY = 100  # steps between reads of the running loss (progress bar, NaN check): one host sync each
MIN_IMAGES = 100  # fewest training and validation images: fewer make the validation loss and the anomaly calibration noise


# ----------------------------------------------------------------------------- settings


def run_files(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The run's checkpoint folder, and the checkpoint it resumes from (None for a fresh run)."""
    if not args.resume:
        return Path(args.checkpoint_dir or "models_mnist"), None
    resumed_from = Path(args.checkpoint_dir or "models_mnist") / "last.pt" if args.resume is True else Path(args.resume)
    return (Path(args.checkpoint_dir) if args.checkpoint_dir else resumed_from.parent), resumed_from


def resolve_config(args: argparse.Namespace, resumed_from: Path | None) -> tuple[dict, dict | None]:
    """The run's full config, and the checkpoint it resumes from (None for a fresh run)."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "channels" in given:
        given["channels"] = list(given["channels"])
    keys = list(TRAIN_DEFAULTS) + list(MODEL_DEFAULTS)
    if not args.resume:
        config = {k: given.get(k, TRAIN_DEFAULTS.get(k, MODEL_DEFAULTS.get(k))) for k in keys}
        check_model_size(config)
        return config, None
    ckpt = checkpoint.load(resumed_from, flag="--resume")
    checkpoint.require_resumable(ckpt, resumed_from)
    config = ckpt["config"]
    for key in keys:
        if key in given and key != "epochs" and given[key] != config.get(key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {given[key]} differs from the checkpoint's {config.get(key)}; --resume continues the stored run "
                            f"(only --epochs may change): drop {flag}, or start a new run with another --checkpoint-dir")
    if given.get("epochs", math.inf) < ckpt["epoch"]:
        raise UserError(f"--epochs {given['epochs']} is fewer than the {ckpt['epoch']} epochs {resumed_from} already completed")
    config["epochs"] = given.get("epochs", config["epochs"])
    return config, ckpt


def check_model_size(config: dict) -> None:
    """The architecture flags make a valid model of a size this machine can train; said before anything is loaded."""
    try:
        count = VAEConfig(**{k: config[k] for k in MODEL_DEFAULTS}).parameter_count()
    except ValueError as err:  # VAEConfig names the setting first: say it as the flag
        setting, _, reason = str(err).partition(" ")
        raise UserError(f"--{setting.replace('_', '-')} {reason}") from None
    if count > MAX_PARAMETERS:
        raise UserError(f"these model settings make {count:,} weights, more than the {MAX_PARAMETERS:,} this program trains; "
                        f"choose smaller --channels, --hidden-dim, --fc-layers or --res-blocks")


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles (native bf16 matrix units), as the kernel reports them in /proc/cpuinfo."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to ask without private torch APIs, so assume none
        return False


def pick_precision(name: str, device: torch.device) -> str:
    """The training step's arithmetic: auto is bf16 autocast on CPUs with Intel AMX (native bf16 matrix units), else fp32.
    Not bf16 on CUDA: at batch 64 this model's step is bound by kernel launches, and autocast's casts add launches."""
    if name == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"
    if name == "bf16" and device.type == "mps":
        raise UserError("--precision bf16 is supported on cpu and cuda; on mps use --precision fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
    return name


def learning_rate(config: dict, epoch_progress: float) -> float:
    if config["lr_schedule"] == "cosine":
        return config["lr"] * 0.5 * (1 + math.cos(math.pi * epoch_progress / config["epochs"]))
    return config["lr"]


def kl_weight(config: dict, epoch_progress: float) -> float:
    """KL warm-up: the KL term's weight ramps from 0 to 1 over the first kl_warmup epochs."""
    return min(1.0, epoch_progress / config["kl_warmup"]) if config["kl_warmup"] else 1.0


# ----------------------------------------------------------------------------- the step


def train_step(model: VAE, optimizer: torch.optim.Optimizer, average: AveragedModel | None, x: torch.Tensor,
               noise: torch.Generator, kl_weight: float, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of float images x becomes one Adam update. Returns the batch's summed bce and kl as tensors,
    so that no step waits for the device to report a number.

    With precision "bf16" the convolutions and matrix products run in bf16 (torch.autocast); the loss is
    computed in fp32 from their outputs, and the weights and Adam's state stay fp32."""
    # z = mu + sigma * eps: the noise is drawn here, in fp32 from the run's own generator, whatever autocast does inside
    eps = torch.randn(x.shape[0], model.config.latent_dim, generator=noise, device=x.device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits, mu, logvar = model(x, eps=eps)
    bce, kl = neg_elbo_terms(logits.float(), x=x, mu=mu.float(), logvar=logvar.float())
    loss = (bce + kl_weight * kl).mean()  # the negative ELBO per image (KL down-weighted during --kl-warmup)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if average is not None:
        average.update_parameters(model)
    return bce.detach().sum(), kl.detach().sum()


@torch.no_grad()
def ema_with_warmup(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor, *, decay: float) -> None:
    """AveragedModel's averaging function for --ema (bind decay with functools.partial): an exponential moving
    average whose decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates (the first update copies the
    weights), so that a short run is not dominated by its first weights. Integer buffers (BatchNorm's batch
    counter) are copied, not averaged."""
    if not averaged[0].is_floating_point():
        for a, c in zip(averaged, current):
            a.copy_(c)
        return
    weight = 1 - torch.clamp((1 + n_averaged) / (10 + n_averaged), max=decay)
    for a, c in zip(averaged, current):
        a.lerp_(c, weight)


# ----------------------------------------------------------------------------- the run's state


@dataclass
class Trainer:
    """What a run trains with; set up once (setup), fresh or resumed, and never replaced."""

    config: dict  # every setting (TRAIN_DEFAULTS and MODEL_DEFAULTS keys); stored in each checkpoint
    device: torch.device  # where the model, the training images and the step's noise live
    model: VAE  # the weights Adam trains
    optimizer: torch.optim.Adam  # fused: one kernel over all weights where torch has one
    average: AveragedModel | None  # --ema: the weight average, which is validated and saved as "model"; else None
    generators: dict[str, torch.Generator]  # shuffle (on the CPU: the same order on every device), noise, binarize
    train_x: torch.Tensor  # uint8 training images on the device
    val_x: torch.Tensor  # float validation images on the device
    val_labels: torch.Tensor  # their digits (for the latent map)
    mnist: dict[str, torch.Tensor]  # the whole data set; its test half is read only by the final evaluation
    ckpt_dir: Path  # where best.pt and last.pt are written
    resumed_from: Path | None  # the checkpoint this run continues, else None

    @property
    def evaluated(self) -> VAE:
        """The weights that are validated, saved as best.pt's "model" and evaluated: the average, with --ema."""
        return self.average.module if self.average is not None else self.model

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_x) / self.config["batch_size"])


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint and read back by --resume."""

    epoch: int = 0  # epochs completed
    best_val_loss: float = math.inf  # the lowest validation loss so far: best.pt holds the weights that reached it
    history: list[dict] = field(default_factory=list)  # one dict per completed epoch (train/val loss, bce, kl, seconds)
    partial: dict | None = None  # after a Ctrl-C inside an epoch: step, sums, seconds and shuffle_at_start, else None


@dataclass
class EpochResult:
    """What one pass of train_epoch did."""

    sums: torch.Tensor  # summed bce and kl of the epoch's images so far (float64, on the device)
    steps: int  # steps of the epoch done, counting those before a resume
    seconds: float
    shuffle_at_start: torch.Tensor  # the shuffle generator's state when the epoch began (to replay its order)


# ----------------------------------------------------------------------------- setting up


def setup(args: argparse.Namespace, ckpt_dir: Path, resumed_from: Path | None) -> tuple[Trainer, Progress]:
    """Everything a run needs, fresh or resumed; every user mistake is reported here, before the first step."""
    config, ckpt = resolve_config(args, resumed_from)
    device = utils.pick_device(args.device)
    config["precision"] = pick_precision(config["precision"], device)
    mnist = data.load_mnist(args.data_dir)
    train_idx, val_idx = data.run_split(config, mnist["train_labels"])
    check_set_sizes(len(train_idx), len(val_idx))

    torch.manual_seed(config["seed"])
    model = utils.prepare_model(VAE(VAEConfig(**{k: config[k] for k in MODEL_DEFAULTS})), device)
    trainer = Trainer(
        config=config, device=device, model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=config["lr"], fused=device.type in ("cpu", "cuda")),
        average=weight_average(model, config["ema"]),
        generators=make_generators(config, device),
        train_x=mnist["train_images"][train_idx].to(device),
        val_x=data.eval_images(mnist["train_images"][val_idx], binarized=config["binarize"], device=device),
        val_labels=mnist["train_labels"][val_idx], mnist=mnist, ckpt_dir=ckpt_dir, resumed_from=resumed_from)
    progress = restore(trainer, ckpt) if ckpt is not None else Progress()
    return trainer, progress


def weight_average(model: VAE, decay: float) -> AveragedModel | None:
    """--ema: a running average of the weights (and of BatchNorm's statistics), or None for --ema 0."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=functools.partial(ema_with_warmup, decay=decay), use_buffers=True)


def check_set_sizes(n_train: int, n_val: int) -> None:
    if n_train < MIN_IMAGES or n_val < MIN_IMAGES:
        raise UserError(f"this run would train on {n_train} images and validate on {n_val}; each needs at least {MIN_IMAGES} "
                        f"(check --subset, --val-size and --exclude-digit)")


def make_generators(config: dict, device: torch.device) -> dict[str, torch.Generator]:
    """The run's random streams, each seeded from --seed: batch order, the step's noise, and --binarize's pixels."""
    generators = {"shuffle": torch.Generator().manual_seed(config["seed"]),
                  "noise": torch.Generator(device=device).manual_seed(config["seed"] + 1)}
    if config["binarize"]:
        generators["binarize"] = torch.Generator(device=device).manual_seed(config["seed"] + 2)
    return generators


def restore(trainer: Trainer, ckpt: dict) -> Progress:
    """Load weights, optimizer, generators and progress from the resumed checkpoint into a freshly set-up trainer."""
    path = trainer.resumed_from
    trainer.model.load_state_dict(ckpt["train_weights"] if trainer.average else ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])  # checkpoint.validate has matched it to these weights
    progress = Progress(epoch=ckpt["epoch"], best_val_loss=ckpt["best_val_loss"], history=ckpt["history"], partial=ckpt["partial"])
    if progress.partial and progress.partial["step"] >= trainer.batches_per_epoch:
        raise checkpoint.CheckpointError(f"{path}: its interrupted epoch stopped at step {progress.partial['step']}, "
                                         f"beyond the {trainer.batches_per_epoch} steps of an epoch; start a new run")
    steps = progress.epoch * trainer.batches_per_epoch + (progress.partial["step"] if progress.partial else 0)
    if trainer.average:  # the average's weights, and how many updates it has had (where its decay ramp stands)
        trainer.average.module.load_state_dict(ckpt["model"])
        trainer.average.n_averaged.fill_(steps)
    reseeded = checkpoint.restore_generators(ckpt["rng"], trainer.generators, device_type=trainer.device.type,
                                             seed=trainer.config["seed"], steps_done=steps)
    if reseeded:
        print(f"note: {path} was trained on another kind of device; its {' and '.join(reseeded)} generator was re-seeded "
              f"from the seed and the step count, so this run is reproducible but not bit-identical to an unmoved one")
    best = best_checkpoint(trainer)
    if not best.is_file():
        print(f"note: {best} is missing, so the next epoch's weights will become best.pt")
        progress.best_val_loss = math.inf
    print(f"resuming from epoch {progress.epoch}" + (f", step {progress.partial['step']}" if progress.partial else ""))
    return progress


def best_checkpoint(trainer: Trainer) -> Path:
    """The best.pt that holds this run's best weights: in the checkpoint folder once this run has written one there,
    else beside the checkpoint it resumed from."""
    if (trainer.ckpt_dir / "best.pt").is_file() or trainer.resumed_from is None:
        return trainer.ckpt_dir / "best.pt"
    return trainer.resumed_from.parent / "best.pt"


# ----------------------------------------------------------------------------- one epoch


def train_epoch(trainer: Trainer, epoch: int, partial: dict | None, stop: "StopFlag", show_progress: bool) -> EpochResult:
    """The steps of one epoch, from a Ctrl-C's step when `partial` says where an interrupted one stopped; returns
    early when `stop` is set. Stops (exit 2) as soon as the loss is NaN or infinite."""
    config, gens = trainer.config, trainer.generators
    if partial:  # replay this epoch's shuffle, then skip the batches already done
        gens["shuffle"].set_state(partial["shuffle_at_start"])
    shuffle_at_start = gens["shuffle"].get_state()
    first = done = partial["step"] if partial else 0
    sums = partial["sums"].to(trainer.device) if partial else torch.zeros(2, device=trainer.device, dtype=torch.float64)
    step_losses = torch.zeros(trainer.batches_per_epoch - first, device=trainer.device, dtype=torch.float64)
    trainer.model.train()
    t0 = time.perf_counter()
    bar = tqdm(data.batches(trainer.train_x, config["batch_size"], gens["shuffle"], start=first), total=trainer.batches_per_epoch,
               initial=first, desc=f"epoch {epoch}/{config['epochs']}", leave=False, disable=not show_progress, dynamic_ncols=True)
    for x in bar:
        at = epoch - 1 + done / trainer.batches_per_epoch  # how far the run is, in epochs
        for group in trainer.optimizer.param_groups:
            group["lr"] = learning_rate(config, at)
        if "binarize" in gens:
            x = data.binarize(x, gens["binarize"])
        bce, kl = train_step(trainer.model, trainer.optimizer, trainer.average, x=x, noise=gens["noise"],
                             kl_weight=kl_weight(config, at), precision=config["precision"])
        sums += torch.stack([bce, kl])
        step_losses[done - first] = bce + kl
        done += 1
        if done % CHECK_EVERY == 0:
            check_finite(step_losses[: done - first], epoch=epoch, first=first, lr=config["lr"])
            b, k = (sums / min(done * config["batch_size"], len(trainer.train_x))).tolist()
            bar.set_postfix(loss=f"{b + k:.2f}", bce=f"{b:.2f}", kl=f"{k:.2f}")
        if stop.stop and done < trainer.batches_per_epoch:
            break
    bar.close()
    check_finite(step_losses[: done - first], epoch=epoch, first=first, lr=config["lr"])
    seconds = (partial["seconds"] if partial else 0.0) + time.perf_counter() - t0
    return EpochResult(sums=sums, steps=done, seconds=seconds, shuffle_at_start=shuffle_at_start)


def check_finite(step_losses: torch.Tensor, epoch: int, first: int, lr: float) -> None:
    """Stop (exit 2) when the loss has become NaN or infinite, before anything is saved, naming the first bad step."""
    bad = (~torch.isfinite(step_losses)).nonzero()
    if len(bad):
        kept = "the checkpoints already saved are kept as they were" if epoch > 1 or first else "no checkpoint was written"
        raise UserError(f"epoch {epoch}, step {first + int(bad[0]) + 1}: the training loss became {float(step_losses[bad[0]]):.0f}, "
                        f"so training stopped without saving; {kept}. Start a new run with a lower --lr (this run: {lr:g})")


class StopFlag:
    """Ctrl-C sets a flag the training loop checks between steps, so a stop never lands mid-update; a second Ctrl-C
    aborts at once (an interrupted save leaves the previous file whole), and any further one is ignored while the
    program exits, so that no traceback is printed."""

    def __init__(self) -> None:
        self.stop = False
        self.previous = None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupt: stopping after this step to save last.pt (Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        # Once stopping on the command line, further Ctrl-Cs are ignored while the run saves and exits: Python's
        # default handler would raise wherever they land, even in the interpreter's shutdown. Elsewhere (a notebook's
        # kernel has a handler of its own) the previous handler comes back.
        quiet = self.stop and self.previous is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN if quiet else self.previous)


# ----------------------------------------------------------------------------- validation and checkpoints


def end_epoch(trainer: Trainer, progress: Progress, epoch: int, result: EpochResult) -> tuple[Progress, bool]:
    """Validate the evaluated weights and record the epoch: the new progress, and whether validation improved."""
    trainer.evaluated.eval()
    val = evaluate.neg_elbo(trainer.evaluated, trainer.val_x, seed=trainer.config["seed"])
    if not math.isfinite(val["loss"]):  # the weights went bad on the epoch's last steps
        raise UserError(f"epoch {epoch}: the validation loss became {val['loss']}, so training stopped without saving; "
                        f"start a new run with a lower --lr (this run: {trainer.config['lr']:g})")
    bce, kl = (result.sums / len(trainer.train_x)).tolist()
    record = {"epoch": epoch, "train_loss": bce + kl, "train_bce": bce, "train_kl": kl,
              "val_loss": val["loss"], "val_bce": val["bce"], "val_kl": val["kl"], "seconds": result.seconds}
    improved = val["loss"] < progress.best_val_loss
    print(f"epoch {epoch:3d}/{trainer.config['epochs']}  train {bce + kl:8.3f}  val {val['loss']:8.3f} "
          f"(bce {val['bce']:.3f}, kl {val['kl']:.3f})  {result.seconds:6.1f}s" + ("  saved best.pt" if improved else ""), flush=True)
    return Progress(epoch=epoch, best_val_loss=min(val["loss"], progress.best_val_loss), history=progress.history + [record]), improved


def save_checkpoints(trainer: Trainer, progress: Progress, improved: bool) -> None:
    """last.pt always; best.pt too when validation improved. "model" holds the weights that were validated."""
    ckpt = checkpoint.build(
        trainer.config, weights=trainer.evaluated.state_dict(), optimizer=trainer.optimizer.state_dict(), progress=asdict(progress),
        rng={name: gen.get_state() for name, gen in trainer.generators.items()} | {"device": trainer.device.type},
        train_weights=trainer.model.state_dict() if trainer.average else None)
    if improved:
        checkpoint.save(ckpt, trainer.ckpt_dir / "best.pt")
    checkpoint.save(ckpt, trainer.ckpt_dir / "last.pt")


# ----------------------------------------------------------------------------- the whole run


def train(args: argparse.Namespace) -> int:
    """python main.py [flags]: set up or resume; for each epoch train, validate, save best and last; then evaluate."""
    ckpt_dir, resumed_from = run_files(args)
    utils.check_output_dir(ckpt_dir, "--checkpoint-dir")
    utils.check_output_dir(args.image_dir, "--image-dir")
    with utils.lock_folder(ckpt_dir, "training run"):  # held before anything in the folder is read
        utils.remove_stale_temporaries(ckpt_dir)
        for name in ("best.pt", "last.pt", "metrics.json"):  # found now, not when they are written
            if (ckpt_dir / name).is_dir():
                raise UserError(utils.folder_in_the_way(ckpt_dir / name))
        trainer, progress = setup(args, ckpt_dir, resumed_from)
        if progress.epoch >= trainer.config["epochs"]:
            print(f"already trained {progress.epoch} epochs (pass --epochs N, more than {progress.epoch}, to train longer); evaluating")
            return final_evaluation(trainer, args)
        print(f"training on {len(trainer.train_x)} images ({len(trainer.val_x)} for validation) on {trainer.device} "
              f"({trainer.config['precision']}), {sum(p.numel() for p in trainer.model.parameters()):,} parameters")
        with StopFlag() as stop:
            while progress.epoch < trainer.config["epochs"]:
                epoch = progress.epoch + 1
                result = train_epoch(trainer, epoch, partial=progress.partial, stop=stop, show_progress=args.progress)
                if result.steps < trainer.batches_per_epoch:  # Ctrl-C inside the epoch: save where it stopped
                    partial = {"step": result.steps, "sums": result.sums.cpu(), "seconds": result.seconds,
                               "shuffle_at_start": result.shuffle_at_start}
                    save_checkpoints(trainer, dataclasses.replace(progress, partial=partial), improved=False)
                    break
                progress, improved = end_epoch(trainer, progress, epoch=epoch, result=result)
                save_checkpoints(trainer, progress, improved)
                if stop.stop:
                    break
        if stop.stop:
            print(f"stopped; {trainer.ckpt_dir / 'last.pt'} holds the run so far. Resume with:\n  {resume_command(args, trainer.ckpt_dir)}", flush=True)
            return 130
        return final_evaluation(trainer, args)


def final_evaluation(trainer: Trainer, args: argparse.Namespace) -> int:
    """Evaluate this run's best checkpoint; first store in it what anomaly scores compare against, if it was written here."""
    best = best_checkpoint(trainer)
    model, ckpt = checkpoint.load_model(best, trainer.device)
    if "anomaly_reference" not in ckpt and best.parent == trainer.ckpt_dir:
        ckpt = checkpoint.with_anomaly_reference(ckpt, anomaly_reference(trainer, model))
        checkpoint.save(ckpt, best)
    print(f"training done; evaluating {best} on the 10,000 test images")
    evaluate.evaluate(best, model, ckpt, mnist=trainer.mnist, image_dir=args.image_dir, iwae_k=args.iwae_k, seed=None)
    return 0


def anomaly_reference(trainer: Trainer, model: VAE) -> dict:
    """What anomaly scores compare an image against (anomaly.fit_reference, from this run's own training and validation
    images), the latent map the demo draws, and the test digits' scores, so that a percentile needs no data set."""
    config = trainer.config
    print("fitting the anomaly reference (the local pixel model, training codes and validation statistics)")
    train_x = data.eval_images(trainer.train_x, binarized=config["binarize"], device=trainer.device)
    reference = anomaly.fit_reference(model, train_x, trainer.val_x)
    reference["latent_map"] = evaluate.latent_map(model, trainer.val_x, trainer.val_labels)
    test_x = data.eval_images(trainer.mnist["test_images"], binarized=config["binarize"], device=trainer.device)
    reference["test_scores"] = anomaly.score(model, test_x, reference=reference).sort().values.cpu()
    return reference


def resume_command(args: argparse.Namespace, ckpt_dir: Path) -> str:
    """The command line that continues this run, with the folders and device it was given."""
    parts = ["python", "main.py", "--resume", str(ckpt_dir / "last.pt")]
    for flag, default in COMMON_DEFAULTS.items():
        if getattr(args, flag) != default:
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.epochs is not None:
        parts += ["--epochs", str(args.epochs)]
    return shlex.join(parts)
