"""Test-set metrics (negative ELBO, IWAE bound, bce floor, active units), the latent map, the
pictures, and finishing a trained run as `python main.py` does (finish_run).

In a notebook: `metrics = evaluate.evaluate(model, ckpt, mnist, iwae_k=10)` prints and returns the
figures; `evaluate.finish_run(path, mnist)` stores the anomaly reference and latent map in best.pt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import anomaly
import checkpoint
import data
import utils
from config import float_settings
from files import write_text_atomic
from model import VAE, iwae_log_weights, iwae_nll, kl_per_dim, mean_neg_elbo

INTERPOLATION_PAIRS = ((0, 6), (1, 7), (2, 5), (3, 8), (4, 9), (7, 2))
MAP_POINTS = 2000  # codes of validation images kept with the latent map, for the demo's background
IWAE_BATCH = 100  # test images per IWAE pass
# a latent dimension is active when its posterior mean varies across images by more than this
ACTIVE_VARIANCE = 0.01


def test_images(
    mnist: dict[str, torch.Tensor], binarized: bool, device: torch.device
) -> torch.Tensor:
    """The 10,000 test images as float images on `device`, as a run with these settings is evaluated
    on them."""
    return data.eval_images(mnist["test_images"], binarized=binarized, device=device)


def bce_floor(x: torch.Tensor) -> torch.Tensor:
    """Per-image sum of per-pixel binary entropies: the lowest bce any model can reach on these
    images."""
    p = x.double().flatten(1)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)).sum(1)


@torch.inference_mode()
def test_metrics(
    model: VAE, x: torch.Tensor, iwae_k: int, seed: int, progress: bool = False
) -> tuple[dict, torch.Tensor]:
    """Negative ELBO, IWAE bound, bce floor, active units and KL per dimension over float images x;
    also the posterior means. The IWAE bound takes most of the time (k decodings per image): a bar
    shows it with `progress`."""
    elbo = mean_neg_elbo(model, x, seed)
    gen = torch.Generator(device=x.device).manual_seed(seed + 1)
    nll_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    kl_dims = torch.zeros(model.latent_dim, dtype=torch.float64, device=x.device)
    means = []
    desc = f"IWAE bound (k={iwae_k}) on {len(x):,} test images"
    starts = tqdm(range(0, len(x), IWAE_BATCH), desc=desc, disable=not progress)
    for i in starts:
        xb = x[i : i + IWAE_BATCH]
        nll_sum += iwae_nll(iwae_log_weights(model, xb, k=iwae_k, generator=gen)).sum()
        mu, logvar = model.encode(xb)
        kl_dims += kl_per_dim(mu, logvar).sum(0)
        means.append(mu)
    mu = torch.cat(means)
    floor = bce_floor(x).mean().item()
    metrics = {"test_loss": elbo["loss"], "test_bce": elbo["bce"], "test_kl": elbo["kl"]}
    metrics |= {"test_iwae_nll": nll_sum.item() / len(x), "iwae_k": iwae_k}
    metrics |= {"bce_floor": floor, "bce_above_floor": elbo["bce"] - floor}
    metrics |= {
        "active_units": int((mu.var(0) > ACTIVE_VARIANCE).sum()),
        "latent_dim": model.latent_dim,
    }
    metrics |= {"kl_per_dim": (kl_dims / len(x)).tolist(), "images": len(x), "seed": seed}
    return metrics, mu


def print_metrics(m: dict) -> None:
    top = sorted(range(len(m["kl_per_dim"])), key=lambda d: -m["kl_per_dim"][d])[:5]
    dims = m["latent_dim"]
    rows = [
        ("negative ELBO (test loss)", f"{m['test_loss']:.3f}"),
        ("  reconstruction (bce)", f"{m['test_bce']:.3f}"),
        ("  KL(q(z|x) || p(z))", f"{m['test_kl']:.3f}"),
        (f"IWAE bound on -log p(x), k={m['iwae_k']}", f"{m['test_iwae_nll']:.3f}"),
        ("bce floor (pixel entropy of the data)", f"{m['bce_floor']:.3f}"),
        ("bce above the floor", f"{m['bce_above_floor']:.3f}"),
        (f"active units (Var[mu] > {ACTIVE_VARIANCE})", f"{m['active_units']} of {dims}"),
        ("largest KL per dimension", ", ".join(f"z{d}: {m['kl_per_dim'][d]:.2f}" for d in top)),
    ]
    where = f"checkpoint {m['checkpoint']} (epoch {m['epoch']}), seed {m['seed']}"
    print(f"test set: {m['images']:,} images, {where}; nats per image")
    for name, value in rows:
        print(f"  {name:<40} {value}")


# ----------------------------------------------------------------------------- the latent map


def discriminant_directions(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The (up to) two directions that best separate the labels' codes, best first, (D, <= 2):
    Fisher's linear discriminant, between @ a = lambda * within @ a."""
    within = torch.zeros(codes.shape[1], codes.shape[1], dtype=torch.float64)
    between = torch.zeros_like(within)
    for d in labels.unique():
        group = codes[labels == d]
        centred, offset = group - group.mean(0), group.mean(0) - codes.mean(0)
        within += centred.T @ centred
        between += len(group) * torch.outer(offset, offset)
    # solved through the Cholesky factor of within (ridge-regularised; the tiny floor keeps codes
    # that never vary solvable)
    ridge = (1e-6 * within.diagonal().mean() + 1e-12) * torch.eye(len(within), dtype=torch.float64)
    inv = torch.linalg.inv(torch.linalg.cholesky(within + ridge))
    _, vectors = torch.linalg.eigh(inv @ between @ inv.T)
    return inv.T @ vectors[:, -min(2, codes.shape[1]) :].flip(1)  # the largest eigenvalues


@torch.inference_mode()
def latent_map(model: VAE, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2-D map of the latent space: the two directions that best separate the digits (Fisher's
    linear discriminant analysis of the posterior means of images x with their labels), where a
    principal-component view shows a blob. Only the active dimensions (Var of the posterior mean >
    ACTIVE_VARIANCE, as `active_units` counts them) take part: the discriminant divides by the
    spread within each digit, so the near-constant dimensions the decoder ignores would get the
    largest weights, and moving a code along such a map would change the ring's place but not the
    digit. A code z lands at (z - mean) @ axes; the map keeps up to MAP_POINTS of these images'
    positions and labels. A one-dimensional code gives a one-dimensional map: its second axis is
    0, so every point lies on the first."""
    mu = anomaly.posterior_means(model, x).double().cpu()
    labels = labels.cpu()
    mean, spread = mu.mean(0), mu.var(0)
    active = spread > ACTIVE_VARIANCE
    if active.sum() < 2:  # a collapsed or untrained model: its (up to) two most varied dimensions
        most_varied = spread.topk(min(2, len(spread))).indices
        active = torch.zeros_like(active).index_fill_(0, most_varied, True)
    axes = torch.zeros(mu.shape[1], 2, dtype=torch.float64)
    directions = discriminant_directions(mu[:, active], labels)
    axes[active, : directions.shape[1]] = directions  # 0 on unused dims
    # unit spread along each axis (an axis of zeros stays zeros)
    axes = axes / ((mu - mean) @ axes).std(0).clamp_min(1e-12)
    points = ((mu - mean) @ axes)[:MAP_POINTS]
    return {
        "mean": mean.float(),
        "axes": axes.float(),
        "points": points.float(),
        "labels": labels[:MAP_POINTS],
    }


def latent_map_of(ckpt: dict) -> dict | None:
    """The latent map a checkpoint carries, checked where it enters (ValueError if it is malformed),
    or None."""
    space, latent_dim = ckpt.get("latent_map"), ckpt["config"]["latent_dim"]
    if space is not None and not (
        isinstance(space, dict)
        and all(
            isinstance(space.get(k), torch.Tensor) for k in ("mean", "axes", "points", "labels")
        )
        and space["mean"].shape == (latent_dim,)
        and space["axes"].shape == (latent_dim, 2)
        and space["points"].dim() == 2
        and space["points"].shape[1] == 2
        and space["labels"].shape == space["points"].shape[:1]
        and getattr(space.get("kl_per_dim", space["mean"]), "shape", None) == (latent_dim,)
    ):
        raise ValueError("its latent map is malformed")
    return space


# ----------------------------------------------------------------------------- pictures


@torch.inference_mode()
def interpolation_rows(
    model: VAE, mu: torch.Tensor, labels: torch.Tensor
) -> tuple[list[torch.Tensor], list[str]]:
    """Decoded straight lines between the posterior means of the first test digits of each pair."""
    rows, names = [], []
    t = torch.linspace(0, 1, 10, device=mu.device)[:, None]
    for a, b in INTERPOLATION_PAIRS:
        ia, ib = (labels == a).nonzero(), (labels == b).nonzero()
        if len(ia) and len(ib):
            rows.append(torch.sigmoid(model.decode((1 - t) * mu[ia[0, 0]] + t * mu[ib[0, 0]])))
            names.append(f"{a} -> {b}")
    return rows, names


@torch.inference_mode()
def traversal_rows(model: VAE, mu: torch.Tensor, kl_means: list[float], values: torch.Tensor):
    """The 8 dimensions with most KL, each swept over `values` with the others at the first test
    digit's mean."""
    dims = sorted(range(len(kl_means)), key=lambda d: -kl_means[d])[:8]
    rows = []
    for d in dims:
        z = mu[0].repeat(len(values), 1)
        z[:, d] = values
        rows.append(torch.sigmoid(model.decode(z)))
    return rows, [f"z{d} (KL {kl_means[d]:.1f})" for d in dims]


@torch.inference_mode()
def draw_pictures(
    model: VAE,
    x: torch.Tensor,
    labels: torch.Tensor,
    mu: torch.Tensor,
    metrics: dict,
    space: dict,
    history: list[dict],
    image_dir: Path,
    seed: int,
) -> list[Path]:
    """Every picture `evaluate` promises, from the model and the test set (float images x, posterior
    means mu), with the latent map `space` placing the test digits; written into image_dir."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    samples = "Samples: 64 digits decoded from z ~ N(0, I)"
    figures = {
        "reconstructed_image.png": utils.plot_reconstructions(x[:12], model.reconstruct(x[:12])),
        "samples.png": utils.plot_grid(model.sample(64, gen), samples),
    }
    if history:
        figures["loss_curves.png"] = utils.plot_loss_curves(history)
    rows, names = interpolation_rows(model, mu, labels.to(mu.device))
    title = "Latent interpolation between test digits (decoded linear path between posterior means)"
    steps = [f"{v:.2f}" for v in torch.linspace(0, 1, 10).tolist()]
    figures["interpolation.png"] = utils.plot_rows(rows, names, title, column_labels=steps)
    points = (mu.cpu() - space["mean"]) @ space["axes"]
    figures["latent_space.png"] = utils.plot_latent_space(points, labels)
    values = torch.linspace(-3, 3, 11, device=mu.device)
    rows, names = traversal_rows(model, mu, kl_means=metrics["kl_per_dim"], values=values)
    title = (
        f"Latent traversal: the {len(rows)} dimensions with most KL, swept from -3 to 3"
        " (others at a test digit's mean)"
    )
    sweep = [f"{v:+.1f}" for v in values.tolist()]
    figures["latent_traversal.png"] = utils.plot_rows(rows, names, title, column_labels=sweep)
    return [utils.save_figure(fig, Path(image_dir) / name) for name, fig in figures.items()]


@torch.inference_mode()
def anomaly_figure(model: VAE, x, labels, scores, title: str, n: int = 16, what="test digits"):
    """The n highest-scoring (strangest) and the n lowest-scoring (most typical) of images x, each
    above its reconstruction and captioned with its label and score."""
    order = scores.cpu().argsort()
    sections = []
    for heading, picked in (
        (f"{n} most anomalous {what} (highest score)", order.flip(0)[:n]),
        (f"{n} most typical {what} (lowest score)", order[:n]),
    ):
        images = x[picked.to(x.device)]
        captions = [f"{int(labels[i])}: {scores[i]:.1f}" for i in picked]
        sections.append((heading, images.cpu(), model.reconstruct(images).cpu(), captions))
    return utils.plot_anomalies(sections, title=title)


# ----------------------------------------------------------------------------- the whole evaluation


@float_settings()  # denormals flushed: 1.35x faster, as in training
def evaluate(
    model: VAE,
    ckpt: dict,
    mnist: dict[str, torch.Tensor],
    iwae_k: int = 100,
    seed: int | None = None,
    image_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    history: list[dict] | None = None,
    path: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate a checkpoint's model on the test set: print the metrics table and return it. Also
    writes metrics.json to `metrics_path` and the pictures into `image_dir` when they are given.
    `seed` (default: the run's) seeds the z samples; `history` (default: the checkpoint's) draws the
    loss curves; `path` names the checkpoint in the metrics."""
    config = ckpt["config"]
    seed = config["seed"] if seed is None else seed
    history = ckpt.get("history", []) if history is None else history
    x = test_images(mnist, config["binarize"], next(model.parameters()).device)
    t0 = time.perf_counter()
    metrics, mu = test_metrics(model, x, iwae_k=iwae_k, seed=seed, progress=progress)
    epoch = ckpt.get("epoch", history[-1]["epoch"] if history else None)
    metrics |= {"checkpoint": str(path), "epoch": epoch, "binarized": config["binarize"]}
    metrics |= {"exclude_digit": config["exclude_digit"], "seconds": time.perf_counter() - t0}
    print_metrics(metrics)
    written = []
    if metrics_path is not None:
        write_text_atomic(json.dumps(metrics, indent=2) + "\n", metrics_path)
        written.append(metrics_path)
    if image_dir is not None:
        labels = mnist["test_labels"]
        # the stored map places the test digits; a checkpoint without one gets a map of them
        space = ckpt.get("latent_map") or latent_map(model, x, labels)
        written += draw_pictures(model, x, labels, mu, metrics, space, history, image_dir, seed)
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    return metrics


# ----------------------------------------------------------------------------- finishing a run


def run_images(ckpt: dict, mnist: dict[str, torch.Tensor], device="cpu"):
    """A run's own float training and validation images and the validation labels, from the split
    its stored settings describe."""
    c = checkpoint.train_config(ckpt)
    train_idx, val_idx = data.run_split(
        mnist["train_labels"], c.val_size, c.seed, c.exclude_digit, c.subset
    )
    train_x = data.eval_images(mnist["train_images"][train_idx], c.binarize, device)
    val_x = data.eval_images(mnist["train_images"][val_idx], c.binarize, device)
    return train_x, val_x, mnist["train_labels"][val_idx]


@torch.inference_mode()
def mean_kl_per_dim(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """The mean KL(q(z|x) || N(0, 1)) of each latent dimension over images x, (latent_dim,)."""
    mu, logvar = anomaly.posterior(model, x)
    return kl_per_dim(mu, logvar).double().mean(0).cpu()


@float_settings()
def finish_run(
    path: str | Path, mnist: dict[str, torch.Tensor], device="cpu", progress: bool = False
) -> dict:
    """What `python main.py` does once a run has trained, before it evaluates: store in best.pt
    what anomaly scores compare against (fitted on the run's own training and validation images,
    with the test digits' scores, so that a percentile needs no data set) and the latent map.
    Returns the checkpoint as saved."""
    model, ckpt = checkpoint.load_model(path, device)
    train_x, val_x, val_labels = run_images(ckpt, mnist, device)
    test_x = test_images(mnist, ckpt["config"]["binarize"], device)
    reference = anomaly.reference_for_run(model, train_x, val_x, test_x, progress=progress)
    space = latent_map(model, val_x, val_labels)
    # how much each dimension is used, as `evaluate` ranks them: the demo names its sliders by it
    space["kl_per_dim"] = mean_kl_per_dim(model, test_x).float()
    ckpt = checkpoint.with_keys(ckpt, anomaly_reference=reference, latent_map=space)
    checkpoint.save(ckpt, path)
    return ckpt
