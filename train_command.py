"""`python main.py` (the train command), from its flags to a trained and evaluated run: the run's
folder (a fresh run never replaces an earlier one), its settings (fresh or --resume), training that
Ctrl-C, SIGTERM or SIGHUP stops between steps with the command that resumes it, then the library's
finish_run and evaluate. The other commands are in commands.py."""

from __future__ import annotations

import math
import shlex
import signal
import sys
from dataclasses import fields, replace
from pathlib import Path

import checkpoint
import commands
import config
import evaluate
import files
import mnist_files
import train
from config import VAEConfig
from files import UserError

# what a run leaves in its folder
RUN_FILES = ("best.pt", "last.pt", "metrics.json", "anomaly_scores.csv")


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class Interrupted(KeyboardInterrupt):
    """A SIGTERM or SIGHUP (or a second Ctrl-C) that ends the command, as Ctrl-C does; main() says
    so and exits with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_train(args) -> int:
    """python main.py [flags]: check everything, train (or continue) the run, then evaluate its
    best.pt."""
    folder, resumed_from = run_files(args)
    files.check_output_dir(folder, "--checkpoint-dir")
    files.check_output_dir(args.image_dir, "--image-dir")
    check_run_folder(folder, args.replace, resumed_from)
    # the lock is held before anything in the folder is read
    with files.lock_folder(folder, "training run", flag="--checkpoint-dir"):
        files.remove_stale_temporaries(folder)
        train_config, model_config, resume = resolve_settings(args, resumed_from)
        device = commands.pick_device(args.device)
        precision = pick_precision(train_config.precision, device, resumed=resume is not None)
        train_config = replace(train_config, precision=precision)
        mnist = commands.load_data(args.data_dir)
        if resume is not None and not (best := best_checkpoint(folder, resumed_from)).is_file():
            print(f"note: {best} is missing, so the next epoch's weights will become best.pt")
            resume["best_val_loss"] = math.inf
        try:
            run = train.start(train_config, model_config, mnist, folder, device, resume)
        except ValueError as err:  # too few images to train or validate on
            raise UserError(f"{err} (check --subset, --val-size and --exclude-digit)") from None
        if args.replace:  # every check has passed: only now is the earlier run removed
            for name in RUN_FILES:
                (folder / name).unlink(missing_ok=True)
        if run.epoch >= train_config.epochs:
            print(
                f"already trained {run.epoch} epochs "
                f"(pass --epochs N, more than {run.epoch}, to train longer)"
            )
        else:
            with StopOnSignal() as stop:
                run = train.train(run, should_stop=stop.requested, show_progress=args.progress)
            # also when the signal came as the last epoch was saved: no evaluation then
            if stop.requested():
                return stopped(args, run, stop.signum, folder, resumed_from)
        return final_evaluation(args, folder, resumed_from, mnist, device, run.history)


def run_files(args) -> tuple[Path, Path | None]:
    """The run's checkpoint folder, and the checkpoint it resumes from (None for a fresh run)."""
    if args.resume and args.replace:
        raise UserError(
            "--replace deletes a run to start a new one, --resume continues one: "
            "pass only one of them"
        )
    folder = Path(args.checkpoint_dir or checkpoint.DEFAULT.parent)
    if not args.resume:
        return folder, None
    resumed_from = folder / "last.pt" if args.resume is True else Path(args.resume)
    files.check_path(resumed_from, "--resume")
    best = resumed_from.parent / "best.pt"
    if args.resume is True and not resumed_from.exists() and best.is_file():
        raise UserError(
            f"{resumed_from}: no such checkpoint, but {best} holds the run (its last.pt was never "
            f"saved); continue it with --resume {best}"
        )
    return (folder if args.checkpoint_dir else resumed_from.parent), resumed_from


def check_run_folder(folder: Path, replacing: bool, resumed_from: Path | None) -> None:
    """Before anything is read or written: no folder stands where a file will be saved, and a fresh
    run never silently replaces the run a folder already holds."""
    for name in RUN_FILES:
        if (folder / name).is_dir():
            raise UserError(files.folder_in_the_way(folder / name))
    held = [name for name in RUN_FILES[:2] if (folder / name).exists()]
    continuing = resumed_from is not None and resumed_from.resolve().parent == folder.resolve()
    if held and not replacing and not continuing:
        # a folder with only best.pt: the run was stopped while it saved its first last.pt
        resume = "--resume" if "last.pt" in held else f"--resume {folder / 'best.pt'}"
        raise UserError(
            f"{folder} already holds a run ({' and '.join(held)}); continue it with {resume}, "
            "choose another --checkpoint-dir, or pass --replace to delete it and start over"
        )


def resolve_settings(
    args, resumed_from: Path | None
) -> tuple[config.TrainConfig, VAEConfig, dict | None]:
    """The run's settings: the flags over the defaults, or for --resume the checkpoint's (only
    --epochs may change)."""
    given = {f.name: getattr(args, f.name) for f in fields(config.TrainConfig) + fields(VAEConfig)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    if resumed_from is None:
        train_names = {f.name for f in fields(config.TrainConfig)}
        model_config = VAEConfig(**{k: v for k, v in given.items() if k not in train_names})
        try:
            config.check(model_config)
        except ValueError as err:
            raise UserError(
                f"{err}; choose smaller --channels, --hidden-dim, --fc-layers or --res-blocks"
            ) from None
        return (
            config.TrainConfig(**{k: v for k, v in given.items() if k in train_names}),
            model_config,
            None,
        )
    ckpt = checkpoint.load(resumed_from, flag="--resume", resume=True)
    stored = checkpoint.train_config(ckpt), checkpoint.model_config(ckpt)
    for name, value in given.items():
        old = getattr(stored[0] if hasattr(stored[0], name) else stored[1], name)
        if name != "epochs" and value != old:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} {value} differs from the checkpoint's {old}; --resume continues the "
                f"stored run (only --epochs may change): drop {flag}, or start a new run with "
                "another --checkpoint-dir"
            )
    epochs = given.get("epochs", stored[0].epochs)
    if epochs < ckpt["epoch"]:
        raise UserError(
            f"--epochs {epochs} is fewer than the {ckpt['epoch']} epochs {resumed_from} "
            "already completed"
        )
    return replace(stored[0], epochs=epochs), stored[1], ckpt


def pick_precision(name: str, device, resumed: bool = False) -> str:
    """--precision resolved (config.resolve_precision), or refused in one line."""
    try:
        return config.resolve_precision(name, device)
    except ValueError as err:
        # a resumed run keeps its stored precision, so the way out is another device
        fix = "resume it with --device cpu" if resumed else "use --precision fp32"
        raise UserError(f"--precision {err}; {fix}") from None


class StopOnSignal:
    """While training: Ctrl-C, SIGTERM (a cluster's preemption) or SIGHUP (a closed terminal) asks
    the loop to stop after its step, keeping the epochs already saved; a second signal aborts at
    once (every save is atomic, so no file is left half-written), and after training any further one
    is ignored while the program exits."""

    def __init__(self) -> None:
        self.signum = None

    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        tell(
            f"\n{name}: stopping after this step; the epochs already saved are kept "
            f"({name} again aborts at once)"
        )

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_IGN if self.signum is not None else handler)


def stopped(args, run: train.Run, signum: int, folder: Path, resumed_from: Path | None) -> int:
    """Say where a stopped run stands and the command that continues it (on stderr: stdout may have
    gone)."""
    last = folder / "last.pt" if (folder / "last.pt").is_file() else resumed_from
    if last is None:
        message = (
            f"stopped in epoch 1 of {run.config.epochs}, before any epoch was saved; "
            "start it again with:"
        )
        command = ["python", "main.py", *args.argv]
    else:
        done = f"the run up to epoch {run.epoch}" + (
            ", not yet evaluated" if run.epoch == run.config.epochs else ""
        )
        epoch = min(run.epoch + 1, run.config.epochs)
        message = f"stopped in epoch {epoch}; {last} holds {done}. Resume with:"
        command = resume_command(args, last, folder)
    tell(f"{message}\n  {shlex.join(command)}")
    return 128 + signum


def tell(text: str) -> None:
    """Print on stderr (stdout may have gone), and on stdout too when stderr cannot be written
    (main's streams mark themselves `failed`); never raise: a lost line must not stop a run."""
    for stream in (sys.stderr, sys.stdout):
        try:
            print(text, file=stream, flush=True)
        except (OSError, ValueError):
            continue
        if not getattr(stream, "failed", False):
            return


# what a resumed run accepts besides --resume and --checkpoint-dir: repeated when the run had it
RESUME_FLAGS = ("--epochs", "--data-dir", "--image-dir", "--device", "--iwae-k")


SWITCHES = ("--progress", "--no-progress")  # flags without a value


def resume_command(args, last: Path, folder: Path) -> list[str]:
    """The command line that continues this run from `last`, with every flag it was given that a
    resumed run takes (its settings come from the checkpoint)."""
    parts = ["python", "main.py", "--resume", str(last)]
    parts += ["--checkpoint-dir", str(folder)] if last.parent != folder else []
    for flag in RESUME_FLAGS + SWITCHES:
        if any(word == flag or word.startswith(f"{flag}=") for word in args.argv):
            value = [] if flag in SWITCHES else [str(getattr(args, flag[2:].replace("-", "_")))]
            parts += [flag, *value]
    return parts


def best_checkpoint(folder: Path, resumed_from: Path | None) -> Path:
    """The best.pt that holds the run's best weights: in its folder once the run has written one
    there, else beside the checkpoint it resumed from."""
    if (folder / "best.pt").is_file() or resumed_from is None:
        return folder / "best.pt"
    return resumed_from.parent / "best.pt"


def final_evaluation(
    args, folder: Path, resumed_from: Path | None, mnist: dict, device, history
) -> int:
    """Evaluate the run's best checkpoint; first store in it what anomaly scores compare against and
    the latent map, if this run wrote it. metrics.json goes into the run's folder, even when best.pt
    is the one resumed from."""
    best = best_checkpoint(folder, resumed_from)
    model, ckpt = checkpoint.load_model(best, device)
    if "anomaly_reference" not in ckpt and best.parent == folder:
        print(
            "fitting the anomaly reference "
            "(local pixel model, training codes, validation statistics)"
        )
        ckpt = evaluate.finish_run(best, mnist, device, progress=args.progress)
    print(
        f"training done; evaluating {best} on the {mnist_files.TEST_IMAGES:,} test images",
        flush=True,
    )
    evaluate.evaluate(
        model,
        ckpt,
        mnist,
        iwae_k=args.iwae_k,
        image_dir=args.image_dir,
        metrics_path=folder / "metrics.json",
        history=history,
        path=best,
        progress=args.progress,
    )
    return 0
