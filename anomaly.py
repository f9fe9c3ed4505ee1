"""Anomaly scores: how unlike the training digits an image is (higher = stranger), and the commands that use them.

    python main.py score [--method M]        score every test digit: anomaly_scores.csv, images/anomalies.png
    python main.py reconstruct FILE...        your own digit pictures: reconstructed, scored, ranked among the test digits

In a notebook: `anomaly.score(model, images)` with float images (B, 1, 28, 28) in [0, 1] returns (B,) scores.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import evaluate
import utils
from model import VAE, kl_per_dim, neg_elbo_terms

METHODS = ("elbo", "complexity", "regret")
DEFAULT_METHOD = "complexity"
NATS_PER_BYTE = 8 * math.log(2)


# ----------------------------------------------------------------------------- the scores


@torch.inference_mode()
def neg_elbo_per_image(model: VAE, x: torch.Tensor, samples: int, gen: torch.Generator) -> torch.Tensor:
    """Each image's negative ELBO in nats, its reconstruction term averaged over `samples` z draws (the KL is exact)."""
    mu, logvar = model.encode(x)
    bce = torch.zeros(len(x), device=x.device)
    for _ in range(samples):
        sample_bce, kl = neg_elbo_terms(model.decode(model.reparameterize(mu, logvar, gen)), x, mu, logvar)
        bce += sample_bce
    return bce / samples + kl


def png_nats(x: torch.Tensor) -> torch.Tensor:
    """Each image's complexity: the length of its lossless PNG encoding (8-bit grey, zlib at level 9), in nats."""
    pixels = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()[:, 0]
    lengths = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=True)
        lengths.append(buffer.tell())
    return torch.tensor(lengths, dtype=torch.float32, device=x.device) * NATS_PER_BYTE


def refit_gain(model: VAE, x: torch.Tensor, samples: int, gen: torch.Generator, steps: int = 30, lr: float = 0.1) -> torch.Tensor:
    """Likelihood Regret (Xiao et al. 2020), amortisation form: how many nats the negative ELBO falls when the
    encoder's posterior (mu, logvar) is re-fitted to this one image by Adam with the decoder fixed. An image like
    the training digits is already encoded about as well as it can be; an unfamiliar one gains more."""
    with torch.no_grad():
        mu, logvar = model.encode(x)
    before = neg_elbo_per_image(model, x, samples, gen)
    eps = torch.randn(samples, *mu.shape, generator=gen, device=x.device)  # one fixed set of draws for the whole fit
    params = [mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            m, lv = params
            grads = torch.autograd.grad(fixed_noise_neg_elbo(model, x, m, lv, eps).sum(), params)  # only the posterior moves: no gradient reaches the weights
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
    with torch.no_grad():
        after = fixed_noise_neg_elbo(model, x, *params, eps)
    return before - after


def fixed_noise_neg_elbo(model: VAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-image negative ELBO of the posterior N(mu, exp(logvar)), its bce averaged over the given noise draws."""
    bce = torch.stack([neg_elbo_terms(model.decode(mu + e * torch.exp(0.5 * logvar)), x, mu, logvar)[0] for e in eps]).mean(0)
    return bce + kl_per_dim(mu, logvar).sum(1)


def score(model: VAE, images: torch.Tensor, method: str | None = None, samples: int = 10, seed: int = 0,
          batch_size: int = 1000) -> torch.Tensor:
    """Anomaly scores (B,) of float images (B, 1, 28, 28) in [0, 1], higher = more anomalous; on the images' device.

    elbo        the negative ELBO in nats: what the model fails to explain. Flags badly written digits, but ranks
                simple images (a 1, a blank page) as typical whatever the model learned.
    complexity  the negative ELBO minus the image's PNG length in nats (Serra et al. 2020): the nats the model
                needs beyond what a general-purpose compressor needs, so simplicity no longer passes for typicality.
    regret      Likelihood Regret: the nats gained by re-fitting the posterior to the single image (slower).
    """
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown anomaly method {method!r}; choose one of {', '.join(METHODS)}")
    VAE.check_input(images)
    gen = torch.Generator(device=images.device).manual_seed(seed)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        if method == "regret":
            out.append(refit_gain(model, x, samples, gen))
            continue
        nll = neg_elbo_per_image(model, x, samples, gen)
        out.append(nll - png_nats(x) if method == "complexity" else nll)
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
    return torch.tensor([float(line.rsplit(",", 1)[1]) for line in lines[2:]])


# ----------------------------------------------------------------------------- commands


def run_score(args: argparse.Namespace) -> int:
    """python main.py score"""
    utils.check_output_dir(args.image_dir, "--image-dir")
    utils.check_output_dir(Path(args.checkpoint).parent, "--checkpoint's folder (for anomaly_scores.csv)")
    model, ckpt, device = evaluate.load_for_use(args.checkpoint, args.device)
    mnist = data.load_mnist(args.data_dir)
    x = evaluate.test_images(mnist, ckpt["config"], device)
    labels = mnist["test_labels"]
    s = score(model, x, args.method, args.samples, args.seed).cpu()
    csv_path = Path(args.checkpoint).parent / "anomaly_scores.csv"
    write_csv(csv_path, provenance(args.checkpoint, args.method, args.samples, args.seed), labels, s)
    print_summary(s, labels, args, ckpt["config"].get("exclude_digit"))
    order = torch.argsort(s)
    sections = []
    for title, idx in (("16 most anomalous test digits (highest score)", order.flip(0)[:16]), ("16 most typical test digits (lowest score)", order[:16])):
        xb = x[idx.to(device)]
        sections.append((title, xb.cpu(), model.reconstruct(xb).cpu(), [f"{int(labels[i])}: {s[i]:.0f}" for i in idx]))
    path = utils.plot_anomalies(sections, Path(args.image_dir) / "anomalies.png", f"anomaly score: {args.method}")
    print(f"wrote {csv_path} and {path}")
    return 0


def print_summary(s: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace, held_out: int | None) -> None:
    q = torch.quantile(s.double(), torch.tensor([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99], dtype=torch.float64)).tolist()
    print(f"anomaly scores (method {args.method}, nats; {args.samples} z samples per image) of {len(s):,} test digits, checkpoint {args.checkpoint}")
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
