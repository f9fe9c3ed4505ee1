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
from model import VAE, iwae_log_weights, iwae_nll, kl_per_dim, neg_elbo_terms, prepare_model

EVAL_BATCH = 250  # images per validation pass: small enough to stay in a CPU's cache
BINARIZE_SEED = 0  # --binarize: one fixed draw of the evaluation images, the same for every --seed and device
INTERPOLATION_PAIRS = ((0, 6), (1, 7), (2, 5), (3, 8), (4, 9), (7, 2))


def eval_images(images: torch.Tensor, binarized: bool, device: torch.device) -> torch.Tensor:
    """uint8 images -> float images on `device`; with --binarize, binarized once with a fixed CPU generator so
    that every run, whatever its seed or device, is scored on the same binary images."""
    x = data.to_float(images.cpu())
    if binarized:
        x = data.binarize(x, torch.Generator().manual_seed(BINARIZE_SEED))
    return x.to(device)


def test_images(mnist: dict[str, torch.Tensor], config: dict, device: torch.device) -> torch.Tensor:
    """The 10,000 test images as the checkpoint's run is evaluated on them."""
    return eval_images(mnist["test_images"], config.get("binarize", False), device)


@torch.inference_mode()
def neg_elbo(model: VAE, x: torch.Tensor, seed: int, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Mean negative ELBO, bce and kl per image in nats over float images x, z sampled with a seeded generator
    (never z = mu: that would not be the ELBO). One host sync at the end, none per batch."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    sums = torch.zeros(2, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        logits, mu, logvar = model(xb, gen)
        bce, kl = neg_elbo_terms(logits, xb, mu, logvar)
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
        nll_sum += iwae_nll(iwae_log_weights(model, xb, iwae_k, gen)).sum()
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
                  kl_means: list[float], image_dir: Path, seed: int) -> list[Path]:
    """Every picture `evaluate` promises, from the model and the test set (float images x, posterior means mu)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    written = [
        utils.plot_reconstructions(x[:12], model.reconstruct(x[:12]), image_dir / "reconstructed_image.png"),
        utils.plot_grid(model.sample(64, gen), "Samples: 64 digits decoded from z ~ N(0, I)", image_dir / "samples.png"),
    ]
    if history:
        written.append(utils.plot_loss_curves(history, image_dir / "loss_curves.png"))
    rows, names = interpolation_rows(model, mu, labels.to(mu.device))
    written.append(utils.plot_rows(rows, names, "Latent interpolation between test digits (decoded linear path between posterior means)",
                                   image_dir / "interpolation.png", column_labels=[f"{v:.2f}" for v in torch.linspace(0, 1, 10).tolist()]))
    centred = (mu - mu.mean(0)).double()
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    explained = (s.square() / s.square().sum()).tolist()
    written.append(utils.plot_latent_space((centred @ v[:2].T).float(), labels, explained, image_dir / "latent_space.png"))
    values = torch.linspace(-3, 3, 11, device=mu.device)
    rows, names = traversal_rows(model, mu, kl_means, values)
    written.append(utils.plot_rows(rows, names, f"Latent traversal: the {len(rows)} dimensions with most KL, swept from -3 to 3 (others at a test digit's mean)",
                                   image_dir / "latent_traversal.png", column_labels=[f"{v:+.1f}" for v in values.tolist()]))
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


def load_for_use(path: str | Path, device_name: str) -> tuple[VAE, dict, torch.device]:
    """The checkpoint's model ready for inference on the chosen device, and the checkpoint itself (read once)."""
    device = utils.pick_device(device_name)
    ckpt = checkpoint.load(path, map_location=device)
    return prepare_model(VAE.from_loaded(ckpt, path, device), device), ckpt, device


def evaluate(path: str | Path, mnist: dict[str, torch.Tensor], image_dir: str | Path, iwae_k: int, seed: int | None,
             loaded: tuple[VAE, dict, torch.device]) -> dict:
    """Print the metrics table, write metrics.json beside the checkpoint and draw the pictures; also run at the end of training."""
    path = Path(path)
    model, ckpt, device = loaded
    config = ckpt["config"]
    seed = config.get("seed", 0) if seed is None else seed
    x = test_images(mnist, config, device)
    t0 = time.perf_counter()
    metrics, mu = test_metrics(model, x, iwae_k, seed)
    metrics |= {"checkpoint": str(path), "epoch": ckpt.get("epoch"), "binarized": bool(config.get("binarize")),
                "exclude_digit": config.get("exclude_digit"), "seconds": time.perf_counter() - t0}
    print_metrics(metrics)
    utils.write_text_atomic(json.dumps(metrics, indent=2) + "\n", path.parent / "metrics.json")
    pictures = draw_pictures(model, run_history(path, ckpt), x, mnist["test_labels"], mu, metrics["kl_per_dim"], Path(image_dir), seed)
    print(f"wrote {path.parent / 'metrics.json'} and " + ", ".join(str(p) for p in pictures))
    return metrics


def run(args: argparse.Namespace) -> int:
    """python main.py evaluate"""
    utils.check_output_dir(args.image_dir, "--image-dir")
    utils.check_output_dir(Path(args.checkpoint).parent, "--checkpoint's folder (for metrics.json)")
    loaded = load_for_use(args.checkpoint, args.device)  # a bad checkpoint is reported before the data set is read
    evaluate(args.checkpoint, data.load_mnist(args.data_dir), args.image_dir, args.iwae_k, args.seed, loaded)
    return 0


def sample(args: argparse.Namespace) -> int:
    """python main.py sample"""
    utils.check_output_dir(args.image_dir, "--image-dir")
    model, _, device = load_for_use(args.checkpoint, args.device)
    images = model.sample(args.n, torch.Generator(device=device).manual_seed(args.seed))
    path = utils.plot_grid(images, f"Samples: {args.n} digits decoded from z ~ N(0, I) (seed {args.seed})", Path(args.image_dir) / "samples.png")
    print(f"wrote {path}")
    return 0
