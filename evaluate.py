"""Test-set metrics (negative ELBO, IWAE bound, bce floor, active units), metrics.json, and the pictures.

    python main.py evaluate    metrics and pictures for a checkpoint
    python main.py sample      a grid of new digits
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import checkpoint
import data
import utils
from model import VAE, iwae_log_weights, iwae_nll, kl_per_dim, neg_elbo_terms

EVAL_BATCH = 250  # images per validation pass: small enough to stay in a CPU's cache
INTERPOLATION_PAIRS = ((0, 6), (1, 7), (2, 5), (3, 8), (4, 9), (7, 2))
MAP_POINTS = 2000  # codes of validation images kept with the latent map, for the demo's background


def test_images(mnist: dict[str, torch.Tensor], config: dict, device: torch.device) -> torch.Tensor:
    """The 10,000 test images as the checkpoint's run is evaluated on them."""
    return data.eval_images(mnist["test_images"], binarized=config["binarize"], device=device)


@torch.inference_mode()
def neg_elbo(model: VAE, x: torch.Tensor, seed: int, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Mean negative ELBO, bce and kl per image in nats over float images x, z sampled with a seeded generator
    (never z = mu: that would not be the ELBO). One host sync at the end, none per batch."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    sums = torch.zeros(2, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        logits, mu, logvar = model(xb, generator=gen)
        bce, kl = neg_elbo_terms(logits, x=xb, mu=mu, logvar=logvar)
        sums += torch.stack([bce.sum(), kl.sum()])
    bce, kl = (sums / len(x)).tolist()
    return {"loss": bce + kl, "bce": bce, "kl": kl}


def bce_floor(x: torch.Tensor) -> torch.Tensor:
    """Per-image sum of per-pixel binary entropies: the lowest bce any model can reach on these images."""
    p = x.double().flatten(1)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)).sum(1)


@torch.inference_mode()
def test_metrics(model: VAE, x: torch.Tensor, iwae_k: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Negative ELBO, IWAE bound, bce floor, active units and KL per dimension over float images x; also the posterior means."""
    elbo = neg_elbo(model, x, seed)
    gen = torch.Generator(device=x.device).manual_seed(seed + 1)
    nll_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    kl_dims = torch.zeros(model.config.latent_dim, dtype=torch.float64, device=x.device)
    means = []
    for i in range(0, len(x), 100):
        xb = x[i : i + 100]
        nll_sum += iwae_nll(iwae_log_weights(model, xb, k=iwae_k, generator=gen)).sum()
        mu, logvar = model.encode(xb)
        kl_dims += kl_per_dim(mu, logvar).sum(0)
        means.append(mu)
    mu = torch.cat(means)
    floor = bce_floor(x).mean().item()
    metrics = {
        "test_loss": elbo["loss"], "test_bce": elbo["bce"], "test_kl": elbo["kl"],
        "test_iwae_nll": nll_sum.item() / len(x), "iwae_k": iwae_k,
        "bce_floor": floor, "bce_above_floor": elbo["bce"] - floor,
        "active_units": int((mu.var(0) > 0.01).sum()), "latent_dim": model.config.latent_dim,
        "kl_per_dim": (kl_dims / len(x)).tolist(), "images": len(x), "seed": seed,
    }
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
    print(f"test set: {m['images']:,} images, checkpoint {m['checkpoint']} (epoch {m['epoch']}), seed {m['seed']}; nats per image")
    for name, value in rows:
        print(f"  {name:<40} {value}")


@torch.inference_mode()
def latent_map(model: VAE, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2-D map of the latent space: the two directions that best separate the digits (Fisher's linear discriminant
    analysis of the posterior means of images x with their labels), where a principal-component view shows a blob.
    A code z lands at (z - mean) @ axes; the map keeps up to MAP_POINTS of these images' positions and labels."""
    mu = torch.cat([model.encode(x[i : i + 1000])[0] for i in range(0, len(x), 1000)]).double().cpu()
    labels = labels.cpu()
    mean = mu.mean(0)
    within = torch.zeros(mu.shape[1], mu.shape[1], dtype=torch.float64)
    between = torch.zeros_like(within)
    for d in labels.unique():
        codes = mu[labels == d]
        centred, offset = codes - codes.mean(0), codes.mean(0) - mean
        within += centred.T @ centred
        between += len(codes) * torch.outer(offset, offset)
    # solve between @ a = lambda * within @ a through the Cholesky factor of within (ridge-regularised)
    chol = torch.linalg.cholesky(within + 1e-6 * within.diagonal().mean() * torch.eye(len(within), dtype=torch.float64))
    inv = torch.linalg.inv(chol)
    _, vectors = torch.linalg.eigh(inv @ between @ inv.T)
    axes = inv.T @ vectors[:, -2:].flip(1)  # the two largest eigenvalues, largest first
    points = (mu - mean) @ axes
    axes = axes / points.std(0)  # unit spread along each axis
    return {"mean": mean.float(), "axes": axes.float(), "points": ((mu - mean) @ axes)[:MAP_POINTS].float(),
            "labels": labels[:MAP_POINTS]}


# ----------------------------------------------------------------------------- pictures


@torch.inference_mode()
def interpolation_rows(model: VAE, mu: torch.Tensor, labels: torch.Tensor) -> tuple[list[torch.Tensor], list[str]]:
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
def traversal_rows(model: VAE, mu: torch.Tensor, kl_means: list[float], values: torch.Tensor) -> tuple[list[torch.Tensor], list[str]]:
    """The 8 dimensions with most KL, each swept over `values` with the others at the first test digit's mean."""
    dims = sorted(range(len(kl_means)), key=lambda d: -kl_means[d])[:8]
    rows = []
    for d in dims:
        z = mu[0].repeat(len(values), 1)
        z[:, d] = values
        rows.append(torch.sigmoid(model.decode(z)))
    return rows, [f"z{d} (KL {kl_means[d]:.1f})" for d in dims]


@torch.inference_mode()
def draw_pictures(model: VAE, history: list[dict], x: torch.Tensor, labels: torch.Tensor, mu: torch.Tensor,
                  kl_means: list[float], space: dict[str, torch.Tensor], image_dir: Path, seed: int) -> list[Path]:
    """Every picture `evaluate` promises, from the model and the test set (float images x, posterior means mu),
    the latent map `space` placing the test digits."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    written = [
        utils.plot_reconstructions(x[:12], model.reconstruct(x[:12]), image_dir / "reconstructed_image.png"),
        utils.plot_grid(model.sample(64, gen), "Samples: 64 digits decoded from z ~ N(0, I)", image_dir / "samples.png"),
    ]
    if history:
        written.append(utils.plot_loss_curves(history, image_dir / "loss_curves.png"))
    rows, names = interpolation_rows(model, mu, labels.to(mu.device))
    written.append(utils.plot_rows(rows, names, title="Latent interpolation between test digits (decoded linear path between posterior means)",
                                   path=image_dir / "interpolation.png", column_labels=[f"{v:.2f}" for v in torch.linspace(0, 1, 10).tolist()]))
    written.append(utils.plot_latent_space((mu.cpu() - space["mean"]) @ space["axes"], labels, image_dir / "latent_space.png"))
    values = torch.linspace(-3, 3, 11, device=mu.device)
    rows, names = traversal_rows(model, mu, kl_means=kl_means, values=values)
    written.append(utils.plot_rows(rows, names, title=f"Latent traversal: the {len(rows)} dimensions with most KL, swept from -3 to 3 (others at a test digit's mean)",
                                   path=image_dir / "latent_traversal.png", column_labels=[f"{v:+.1f}" for v in values.tolist()]))
    return written


# ----------------------------------------------------------------------------- commands


def run_history(path: Path, ckpt: dict) -> list[dict]:
    """The whole run's per-epoch history: best.pt stops at its own epoch, so prefer the same run's last.pt."""
    last = path.parent / "last.pt"
    mine = ckpt.get("history", [])
    if path.name == "last.pt" or not last.is_file():
        return mine
    try:
        other = checkpoint.load(last)
    except checkpoint.CheckpointError:
        return mine
    if other.get("config") == ckpt.get("config") or other.get("history", [])[: len(mine)] == mine:
        return other.get("history", mine)
    return mine


def evaluate(path: str | Path, model: VAE, ckpt: dict, mnist: dict[str, torch.Tensor], *, image_dir: str | Path,
             iwae_k: int, seed: int | None) -> dict:
    """Print the metrics table, write metrics.json beside the checkpoint and draw the pictures; also run at the end of training."""
    path = Path(path)
    seed = ckpt["config"]["seed"] if seed is None else seed
    x = test_images(mnist, ckpt["config"], next(model.parameters()).device)
    t0 = time.perf_counter()
    metrics, mu = test_metrics(model, x, iwae_k=iwae_k, seed=seed)
    history = ckpt.get("history") or [{"epoch": None}]  # a trimmed file keeps the history only; a weights-only file neither
    epoch = ckpt["epoch"] if "epoch" in ckpt else history[-1]["epoch"]
    metrics |= {"checkpoint": str(path), "epoch": epoch, "binarized": ckpt["config"]["binarize"],
                "exclude_digit": ckpt["config"]["exclude_digit"], "seconds": time.perf_counter() - t0}
    print_metrics(metrics)
    written = [] if checkpoint.is_shipped(path) else [path.parent / "metrics.json"]  # nothing beside the shipped checkpoint
    for json_path in written:
        utils.write_text_atomic(json.dumps(metrics, indent=2) + "\n", json_path)
    reference = ckpt.get("anomaly_reference") or {}
    space = reference.get("latent_map") or latent_map(model, x, mnist["test_labels"])  # a map from the test digits if none was stored
    pictures = draw_pictures(model, history=run_history(path, ckpt), x=x, labels=mnist["test_labels"], mu=mu,
                             kl_means=metrics["kl_per_dim"], space=space, image_dir=Path(image_dir), seed=seed)
    print("wrote " + ", ".join(str(p) for p in written + pictures))
    return metrics


def run(args: argparse.Namespace) -> int:
    """python main.py evaluate"""
    path = checkpoint.for_use(args.checkpoint)
    utils.check_output_dir(args.image_dir, "--image-dir")
    if not checkpoint.is_shipped(path):
        utils.check_output_dir(path.parent, "--checkpoint's folder (for metrics.json)")
    model, ckpt = checkpoint.load_model(path, utils.pick_device(args.device))  # a bad checkpoint is reported before the data set is read
    evaluate(path, model, ckpt, mnist=data.load_mnist(args.data_dir), image_dir=args.image_dir, iwae_k=args.iwae_k, seed=args.seed)
    return 0


def sample(args: argparse.Namespace) -> int:
    """python main.py sample"""
    utils.check_output_dir(args.image_dir, "--image-dir")
    device = utils.pick_device(args.device)
    model, _ = checkpoint.load_model(checkpoint.for_use(args.checkpoint), device)
    images = model.sample(args.n, torch.Generator(device=device).manual_seed(args.seed))
    path = utils.plot_grid(images, f"Samples: {args.n} digits decoded from z ~ N(0, I) (seed {args.seed})", Path(args.image_dir) / "samples.png")
    print(f"wrote {path}")
    return 0
