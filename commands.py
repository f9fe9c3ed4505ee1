"""What each `python main.py` command does, from its flags to its files. Each handler checks what
the user gave before any long work (folders, settings, the checkpoint, the data), then calls the
library with plain values and prints what it got:

    train        train_command.py: settings -> train.start, train.train -> finish_run -> evaluate
    evaluate     test-set metrics and pictures for a checkpoint
    sample       a grid of new digits
    score        anomaly scores of the test digits
    reconstruct  your own digit pictures, prepared, reconstructed and scored
    demo         the drawing page
"""

from __future__ import annotations

import json
import os
import sys
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
import utils
from files import UserError

# --------------------------------------------------------------------------- shared by the commands


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


def open_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint at `path` (checkpoint.for_use of --checkpoint: the shipped one until a model
    is trained), loaded on `device`, with one line saying which it is: a two-epoch smoke test never
    passes for the real model unnoticed."""
    model, ckpt = checkpoint.load_model(path, device, flag="--checkpoint")
    print(f"using {checkpoint.describe(path, ckpt)}", flush=True)
    return model, ckpt


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


def fallback_reference(ckpt: dict, model, data_dir: str, device) -> dict:
    """For a checkpoint whose training stopped before storing its anomaly reference: one fitted now
    from its own training and validation images (the only time score and reconstruct read them)."""
    print(
        "note: this checkpoint holds no anomaly reference (its training did not finish); "
        "fitting one now"
    )
    mnist = load_data(data_dir, sets=("train",))
    train_x, val_x, _ = evaluate.run_images(ckpt, mnist, device)
    return anomaly.fit_reference(model, train_x, val_x)


# ----------------------------------------------------------------------------- evaluate and sample


def run_evaluate(args) -> int:
    """python main.py evaluate"""
    files.check_output_dir(args.image_dir, "--image-dir")
    path = checkpoint.for_use(args.checkpoint)
    metrics_path = output_path(args, path, "metrics.json")
    seen = files.identity(path)  # metrics.json is written only beside this version of the file
    # a bad checkpoint is named before the data is read
    model, ckpt = open_model(path, pick_device(args.device))
    latent_map = checked(path, evaluate.latent_map_of, ckpt)
    mnist = load_data(args.data_dir, sets=("test",))  # all that evaluate reads
    metrics = evaluate.evaluate(
        model,
        ckpt | {"latent_map": latent_map},
        mnist,
        iwae_k=args.iwae_k,
        seed=args.seed,
        image_dir=args.image_dir,
        history=checkpoint.run_history(path, ckpt),
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
    model, _ = open_model(checkpoint.for_use(args.checkpoint), device)
    images = model.sample(args.n, torch.Generator(device=device).manual_seed(args.seed))
    title = f"Samples: {args.n} digits decoded from z ~ N(0, I) (seed {args.seed})"
    picture = Path(args.image_dir) / "samples.png"
    print(f"wrote {utils.save_figure(utils.plot_grid(images, title), picture)}")
    return 0


# ---------------------------------------------------------------------------- score and reconstruct


def run_score(args) -> int:
    """python main.py score"""
    files.check_output_dir(args.image_dir, "--image-dir")
    path = checkpoint.for_use(args.checkpoint)
    csv_path = output_path(args, path, "anomaly_scores.csv")
    seen = files.identity(path)  # the CSV is written only beside this version of the file
    device = pick_device(args.device)
    model, ckpt = open_model(path, device)
    reference = checked(path, anomaly.reference_of, ckpt)
    mnist = load_data(args.data_dir, sets=("test",))
    x = evaluate.test_images(mnist, ckpt["config"]["binarize"], device)
    labels = mnist["test_labels"]
    if args.method != "elbo" and reference is None:
        reference = fallback_reference(ckpt, model, args.data_dir, device)
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
    title = f"anomaly score: {args.method}"
    figure = evaluate.anomaly_figure(model, x, labels, s, title=title)
    picture = Path(args.image_dir) / "anomalies.png"
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
        f"anomaly scores (method {args.method}, {units}) of {len(s):,} test digits, "
        f"checkpoint {path}"
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
            f"  digit {held_out} was held out of training: AUROC of telling it from the others "
            f"by score = {auc:.4f}"
        )


def run_reconstruct(args) -> int:
    """python main.py reconstruct FILE...: each file on its own; a bad one gets its error line, the
    others are all written, and the exit status is 2 if any failed."""
    files.check_output_dir(args.image_dir, "--image-dir")
    device = pick_device(args.device)
    path = checkpoint.for_use(args.checkpoint)
    model, ckpt = open_model(path, device)
    reference = checked(path, anomaly.reference_of, ckpt)
    if args.method != "elbo" and reference is None:
        reference = fallback_reference(ckpt, model, args.data_dir, device)
    test_scores = test_set_scores(args, path, model, ckpt, reference)
    failed = 0
    for file, out in zip(args.files, files.output_names(args.files, Path(args.image_dir))):
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
            f"scoring the {mnist_files.TEST_IMAGES:,} test digits for comparison "
            "(`python main.py score "
            f"--method {args.method}` keeps them in anomaly_scores.csv)"
        )
        device = next(model.parameters()).device
        mnist = load_data(args.data_dir, sets=("test",))
        return evaluate.test_images(mnist, ckpt["config"]["binarize"], device)

    bar = "scoring the test digits" if args.progress else ""
    return anomaly.test_scores(
        path, model, reference, test_images, args.method, args.samples, args.seed, progress=bar
    )


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
    path = checkpoint.for_use(args.checkpoint)
    model, ckpt = open_model(path, pick_device(args.device))
    reference = checked(path, anomaly.reference_of, ckpt)
    page = demo.Demo(
        model, reference, checked(path, evaluate.latent_map_of, ckpt), ckpt["config"]["binarize"]
    )
    if warning:
        print(warning)
    demo.serve(demo.make_server(page, args.host, args.port))
    return 0


HANDLERS = {
    "evaluate": run_evaluate,
    "sample": run_sample,
    "score": run_score,
    "reconstruct": run_reconstruct,
    "demo": run_demo,
}
