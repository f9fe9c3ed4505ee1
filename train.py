"""Train the VAE: settings (fresh or resumed) -> data -> model and optimizer -> the step -> the epoch loop
(validate, keep best.pt and last.pt) -> the final evaluation.

    python main.py [flags]      train with the defaults (20 epochs), then evaluate and draw pictures
    python main.py --resume     continue models_mnist/last.pt
"""
from __future__ import annotations

import argparse
import copy
import math
import shlex
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import anomaly
import checkpoint
import data
import evaluate
import utils
from model import VAE, VAEConfig, config_dict, model_config, neg_elbo_terms, prepare_model
from utils import UserError

# Training settings and their defaults. Every key is stored in a checkpoint's config; on --resume only
# `epochs` may change, because any other change would no longer continue the same run.
TRAIN_DEFAULTS = dict(
    epochs=20, batch_size=64, lr=1e-3, seed=1, val_size=5000, subset=None, exclude_digit=None,
    binarize=False, kl_warmup=0, lr_schedule="constant", precision="auto", ema=0.999,
)
MODEL_DEFAULTS = config_dict(VAEConfig())
COMMON_DEFAULTS = dict(data_dir="data", image_dir="images", device="auto")  # flags every command takes
CHECK_EVERY = 100  # steps between reads of the running loss (progress bar, NaN check): one host sync each


# ----------------------------------------------------------------------------- settings


def resolve_config(args: argparse.Namespace) -> tuple[dict, dict | None, Path, Path | None]:
    """The run's full config, the checkpoint to resume from (or None), the checkpoint folder, and the resumed file."""
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
        return config, None, Path(args.checkpoint_dir or "models_mnist"), None
    path = Path(args.checkpoint_dir or "models_mnist") / "last.pt" if args.resume is True else Path(args.resume)
    ckpt = checkpoint.load(path, flag="--resume")
    checkpoint.require_resumable(ckpt, path)
    # the stored settings, the architecture validated; settings the checkpoint predates take the values they had then
    config = checkpoint.TRAINING_BEFORE_IT_EXISTED | dict(ckpt["config"]) | config_dict(model_config(ckpt, path))
    for key in keys:
        if key in given and key != "epochs" and given[key] != config.get(key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {given[key]} differs from the checkpoint's {config.get(key)}; --resume continues the stored run "
                            f"(only --epochs may change): drop {flag}, or start a new run with another --checkpoint-dir")
    if given.get("epochs", math.inf) < ckpt["epoch"]:
        raise UserError(f"--epochs {given['epochs']} is fewer than the {ckpt['epoch']} epochs {path} already completed")
    config["epochs"] = given.get("epochs", config["epochs"])
    return config, ckpt, Path(args.checkpoint_dir) if args.checkpoint_dir else path.parent, path


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles (native bf16 matrix units), as torch's own CPU feature check reports it."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so guarded: absent means "no"
    return bool(check()) if check is not None else False


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


def prepare_data(config: dict, mnist: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """uint8 training images on `device` and float validation images, as the config asks (split, held-out digit, subset)."""
    train_idx, val_idx = data.run_split(config, mnist["train_labels"])
    return {"train": mnist["train_images"][train_idx].to(device),
            "val": evaluate.eval_images(mnist["train_images"][val_idx], config["binarize"], device)}


def learning_rate(config: dict, epoch_progress: float) -> float:
    if config["lr_schedule"] == "cosine":
        return config["lr"] * 0.5 * (1 + math.cos(math.pi * epoch_progress / config["epochs"]))
    return config["lr"]


def kl_weight(config: dict, epoch_progress: float) -> float:
    """KL warm-up: the KL term's weight ramps from 0 to 1 over the first kl_warmup epochs."""
    return min(1.0, epoch_progress / config["kl_warmup"]) if config["kl_warmup"] else 1.0


# ----------------------------------------------------------------------------- the step


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
        bce, kl = neg_elbo_terms(logits.float(), x, mu.float(), logvar.float())
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


# ----------------------------------------------------------------------------- the run


def setup(args: argparse.Namespace) -> SimpleNamespace:
    """Everything a run needs, fresh or resumed; every user mistake is reported here, before the first step."""
    config, ckpt, ckpt_dir, resumed_from = resolve_config(args)
    utils.check_output_dir(ckpt_dir, "--checkpoint-dir")
    utils.check_output_dir(args.image_dir, "--image-dir")
    device = utils.pick_device(args.device)
    config["precision"] = pick_precision(config["precision"], device)
    mnist = data.load_mnist(args.data_dir)
    sets = prepare_data(config, mnist, device)

    torch.manual_seed(config["seed"])
    model = prepare_model(VAE(VAEConfig(**{k: config[k] for k in MODEL_DEFAULTS})), device)
    opt = make_optimizer(model, config["lr"], device)
    average = WeightAverage(model, config["ema"]) if config["ema"] else None
    generators = {"shuffle": torch.Generator().manual_seed(config["seed"]),  # on the CPU: the same order on every device
                  "noise": torch.Generator(device=device).manual_seed(config["seed"] + 1)}
    if config["binarize"]:
        generators["binarize"] = torch.Generator(device=device).manual_seed(config["seed"] + 2)
    run = SimpleNamespace(args=args, config=config, device=device, mnist=mnist, train_x=sets["train"], val_x=sets["val"],
                          model=model, opt=opt, average=average, generators=generators, ckpt_dir=ckpt_dir,
                          n_batches=math.ceil(len(sets["train"]) / config["batch_size"]),
                          state={"epoch": 0, "best_val_loss": math.inf, "history": [], "partial": None},
                          best=None, wrote_best=False)  # best: the best.pt to evaluate at the end (where this run's best state lies)
    if ckpt is not None:
        restore(run, ckpt, resumed_from)
    run.step = train_step_fn(model, opt, args.compile, config["precision"], average)
    return run


def restore(run: SimpleNamespace, ckpt: dict, path: Path) -> None:
    """Load weights, optimizer, generators and progress from a checkpoint into a freshly set-up run."""
    run.model.load_state_dict(ckpt["train_weights"] if run.average else ckpt["model"])
    if run.average:
        run.average.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.state = {k: ckpt[k] for k in ("epoch", "best_val_loss", "history")} | {"partial": ckpt.get("partial")}
    steps = run.state["epoch"] * run.n_batches + (run.state["partial"]["step"] if run.state["partial"] else 0)
    if run.average:  # the steps taken so far set where the average's decay ramp stands
        run.average.updates = steps
    reseeded = checkpoint.restore_generators(ckpt, run.generators, run.config["seed"], steps)
    if reseeded:
        print(f"note: {path} was trained on another kind of device; its {' and '.join(reseeded)} generator was re-seeded "
              f"from the seed and the step count, so this run is reproducible but not bit-identical to an unmoved one")
    if (path.parent / "best.pt").is_file():
        run.best = path.parent / "best.pt"
    print(f"resuming from epoch {run.state['epoch']}" + (f", step {run.state['partial']['step']}" if run.state["partial"] else ""))


def check_finite(run: SimpleNamespace, epoch: int, first: int, step_losses: torch.Tensor, done: int) -> None:
    """Stop (exit 2) when the loss has become NaN or infinite, before anything is saved, naming the first bad step."""
    bad = (~torch.isfinite(step_losses[: done - first])).nonzero()
    if len(bad):
        step = first + int(bad[0]) + 1
        kept = f"the checkpoints keep the state after epoch {run.state['epoch']}" if run.state["epoch"] else "no checkpoint was written"
        raise UserError(f"epoch {epoch}, step {step}: the training loss became {float(step_losses[bad[0]]):.0f}, so training "
                        f"stopped without saving; {kept}. Start a new run with a lower --lr (this run: {run.config['lr']:g})")


def train_epoch(run: SimpleNamespace, epoch: int, stop: StopFlag) -> tuple[torch.Tensor, int, float]:
    """The steps of one epoch (from a Ctrl-C's step when resuming): the summed bce and kl, steps done, seconds."""
    config, gens, partial = run.config, run.generators, run.state["partial"]
    if partial:  # replay this epoch's shuffle, then skip the batches already done
        gens["shuffle"].set_state(partial["shuffle_at_start"])
    run.shuffle_at_start = gens["shuffle"].get_state()
    first = done = partial["step"] if partial else 0
    sums = partial["sums"].to(run.device) if partial else torch.zeros(2, device=run.device, dtype=torch.float64)
    step_losses = torch.zeros(run.n_batches - first, device=run.device, dtype=torch.float64)
    run.model.train()
    t0 = time.perf_counter()
    bar = tqdm(data.batches(run.train_x, config["batch_size"], gens["shuffle"], start=first), total=run.n_batches, initial=first,
               desc=f"epoch {epoch}/{config['epochs']}", leave=False, disable=not run.args.progress, dynamic_ncols=True)
    for x in bar:
        progress = run.state["epoch"] + done / run.n_batches
        for group in run.opt.param_groups:
            group["lr"] = learning_rate(config, progress)
        if "binarize" in gens:
            x = data.binarize(x, gens["binarize"])
        bce, kl = run.step(x, gens["noise"], kl_weight(config, progress))
        sums += torch.stack([bce, kl])
        step_losses[done - first] = bce + kl
        done += 1
        if done % CHECK_EVERY == 0:
            check_finite(run, epoch, first, step_losses, done)
            b, k = (sums / min(done * config["batch_size"], len(run.train_x))).tolist()
            bar.set_postfix(loss=f"{b + k:.2f}", bce=f"{b:.2f}", kl=f"{k:.2f}")
        if stop.stop and done < run.n_batches:
            break
    bar.close()
    check_finite(run, epoch, first, step_losses, done)
    return sums, done, (partial["seconds"] if partial else 0.0) + time.perf_counter() - t0


def save(run: SimpleNamespace, improved: bool) -> None:
    """last.pt always; best.pt too when validation improved. "model" holds the weights that were validated."""
    ckpt = checkpoint.build(run.config, run.average.model if run.average else run.model, run.model if run.average else None,
                            run.opt, run.state, run.generators, run.device)
    if improved:
        checkpoint.save(ckpt, run.ckpt_dir / "best.pt")
        run.best, run.wrote_best = run.ckpt_dir / "best.pt", True
    checkpoint.save(ckpt, run.ckpt_dir / "last.pt")


def end_epoch(run: SimpleNamespace, epoch: int, sums: torch.Tensor, seconds: float) -> None:
    """Validate the evaluated weights (the average, with --ema), record the epoch, save best.pt and last.pt."""
    evaluated = run.average.model if run.average else run.model
    evaluated.eval()
    val = evaluate.neg_elbo(evaluated, run.val_x, run.config["seed"])
    if not math.isfinite(val["loss"]):  # the weights went bad on the epoch's last steps
        raise UserError(f"epoch {epoch}: the validation loss became {val['loss']}, so training stopped without saving; "
                        f"start a new run with a lower --lr (this run: {run.config['lr']:g})")
    bce, kl = (sums / len(run.train_x)).tolist()
    run.state["epoch"] = epoch
    run.state["partial"] = None
    run.state["history"].append({"epoch": epoch, "train_loss": bce + kl, "train_bce": bce, "train_kl": kl,
                                 "val_loss": val["loss"], "val_bce": val["bce"], "val_kl": val["kl"], "seconds": seconds})
    improved = val["loss"] < run.state["best_val_loss"]
    if improved:
        run.state["best_val_loss"] = val["loss"]
    save(run, improved)
    print(f"epoch {epoch:3d}/{run.config['epochs']}  train {bce + kl:8.3f}  val {val['loss']:8.3f} "
          f"(bce {val['bce']:.3f}, kl {val['kl']:.3f})  {seconds:6.1f}s" + ("  saved best.pt" if improved else ""), flush=True)


def train(args: argparse.Namespace) -> int:
    """python main.py [flags]: the whole run."""
    run = setup(args)
    if run.state["epoch"] >= run.config["epochs"]:
        print(f"already trained {run.state['epoch']} epochs (pass --epochs N, more than {run.state['epoch']}, to train longer); evaluating")
        return final_evaluation(run)
    print(f"training on {len(run.train_x)} images ({len(run.val_x)} for validation) on {run.device} ({run.config['precision']}), "
          f"{sum(p.numel() for p in run.model.parameters()):,} parameters")
    with StopFlag() as stop:
        while run.state["epoch"] < run.config["epochs"] and not stop.stop:
            epoch = run.state["epoch"] + 1
            sums, done, seconds = train_epoch(run, epoch, stop)
            if done < run.n_batches:  # interrupted inside the epoch: save a resumable mid-epoch state and stop
                run.state["partial"] = {"step": done, "sums": sums.cpu(), "seconds": seconds, "shuffle_at_start": run.shuffle_at_start}
                save(run, improved=False)
                break
            end_epoch(run, epoch, sums, seconds)
    if stop.stop:
        print(f"stopped; {run.ckpt_dir / 'last.pt'} holds the run so far. Resume with:\n  {resume_command(args, run.ckpt_dir)}", flush=True)
        return 130
    return final_evaluation(run)


def store_anomaly_reference(run: SimpleNamespace, path: Path, model: VAE, ckpt: dict) -> None:
    """Add to best.pt what anomaly scores compare against (anomaly.fit_reference), from this run's own images."""
    train_x = evaluate.eval_images(run.train_x, run.config["binarize"], run.device)
    ckpt["anomaly_reference"] = model.anomaly_reference = anomaly.fit_reference(model, train_x, run.val_x)
    checkpoint.save(ckpt, path)


def final_evaluation(run: SimpleNamespace) -> int:
    """Evaluate this run's best checkpoint: the one it wrote, or the one beside the checkpoint it resumed from."""
    best = run.best
    if best is None:
        raise UserError(f"no best.pt to evaluate: neither {run.ckpt_dir} nor the resumed checkpoint's folder holds one")
    loaded = evaluate.load_for_use(best, run.args.device)  # read once: the reference and the evaluation share it
    model, ckpt, _ = loaded
    if (run.wrote_best or best.parent == run.ckpt_dir) and "anomaly_reference" not in ckpt:
        store_anomaly_reference(run, best, model, ckpt)
    print(f"training done; evaluating {best} on the 10,000 test images")
    evaluate.evaluate(best, run.mnist, run.args.image_dir, run.args.iwae_k, None, loaded)
    return 0


def resume_command(args: argparse.Namespace, ckpt_dir: Path) -> str:
    """The command line that continues this run, with the folders and device it was given."""
    parts = ["python", "main.py", "--resume", str(ckpt_dir / "last.pt")]
    for flag, default in COMMON_DEFAULTS.items():
        if getattr(args, flag) != default:
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.epochs is not None:
        parts += ["--epochs", str(args.epochs)]
    return shlex.join(parts)
