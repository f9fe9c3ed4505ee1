"""What each `python main.py` command does, from its flags to its files. Each handler checks what
the user gave before any long work (folders, settings, the checkpoint, the data), then calls the
library with plain values:

    train        settings (fresh or --resume) -> train.start and train.train -> the anomaly reference -> evaluate
    evaluate     test-set metrics and pictures for a checkpoint
    sample       a grid of new digits
    score        anomaly scores of the test digits
    reconstruct  your own digit pictures, prepared, reconstructed and scored
    demo         the drawing page
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import signal
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch

import anomaly
import checkpoint
import config
import data
import demo
import evaluate
import files
import mnist_files
import prepare
import train
import utils
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


# ----------------------------------------------------------------------------- shared by the
# commands


def pick_device(name: str) -> torch.device:
    """--device resolved (config.pick_device), or refused in one line."""
    try:
        return config.pick_device(name)
    except ValueError as err:
        raise UserError(f"--device {err}; use --device auto or cpu") from None


def load_data(data_dir: str, sets=("train", "test")) -> dict[str, torch.Tensor]:
    """MNIST's `sets` from --data-dir, downloaded there first when files are missing."""
    try:
        return data.load_mnist(data_dir, download=True, sets=sets)
    except mnist_files.DataError as err:  # each one ends with how to supply a folder
        raise UserError(f"{err} as --data-dir") from None


def open_model(args, device: torch.device) -> tuple[Path, torch.nn.Module, dict]:
    """The checkpoint --checkpoint names (or the shipped one until a model is trained), loaded on
    `device`, with one line saying which it is: a two-epoch smoke test never passes for the real
    model unnoticed."""
    path = checkpoint.for_use(args.checkpoint)
    model, ckpt = checkpoint.load_model(path, device)
    print(f"using {checkpoint.describe(path, ckpt)}", flush=True)
    return path, model, ckpt


def output_path(args, path: Path, name: str) -> Path | None:
    """Where a command writes `name` (metrics.json, anomaly_scores.csv): --output-dir, else beside
    the checkpoint, else (the shipped model) nowhere. Checked for writing before any long work."""
    files.check_path(path, "--checkpoint")
    if args.output_dir is not None:
        files.check_output_dir(args.output_dir, "--output-dir")
        return Path(args.output_dir) / name
    if checkpoint.is_shipped(path):
        return None
    try:
        files.check_output_dir(path.parent, "--checkpoint's folder")
    except UserError as err:
        raise UserError(f"{err}; or pass --output-dir FOLDER for {name}") from None
    return path.parent / name


def checked(path: Path, check, ckpt: dict):
    """What a checkpoint carries for a feature (its anomaly reference, latent map), checked as it
    enters."""
    with checkpoint.refused(path):
        return check(ckpt)


def run_history(path: Path, ckpt: dict) -> list[dict]:
    """The whole run's per-epoch history: best.pt stops at its own epoch, so prefer the same run's
    last.pt."""
    mine, last = ckpt.get("history", []), path.parent / "last.pt"
    if path.name == "last.pt" or not last.is_file():
        return mine
    try:
        other = checkpoint.load(last)
    except checkpoint.CheckpointError:
        return mine
    same_run = other["config"] == ckpt["config"] and other["history"][: len(mine)] == mine
    return other["history"] if same_run else mine


def fallback_reference(ckpt: dict, model, mnist: dict | None, data_dir: str, device) -> dict:
    """For a checkpoint whose training stopped before storing its anomaly reference: one fitted now
    from its own training and validation images."""
    print("note: this checkpoint holds no anomaly reference (its training did not finish); fitting one now")
    train_x, val_x, _ = evaluate.run_images(ckpt, mnist or load_data(data_dir), device)
    return anomaly.fit_reference(model, train_x, val_x)


# ----------------------------------------------------------------------------- train


def run_train(args) -> int:
    """python main.py [flags]: check everything, train (or continue) the run, then evaluate its
    best.pt."""
    folder, resumed_from = run_files(args)
    files.check_output_dir(folder, "--checkpoint-dir")
    files.check_output_dir(args.image_dir, "--image-dir")
    check_run_folder(folder, args.replace, resumed_from)
    with files.lock_folder(folder, "training run"):  # held before anything in the folder is read
        files.remove_stale_temporaries(folder)
        train_config, model_config, resume = resolve_settings(args, resumed_from)
        device = pick_device(args.device)
        precision = pick_precision(train_config.precision, device, resumed=resume is not None)
        train_config = replace(train_config, precision=precision)
        mnist = load_data(args.data_dir)
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
                f"already trained {run.epoch} epochs (pass --epochs N, more than {run.epoch}, to train longer)"
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
    if not args.resume:
        return Path(args.checkpoint_dir or "models_mnist"), None
    resumed_from = (
        Path(args.checkpoint_dir or "models_mnist") / "last.pt"
        if args.resume is True
        else Path(args.resume)
    )
    files.check_path(resumed_from, "--resume")
    best = resumed_from.parent / "best.pt"
    if args.resume is True and not resumed_from.exists() and best.is_file():
        raise UserError(
            f"{resumed_from}: no such checkpoint, but {best} holds the run (its last.pt was never "
            f"saved); continue it with --resume {best}"
        )
    return (Path(args.checkpoint_dir) if args.checkpoint_dir else resumed_from.parent), resumed_from


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
                f"{flag} {value} differs from the checkpoint's {old}; --resume continues the stored run "
                f"(only --epochs may change): drop {flag}, or start a new run with another --checkpoint-dir"
            )
    epochs = given.get("epochs", stored[0].epochs)
    if epochs < ckpt["epoch"]:
        raise UserError(
            f"--epochs {epochs} is fewer than the {ckpt['epoch']} epochs {resumed_from} already completed"
        )
    return replace(stored[0], epochs=epochs), stored[1], ckpt


def pick_precision(name: str, device: torch.device, resumed: bool = False) -> str:
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
    if "anomaly_reference" not in checkpoint.load(best) and best.parent == folder:
        print("fitting the anomaly reference (local pixel model, training codes, validation statistics)")
        evaluate.finish_run(best, mnist, device, progress=args.progress)
    model, ckpt = checkpoint.load_model(best, device)
    print(f"training done; evaluating {best} on the {mnist_files.TEST_IMAGES:,} test images", flush=True)
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


# ----------------------------------------------------------------------------- evaluate and sample


def run_evaluate(args) -> int:
    """python main.py evaluate"""
    files.check_output_dir(args.image_dir, "--image-dir")
    path = checkpoint.for_use(args.checkpoint)
    metrics_path = output_path(args, path, "metrics.json")
    seen = files.identity(path)  # metrics.json is written only beside this version of the file
    # a bad checkpoint is named before the data is read
    path, model, ckpt = open_model(args, pick_device(args.device))
    latent_map = checked(path, evaluate.latent_map_of, ckpt)
    mnist = load_data(args.data_dir, sets=("test",))  # all that evaluate reads
    metrics = evaluate.evaluate(
        model,
        ckpt | {"latent_map": latent_map},
        mnist,
        iwae_k=args.iwae_k,
        seed=args.seed,
        image_dir=args.image_dir,
        history=run_history(path, ckpt),
        path=path,
        progress=args.progress,
    )
    if metrics_path is not None:
        with files.describing(path, seen, metrics_path):
            files.write_text_atomic(json.dumps(metrics, indent=2) + "\n", metrics_path)
        print(f"wrote {metrics_path}")
    else:
        print("metrics.json: not written beside the shipped model; --output-dir DIR writes it")
    return 0


def run_sample(args) -> int:
    """python main.py sample"""
    files.check_output_dir(args.image_dir, "--image-dir")
    device = pick_device(args.device)
    _, model, _ = open_model(args, device)
    images = model.sample(args.n, torch.Generator(device=device).manual_seed(args.seed))
    title = f"Samples: {args.n} digits decoded from z ~ N(0, I) (seed {args.seed})"
    picture = Path(args.image_dir) / "samples.png"
    print(f"wrote {utils.save_figure(utils.plot_grid(images, title), picture)}")
    return 0


# ----------------------------------------------------------------------------- score and
# reconstruct


def run_score(args) -> int:
    """python main.py score"""
    files.check_output_dir(args.image_dir, "--image-dir")
    path = checkpoint.for_use(args.checkpoint)
    csv_path = output_path(args, path, "anomaly_scores.csv")
    seen = files.identity(path)  # the CSV is written only beside this version of the file
    device = pick_device(args.device)
    path, model, ckpt = open_model(args, device)
    reference = checked(path, anomaly.reference_of, ckpt)
    mnist = load_data(args.data_dir)
    x, labels = (
        evaluate.test_images(mnist, ckpt["config"]["binarize"], device),
        mnist["test_labels"],
    )
    if args.method != "elbo" and reference is None:
        reference = fallback_reference(ckpt, model, mnist, args.data_dir, device)
    bar = f"scoring the {len(x):,} test digits ({args.method})" if args.progress else ""
    s = anomaly.score(
        model, x, args.method, args.samples, args.seed, reference=reference, progress=bar
    ).cpu()
    written = []
    if csv_path is not None:
        with files.describing(path, seen, csv_path):
            source = anomaly.provenance(path, args.method, samples=args.samples, seed=args.seed)
            anomaly.write_csv(csv_path, source=source, labels=labels, scores=s)
        written.append(csv_path)
    print_summary(s, labels, args, path=path, held_out=ckpt["config"]["exclude_digit"])
    order = torch.argsort(s)
    sections = []
    for title, idx in (
        ("16 most anomalous test digits (highest score)", order.flip(0)[:16]),
        ("16 most typical test digits (lowest score)", order[:16]),
    ):
        xb = x[idx.to(device)]
        captions = [f"{int(labels[i])}: {s[i]:.1f}" for i in idx]
        sections.append((title, xb.cpu(), model.reconstruct(xb).cpu(), captions))
    picture = Path(args.image_dir) / "anomalies.png"
    figure = utils.plot_anomalies(sections, title=f"anomaly score: {args.method}")
    written.append(utils.save_figure(figure, picture))
    print("wrote " + " and ".join(map(str, written)))
    return 0


def print_summary(
    s: torch.Tensor, labels: torch.Tensor, args, path: Path, held_out: int | None
) -> None:
    levels = (1, 5, 25, 50, 75, 95, 99)
    q = torch.quantile(s.double(), torch.tensor(levels, dtype=torch.float64) / 100).tolist()
    units = f"{anomaly.UNITS[args.method]}; {args.samples} z samples per image"
    print(
        f"anomaly scores (method {args.method}, {units}) of {len(s):,} test digits, checkpoint {path}"
    )
    print(f"  mean {s.mean():.2f}  std {s.std():.2f}  min {s.min():.2f}  max {s.max():.2f}")
    print("  percentiles  " + "  ".join(f"p{p}: {v:.2f}" for p, v in zip(levels, q)))
    print(
        "  mean score by digit  "
        + "  ".join(f"{d}: {s[labels == d].mean():.2f}" for d in range(10))
    )
    if held_out is not None:
        auc = anomaly.auroc(s, labels == held_out)
        print(
            f"  digit {held_out} was held out of training: AUROC of telling it from the others by score = {auc:.4f}"
        )


def run_reconstruct(args) -> int:
    """python main.py reconstruct FILE...: each file on its own; a bad one gets its error line, the
    others are all written, and the exit status is 2 if any failed."""
    files.check_output_dir(args.image_dir, "--image-dir")
    device = pick_device(args.device)
    path, model, ckpt = open_model(args, device)
    reference = checked(path, anomaly.reference_of, ckpt)
    if args.method != "elbo" and reference is None:
        reference = fallback_reference(ckpt, model, None, args.data_dir, device)
    test_scores = test_set_scores(args, path, model, ckpt, reference)
    failed = 0
    for file, out in zip(args.files, output_names(args.files, Path(args.image_dir))):
        try:
            reconstruct_one(file, out, model, ckpt, reference, test_scores, args)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            failed += 1
    return 2 if failed else 0


def test_set_scores(args, path: Path, model, ckpt: dict, reference: dict | None) -> torch.Tensor:
    """The test digits' scores that rank each picture's score (anomaly.test_scores)."""

    def test_images() -> torch.Tensor:
        print(
            f"scoring the {mnist_files.TEST_IMAGES:,} test digits for comparison (`python main.py score "
            f"--method {args.method}` keeps them in anomaly_scores.csv)"
        )
        device = next(model.parameters()).device
        return evaluate.test_images(load_data(args.data_dir), ckpt["config"]["binarize"], device)

    bar = "scoring the test digits" if args.progress else ""
    return anomaly.test_scores(
        path, model, reference, test_images, args.method, args.samples, args.seed, progress=bar
    )


def output_names(names: list[str], image_dir: Path) -> list[Path]:
    """reconstructed_<name>.png for each input: letters, digits, '.', '-' and '_' only (a name of
    any bytes gives a safe one), distinct even for inputs of the same name in different folders (a
    counter is added), short enough for any file system (long names are cut, with a hash to keep
    them apart), and never one of the inputs themselves (a counter is added, with a note)."""
    outs, taken = [], {"image"}  # reconstructed_image.png is evaluate's picture of test digits
    inputs = {file_id(name) for name in names} - {None}
    for name in names:
        raw = os.fsencode(Path(name).stem)
        stem = re.sub(r"[^\w.-]", "_", raw.decode(errors="replace")).lstrip(".") or "picture"
        if len(stem.encode()) > 100:
            stem = (
                stem.encode()[:80].decode(errors="ignore")
                + "-"
                + hashlib.sha256(raw).hexdigest()[:8]
            )
        unique, n = stem, 1
        while True:
            out = image_dir / f"reconstructed_{unique}.png"
            given = file_id(out) in inputs
            if given:
                print(f"note: {out} is one of the pictures given, so it is not written over")
            # case-insensitive: names that differ in case are one file on macOS
            if unique.lower() not in taken and not given:
                break
            n += 1
            unique = f"{stem}_{n}"
        taken.add(unique.lower())
        outs.append(image_dir / f"reconstructed_{unique}.png")
    return outs


def file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """Which file `path` is (device and inode), however it is spelled or linked; None if none."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def reconstruct_one(
    file: str, out: Path, model, ckpt: dict, reference, test_scores: torch.Tensor, args
) -> None:
    """Read, prepare, score and reconstruct one picture, and draw it with its reconstruction."""
    original, x = prepare.load_digit_image(file)
    xb = x.to(next(model.parameters()).device)[None]
    if ckpt["config"]["binarize"]:
        xb = data.binarize(xb, torch.Generator(device=xb.device).manual_seed(args.seed))
    value = anomaly.score(
        model, xb, args.method, args.samples, args.seed, reference=reference
    ).item()
    rank = anomaly.percentile(test_scores, value)
    # a name of any bytes, drawn as text
    name = os.fsencode(Path(file).name).decode(errors="replace")
    verdict = f"{args.method} {anomaly.describe(value, rank)}"
    title = f"{name}: {verdict}"
    figure = utils.plot_user_reconstruction(original, xb[0], model.reconstruct(xb)[0], title)
    utils.save_figure(figure, out)
    print(f"{file}: {verdict}; wrote {out}", flush=True)


# ----------------------------------------------------------------------------- demo


def run_demo(args) -> int:
    """python main.py demo"""
    # an unresolvable --host is told before the model loads
    warning = demo.exposure_warning(args.host)
    path, model, ckpt = open_model(args, pick_device(args.device))
    reference = checked(path, anomaly.reference_of, ckpt)
    page = demo.Demo(
        model, reference, checked(path, evaluate.latent_map_of, ckpt), ckpt["config"]["binarize"]
    )
    if warning:
        print(warning)
    demo.serve(demo.make_server(page, args.host, args.port))
    return 0


HANDLERS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "sample": run_sample,
    "score": run_score,
    "reconstruct": run_reconstruct,
    "demo": run_demo,
}
