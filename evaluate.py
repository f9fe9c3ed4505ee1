"""Test-set metrics (negative ELBO, IWAE bound, bce floor, active units), the latent map, and the
pictures.

In a notebook: `metrics, mu = evaluate.test_metrics(model, x, iwae_k=100, seed=1)` with float test
images x.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import utils
from files import write_text_atomic
from model import VAE, iwae_log_weights, iwae_nll, kl_per_dim, mean_neg_elbo

INTERPOLATION_PAIRS = ((0, 6), (1, 7), (2, 5), (3, 8), (4, 9), (7, 2))
MAP_POINTS = 2000  # codes of validation images kept with the latent map, for the demo's background
IWAE_BATCH = 100  # test images per IWAE pass


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
    kl_dims = torch.zeros(model.config.latent_dim, dtype=torch.float64, device=x.device)
    means = []
    starts = tqdm(
        range(0, len(x), IWAE_BATCH),
        f"IWAE bound (k={iwae_k}) on {len(x):,} test images",
        disable=not progress,
    )
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
        "active_units": int((mu.var(0) > 0.01).sum()),
        "latent_dim": model.config.latent_dim,
    }
    metrics |= {"kl_per_dim": (kl_dims / len(x)).tolist(), "images": len(x), "seed": seed}
    return metrics, mu


def print_metrics(m: dict) -> None:
    top = sorted(range(len(m["kl_per_dim"])), key=lambda d: -m["kl_per_dim"][d])[:5]
    rows = [
        ("negative ELBO (test loss)", f"{m['test_loss']:.3f}"),
        ("  reconstruction (bce)", f"{m['test_bce']:.3f}"),
        ("  KL(q(z|x) || p(z))", f"{m['test_kl']:.3f}"),
        (f"IWAE bound on -log p(x), k={m['iwae_k']}", f"{m['test_iwae_nll']:.3f}"),
        ("bce floor (pixel entropy of the data)", f"{m['bce_floor']:.3f}"),
        ("bce above the floor", f"{m['bce_above_floor']:.3f}"),
        ("active units (Var[mu] > 0.01)", f"{m['active_units']} of {m['latent_dim']}"),
        ("largest KL per dimension", ", ".join(f"z{d}: {m['kl_per_dim'][d]:.2f}" for d in top)),
    ]
    where = f"checkpoint {m['checkpoint']} (epoch {m['epoch']}), seed {m['seed']}"
    print(f"test set: {m['images']:,} images, {where}; nats per image")
    for name, value in rows:
        print(f"  {name:<40} {value}")


# ----------------------------------------------------------------------------- the latent map


@torch.inference_mode()
def latent_map(model: VAE, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2-D map of the latent space: the two directions that best separate the digits (Fisher's
    linear discriminant analysis of the posterior means of images x with their labels), where a
    principal-component view shows a blob. Only the active dimensions (Var of the posterior mean >
    0.01, as `active_units` counts them) take part: the discriminant divides by the spread within
    each digit, so the near-constant dimensions the decoder ignores would get the largest weights,
    and moving a code along such a map would change the ring's place but not the digit. A code z
    lands at (z - mean) @ axes; the map keeps up to MAP_POINTS of these images' positions and
    labels."""
    mu = (
        torch.cat([model.encode(x[i : i + 1000])[0] for i in range(0, len(x), 1000)]).double().cpu()
    )
    labels = labels.cpu()
    mean, spread = mu.mean(0), mu.var(0)
    active = spread > 0.01
    if active.sum() < 2:  # a collapsed or untrained model: its two most varied dimensions
        active = torch.zeros_like(active).index_fill_(0, spread.topk(2).indices, True)
    used = mu[:, active]
    within = torch.zeros(used.shape[1], used.shape[1], dtype=torch.float64)
    between = torch.zeros_like(within)
    for d in labels.unique():
        codes = used[labels == d]
        centred, offset = codes - codes.mean(0), codes.mean(0) - used.mean(0)
        within += centred.T @ centred
        between += len(codes) * torch.outer(offset, offset)
    # solve between @ a = lambda * within @ a through the Cholesky factor of within
    # (ridge-regularised)
    ridge = 1e-6 * within.diagonal().mean() * torch.eye(len(within), dtype=torch.float64)
    inv = torch.linalg.inv(torch.linalg.cholesky(within + ridge))
    _, vectors = torch.linalg.eigh(inv @ between @ inv.T)
    axes = torch.zeros(mu.shape[1], 2, dtype=torch.float64)
    # the two largest eigenvalues, largest first; 0 on unused dims
    axes[active] = inv.T @ vectors[:, -2:].flip(1)
    axes = axes / ((mu - mean) @ axes).std(0)  # unit spread along each axis
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


# ----------------------------------------------------------------------------- the whole evaluation


def evaluate(
    path: Path,
    model: VAE,
    ckpt: dict,
    mnist: dict[str, torch.Tensor],
    image_dir: Path,
    iwae_k: int,
    seed: int | None,
    metrics_path: Path | None,
    history: list[dict],
    progress: bool = False,
) -> dict:
    """Print the metrics table, write metrics.json to `metrics_path` (None: not written) and draw
    the pictures. `history` is the run's per-epoch history for the loss curves (empty: no curves).
    """
    config = ckpt["config"]
    seed = config["seed"] if seed is None else seed
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
    # from the test digits if none
    space = ckpt.get("latent_map") or latent_map(model, x, mnist["test_labels"])
    written += draw_pictures(
        model, x, mnist["test_labels"], mu, metrics, space, history, image_dir, seed
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return metrics
