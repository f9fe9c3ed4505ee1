"""How well each anomaly score tells an unseen digit, or a foreign image, from the digits a model
was trained on.

    python benchmarks/anomaly_auroc.py --data-dir ../shared/mnist RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds best.pt of a run trained with `--exclude-digit D`. For every method of
anomaly.score it prints the AUROC of telling digit D apart from the other digits on two sets:
  selection  the run's validation images (negatives) against its training-split images of digit D
             (positives, never trained on): the set methods and their settings are chosen on;
  test       the 10,000 test images: digit D against the rest, reported once a method is chosen.
and, against the test digits other than D, for out-of-distribution sets built here: uniform noise,
salt noise (sparse white pixels), inverted test digits, blank and white images, and capital letters
drawn with PIL's font and prepared the way MNIST was made. Lines are `name: value`, one per figure.
--max-images N scores only the first N images of each set (a quick check of the script, not a
measurement).
"""

from __future__ import annotations

import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import anomaly  # noqa: E402
import checkpoint  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import main as cli  # noqa: E402
import prepare  # noqa: E402
from benchmarks.common import add_data_dir, parser, run  # noqa: E402
from files import UserError  # noqa: E402
from model import VAE  # noqa: E402


def letters() -> torch.Tensor:
    """A to Z in PIL's built-in font, each prepared as MNIST was made (cropped, scaled to 20 px,
    centred)."""
    font = ImageFont.load_default(size=40)
    out = []
    for ch in string.ascii_uppercase:
        img = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(img).text((12, 4), ch, fill=255, font=font)
        out.append(prepare.prepare_digit(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)))
    return torch.stack(out)


def foreign_sets(test_x: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "uniform_noise": torch.rand(500, 1, 28, 28, generator=g),
        "salt_noise": (torch.rand(500, 1, 28, 28, generator=g) < 0.05).float(),
        "inverted_digits": 1 - test_x[:500],
        "blank": torch.zeros(20, 1, 28, 28),
        "white": torch.ones(20, 1, 28, 28),
        "letters": letters(),
    }


def all_methods(model: VAE, x: torch.Tensor, reference: dict) -> dict[str, torch.Tensor]:
    """Every method's scores of x, from one pass over its parts (anomaly.score computes the same,
    one method at a time)."""
    noise = anomaly.score_noise(anomaly.SCORE_SAMPLES, model.latent_dim, anomaly.SCORE_SEED)
    parts = [
        anomaly.score_parts(model, x[i : i + 1000], reference, noise)
        for i in range(0, len(x), 1000)
    ]
    parts = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return parts | {"combined": anomaly.combine(parts, reference["calibration"])}


def run_reference(path: Path, ckpt: dict, model: VAE, mnist: dict) -> dict:
    """The anomaly reference best.pt stores; for a run stopped before storing it, one fitted now
    from the run's own training and validation images, as `python main.py score` does."""
    try:
        reference = anomaly.reference_of(ckpt)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    if reference is None:
        print(
            f"note: {path} holds no anomaly reference; fitting one from its training split",
            flush=True,
        )
        train_x, val_x, _ = evaluate.run_images(ckpt, mnist)
        reference = anomaly.fit_reference(model, train_x, val_x)
    return reference


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="folders holding best.pt of --exclude-digit runs"
    )
    add_data_dir(p)
    p.add_argument(
        "--max-images",
        type=cli.number(int, 100, 10**9),
        metavar="N",
        help="score only the first N images of each set, at least 100: a quick check "
        "(default: all)",
    )
    args = p.parse_args(argv)
    n = args.max_images
    mnist = data.load_mnist(args.data_dir)
    test_x, test_labels = data.to_float(mnist["test_images"][:n]), mnist["test_labels"][:n]
    train_labels = mnist["train_labels"]
    foreign = {name: images[:n] for name, images in foreign_sets(test_x).items()}
    for folder in args.runs:
        t0 = time.perf_counter()
        path = Path(folder) / "best.pt"
        if not path.is_file():
            raise UserError(
                f"{folder}: holds no best.pt; pass folders of runs trained with --exclude-digit D"
            )
        model, ckpt = checkpoint.load_model(path)
        config = checkpoint.train_config(ckpt)
        digit = config.exclude_digit
        if digit is None:
            raise UserError(
                f"{path}: trained on every digit; pass runs trained with --exclude-digit D"
            )
        reference = run_reference(path, ckpt, model, mnist)
        train_idx, _ = data.split_indices(len(train_labels), config.val_size, config.seed)
        # training-split images of D: never trained on
        unseen = train_idx[train_labels[train_idx] == digit]
        _, val_idx = data.run_split(
            train_labels, config.val_size, config.seed, config.exclude_digit, config.subset
        )
        negatives, positives = (
            all_methods(
                model,
                data.eval_images(mnist["train_images"][i], False, torch.device("cpu")),
                reference,
            )
            for i in (val_idx[:n], unseen[:n])
        )
        on_test = all_methods(model, test_x, reference)
        for method in anomaly.METHODS:
            scores = torch.cat([negatives[method], positives[method]])
            is_unseen = torch.cat(
                [torch.zeros(len(negatives[method])), torch.ones(len(positives[method]))]
            ).bool()
            print(f"digit_{digit}_{method}_selection_auroc: {anomaly.auroc(scores, is_unseen):.4f}")
            print(
                f"digit_{digit}_{method}_test_auroc: "
                f"{anomaly.auroc(on_test[method], test_labels == digit):.4f}"
            )
        seen = test_labels != digit  # the foreign images against the test digits the model knows
        for name, images in foreign.items():
            scored = all_methods(model, images, reference)
            for method in anomaly.METHODS:
                both = torch.cat([on_test[method][seen], scored[method]])
                is_foreign = torch.cat(
                    [torch.zeros(int(seen.sum())), torch.ones(len(images))]
                ).bool()
                print(f"digit_{digit}_{method}_{name}_auroc: {anomaly.auroc(both, is_foreign):.4f}")
        print(f"digit_{digit}_seconds: {time.perf_counter() - t0:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
