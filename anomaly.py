"""Anomaly scores: how unlike the training digits an image is (higher = stranger), and the commands that use them.

    python main.py score [--method M]        score every test digit: anomaly_scores.csv, IMAGE_DIR/anomalies.png
    python main.py reconstruct FILE...        your own digit pictures: reconstructed, scored, ranked among the test digits

In a notebook: `anomaly.score(model, images)` with float images (B, 1, 28, 28) in [0, 1] returns (B,) scores.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import data
import evaluate
import utils
from model import VAE, neg_elbo_terms

METHODS = ("combined", "complexity", "knn", "elbo")
DEFAULT_METHOD = "combined"
LOCAL_WEIGHT = 1.5  # a in complexity = elbo - a * local_nll, chosen on the validation-based selection set (docs/anomaly.md)
KNN_K = 5  # neighbours averaged in the latent kNN distance
REFERENCE_IMAGES = 10_000  # training images whose codes the kNN distance compares against
UNITS = {"combined": "standard deviations above the validation digits' mean", "complexity": "nats", "knn": "latent distance", "elbo": "nats"}
CALIBRATION_IMAGES = 1_000  # validation images whose score statistics put the parts of `combined` on one scale


# ----------------------------------------------------------------------------- the parts of a score


@torch.inference_mode()
def neg_elbo_per_image(model: VAE, x: torch.Tensor, samples: int, gen: torch.Generator) -> torch.Tensor:
    """Each image's negative ELBO in nats, its reconstruction term averaged over `samples` z draws (the KL is exact)."""
    mu, logvar = model.encode(x)
    bce = torch.zeros(len(x), device=x.device)
    for _ in range(samples):
        sample_bce, kl = neg_elbo_terms(model.decode(model.reparameterize(mu, logvar, gen)), x, mu, logvar)
        bce += sample_bce
    return bce / samples + kl


class LocalPixelModel(nn.Module):
    """A deliberately short-sighted model of digit images: each pixel predicted from the 12 pixels above and to its
    left (a masked 5x5 convolution, then two 1x1 layers), the same at every position. It learns stroke texture (how
    ink continues locally) but cannot know what digit, or whether any digit, the strokes make. Its negative
    log-likelihood, in the same Bernoulli nats as the VAE's, measures how complex an image is at that local level."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, 5, 5)
        mask[..., :2, :] = 1  # the two rows above
        mask[..., 2, :2] = 1  # the two pixels to the left
        self.register_buffer("mask", mask)
        self.conv = nn.Conv2d(1, hidden, 5, padding=2)
        self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.conv2d(x, self.conv.weight * self.mask, self.conv.bias, padding=2))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image negative log-likelihood in nats."""
        return F.binary_cross_entropy_with_logits(self(x), x, reduction="none").flatten(1).sum(1)


def fit_local_model(images: torch.Tensor, steps: int = 600, batch_size: int = 64, seed: int = 0) -> LocalPixelModel:
    """Fit the local pixel model to in-distribution float images by Adam (600 steps take about half a minute on a 2-core CPU). Seeded, without
    touching the caller's random state, and with gradients on even when called under torch.no_grad()."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        local = LocalPixelModel().to(images.device)
        opt = torch.optim.Adam(local.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = images[torch.randint(len(images), (batch_size,), generator=gen).to(images.device)].clone()
            loss = local.nll(x).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return local.eval()


@torch.inference_mode()
def score_parts(model: VAE, x: torch.Tensor, reference: dict | None, samples: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The raw scores of a batch: elbo (nats), and with a reference, complexity (nats) and knn (latent distance)."""
    parts = {"elbo": neg_elbo_per_image(model, x, samples, gen)}
    if reference is not None:
        local = LocalPixelModel().to(x.device)
        local.load_state_dict(reference["local_model"])
        parts["complexity"] = parts["elbo"] - reference["local_weight"] * local.nll(x)
        mu, _ = model.encode(x)
        codes = reference["codes"].to(x.device)
        nearest = torch.cdist(mu, codes).topk(min(KNN_K, len(codes)), dim=1, largest=False).values
        parts["knn"] = nearest.mean(1)
    return parts


def combine(parts: dict[str, torch.Tensor], calibration: dict[str, list[float]]) -> torch.Tensor:
    """combined = max(z(z(complexity) + z(knn)), z(elbo)), z standardising by the validation images' mean and std.
    The sum flags an unseen digit by either sign; the max with z(elbo) keeps far-off images (noise, say), whose
    ELBO is enormous, from being excused by an equally unlikely local texture."""
    z = {name: (parts[name] - mean) / std for name, (mean, std) in calibration.items() if name in parts}
    mean, std = calibration["sum"]
    return torch.maximum((z["complexity"] + z["knn"] - mean) / std, z["elbo"])


# ----------------------------------------------------------------------------- the reference a model is scored against


def fit_reference(model: VAE, train_x: torch.Tensor, val_x: torch.Tensor, samples: int = 10, seed: int = 0,
                  local_steps: int | None = None) -> dict:
    """What the complexity, knn and combined scores compare an image against, from the model's own training images
    (float, any number) and validation images: the local pixel model, the codes of up to 10,000 training images, and
    the mean and std of each score over up to 1,000 validation images. Plain tensors and floats: it is stored in
    best.pt at the end of training."""
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:REFERENCE_IMAGES].to(train_x.device)
    reference_x = train_x[pick]
    with torch.inference_mode():
        codes = torch.cat([model.encode(reference_x[i : i + 1000])[0] for i in range(0, len(reference_x), 1000)])
    # about four passes over the reference images at batch 64, at most 600 steps (the count for a full-size run)
    local_steps = local_steps or min(600, math.ceil(4 * len(reference_x) / 64))
    local = fit_local_model(reference_x, local_steps, seed=seed)
    reference = {"local_weight": LOCAL_WEIGHT, "codes": codes.cpu(), "local_model": {k: v.cpu() for k, v in local.state_dict().items()}}
    parts = score_parts(model, val_x[:CALIBRATION_IMAGES], reference, samples, torch.Generator(device=val_x.device).manual_seed(seed))
    calibration = {name: [v.mean().item(), v.std().item()] for name, v in parts.items()}
    z_sum = sum((parts[n] - calibration[n][0]) / calibration[n][1] for n in ("complexity", "knn"))
    reference["calibration"] = calibration | {"sum": [z_sum.mean().item(), z_sum.std().item()]}
    return reference


def score(model: VAE, images: torch.Tensor, method: str | None = None, samples: int = 10, seed: int = 0,
          batch_size: int = 1000, reference: dict | None = None) -> torch.Tensor:
    """Anomaly scores (B,) of float images (B, 1, 28, 28) in [0, 1], higher = more anomalous; on the images' device.

    elbo        the negative ELBO in nats: what the model fails to explain. Flags badly written digits, but ranks
                simple images (a 1, a blank page) as typical whatever the model learned.
    complexity  the negative ELBO minus LOCAL_WEIGHT times the nats a local pixel model needs (a likelihood ratio
                against a model of stroke texture): what remains is what the VAE finds unlike a digit, not merely complex.
    knn         mean distance of the image's code to its KNN_K nearest codes of training images: how far from familiar ground.
    combined    complexity and knn on one scale, guarded by elbo (see combine): the default, best on held-out digits.

    All but elbo need the reference the model was trained with (fit_reference): by default the one its checkpoint
    holds (VAE.from_checkpoint keeps it as model.anomaly_reference).
    """
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown anomaly method {method!r}; choose one of {', '.join(METHODS)}")
    VAE.check_input(images)
    reference = reference if reference is not None else getattr(model, "anomaly_reference", None)
    if method != "elbo" and reference is None:
        raise ValueError(f"method {method!r} needs the model's anomaly reference, which its checkpoint does not hold: pass "
                         f"reference=anomaly.fit_reference(model, training_images, validation_images), or method='elbo'")
    gen = torch.Generator(device=images.device).manual_seed(seed)
    out = []
    for i in range(0, len(images), batch_size):
        parts = score_parts(model, images[i : i + batch_size], reference if method != "elbo" else None, samples, gen)
        out.append(combine(parts, reference["calibration"]) if method == "combined" else parts[method])
    return torch.cat(out)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of telling positives (higher score expected) from negatives: the Mann-Whitney U
    statistic with average ranks for ties, so a tie counts one half."""
    scores, positive = torch.as_tensor(scores, dtype=torch.float64).flatten(), torch.as_tensor(positive, dtype=torch.bool).flatten()
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    first_rank = torch.cumsum(counts, 0) - counts + 1  # 1-based rank of each distinct value's first occurrence
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]
    return ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


# ----------------------------------------------------------------------------- the test set's scores, with provenance


def provenance(checkpoint_path: str | Path, method: str, samples: int, seed: int) -> str:
    """The first line of anomaly_scores.csv: what produced the scores. The checkpoint is named by its content's hash,
    so a retrained file at the same path does not match."""
    digest = hashlib.sha256(Path(checkpoint_path).read_bytes()).hexdigest()[:16]
    return f"# checkpoint={Path(checkpoint_path).name} sha256={digest} method={method} samples={samples} seed={seed}"


def write_csv(path: Path, header: str, labels: torch.Tensor, scores: torch.Tensor) -> None:
    lines = [header, "index,label,score"] + [f"{i},{int(label)},{s:.4f}" for i, (label, s) in enumerate(zip(labels.tolist(), scores.tolist()))]
    utils.write_text_atomic("\n".join(lines) + "\n", path)


def read_csv_scores(path: Path, header: str, n: int) -> torch.Tensor | None:
    """The scores in `path` if it was written by exactly this checkpoint, method, samples and seed, else None."""
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    if len(lines) != n + 2 or lines[0] != header:
        return None
    try:
        return torch.tensor([float(line.rsplit(",", 1)[1]) for line in lines[2:]])
    except (ValueError, IndexError):  # edited or damaged by hand: compute the scores afresh
        return None


# ----------------------------------------------------------------------------- commands


def checkpoint_reference(model: VAE, config: dict, mnist: dict[str, torch.Tensor], device: torch.device) -> dict:
    """The reference stored in the checkpoint, or for a checkpoint that predates it, one fitted now from its own
    training and validation images (the split its config describes)."""
    if getattr(model, "anomaly_reference", None) is None:
        if "seed" not in config or "val_size" not in config:
            raise utils.UserError("this checkpoint holds no anomaly reference and no record of its training data to fit one "
                                  "from; use --method elbo")
        print("note: this checkpoint holds no anomaly reference; fitting one from its training images")
        train_idx, val_idx = data.run_split(config, mnist["train_labels"])
        images = lambda idx: evaluate.eval_images(mnist["train_images"][idx], config.get("binarize", False), device)
        model.anomaly_reference = fit_reference(model, images(train_idx), images(val_idx))
    return model.anomaly_reference


def run_score(args: argparse.Namespace) -> int:
    """python main.py score"""
    utils.check_output_dir(args.image_dir, "--image-dir")
    utils.check_output_dir(Path(args.checkpoint).parent, "--checkpoint's folder (for anomaly_scores.csv)")
    model, ckpt, device = evaluate.load_for_use(args.checkpoint, args.device)
    mnist = data.load_mnist(args.data_dir)
    x = evaluate.test_images(mnist, ckpt["config"], device)
    labels = mnist["test_labels"]
    if args.method != "elbo":
        checkpoint_reference(model, ckpt["config"], mnist, device)
    s = score(model, x, args.method, args.samples, args.seed).cpu()
    csv_path = Path(args.checkpoint).parent / "anomaly_scores.csv"
    write_csv(csv_path, provenance(args.checkpoint, args.method, args.samples, args.seed), labels, s)
    print_summary(s, labels, args, ckpt["config"].get("exclude_digit"))
    order = torch.argsort(s)
    sections = []
    for title, idx in (("16 most anomalous test digits (highest score)", order.flip(0)[:16]), ("16 most typical test digits (lowest score)", order[:16])):
        xb = x[idx.to(device)]
        sections.append((title, xb.cpu(), model.reconstruct(xb).cpu(), [f"{int(labels[i])}: {s[i]:.1f}" for i in idx]))
    path = utils.plot_anomalies(sections, Path(args.image_dir) / "anomalies.png", f"anomaly score: {args.method}")
    print(f"wrote {csv_path} and {path}")
    return 0


def print_summary(s: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace, held_out: int | None) -> None:
    q = torch.quantile(s.double(), torch.tensor([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99], dtype=torch.float64)).tolist()
    print(f"anomaly scores (method {args.method}, {UNITS[args.method]}; {args.samples} z samples per image) of {len(s):,} test digits, checkpoint {args.checkpoint}")
    print(f"  mean {s.mean():.2f}  std {s.std():.2f}  min {s.min():.2f}  max {s.max():.2f}")
    print("  percentiles  " + "  ".join(f"p{p}: {v:.2f}" for p, v in zip((1, 5, 25, 50, 75, 95, 99), q)))
    print("  mean score by digit  " + "  ".join(f"{d}: {s[labels == d].mean():.1f}" for d in range(10)))
    if held_out is not None:
        auc = auroc(s, labels == held_out)
        print(f"  digit {held_out} was held out of training: AUROC of telling it from the other digits by score = {auc:.4f}")


def test_set_scores(args: argparse.Namespace, model: VAE, config: dict, device: torch.device) -> torch.Tensor:
    """The test digits' scores under this checkpoint, method, samples and seed: from anomaly_scores.csv when `score`
    wrote it with exactly these, else computed now."""
    header = provenance(args.checkpoint, args.method, args.samples, args.seed)
    stored = read_csv_scores(Path(args.checkpoint).parent / "anomaly_scores.csv", header, 10000)
    if stored is not None:
        return stored
    print(f"scoring the 10,000 test digits for comparison (`python main.py score --method {args.method}` keeps them in anomaly_scores.csv)")
    mnist = data.load_mnist(args.data_dir)
    if args.method != "elbo":
        checkpoint_reference(model, config, mnist, device)
    return score(model, evaluate.test_images(mnist, config, device), args.method, args.samples, args.seed).cpu()


def run_reconstruct(args: argparse.Namespace) -> int:
    """python main.py reconstruct FILE..."""
    utils.check_output_dir(args.image_dir, "--image-dir")
    model, ckpt, device = evaluate.load_for_use(args.checkpoint, args.device)
    inputs, failed = [], 0
    for name in args.files:
        try:
            inputs.append((name, *data.load_digit_image(name)))
        except utils.UserError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    if inputs:
        test_scores = test_set_scores(args, model, ckpt["config"], device)
        if args.method != "elbo" and model.anomaly_reference is None:  # the scores came from the CSV; the image needs it too
            checkpoint_reference(model, ckpt["config"], data.load_mnist(args.data_dir), device)
        for name, original, x in inputs:
            xb = x.to(device)[None]
            if ckpt["config"].get("binarize"):
                xb = data.binarize(xb, torch.Generator(device=device).manual_seed(args.seed))
            value = score(model, xb, args.method, args.samples, args.seed).item()
            percentile = 100.0 * (test_scores <= value).double().mean().item()
            out = Path(args.image_dir) / f"reconstructed_{Path(name).stem}.png"
            title = f"{Path(name).name}: {args.method} score {value:.1f}, above {percentile:.1f}% of test digits"
            utils.plot_user_reconstruction(original, xb[0], model.reconstruct(xb)[0], title, out)
            print(f"{name}: {args.method} score {value:.2f}, percentile {percentile:.1f} among test digits; wrote {out}")
    return 2 if failed else 0
