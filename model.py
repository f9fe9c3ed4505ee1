"""The convolutional VAE: the network, the loss terms, the importance-weighted bound, sampling and reconstruction.

This file imports nothing else of this project: it is the model alone. Reading and writing checkpoints lives in
checkpoint.py, the training loop in train.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class VAEConfig:
    """Everything needed to rebuild the architecture (plain Python values, stored in checkpoints)."""

    latent_dim: int = 32
    channels: tuple[int, int] = (32, 32)  # widths of the two stride-2 convs (28 -> 14 -> 7); the decoder mirrors them
    hidden_dim: int = 256  # width of the fully connected layers between the 7x7 feature map and the latent; 0 for none
    fc_layers: int = 1  # how many such layers, in the encoder and again in the decoder
    res_blocks: int = 1  # residual 3x3 blocks at 7x7, in the encoder and again in the decoder
    activation: str = "silu"
    norm: str = "none"  # "batch": BatchNorm after every hidden convolution
    out_conv: int = 16  # width of an extra 3x3 conv at 28x28 that makes the logits (0: the last transposed conv makes them)

    def __post_init__(self) -> None:
        # checked by type as well as range: the values may come from a checkpoint file, not only from flags
        if not (isinstance(self.channels, (tuple, list)) and len(self.channels) == 2):
            raise ValueError(f"channels must be two widths, got {self.channels!r}")
        self.channels = tuple(self.channels)
        for name, low, high in LIMITS:
            values = self.channels if name == "channels" else (getattr(self, name),)
            if any(type(v) is not int or not low <= v <= high for v in values):
                raise ValueError(f"{name} must be a whole number from {low} to {high:,}, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.norm not in ("none", "batch"):
            raise ValueError(f"norm must be 'none' or 'batch', got {self.norm!r}")

    def parameter_count(self) -> int:
        """How many weights this architecture has, counted without allocating them (on the meta device)."""
        with torch.device("meta"):
            return sum(p.numel() for p in VAE(self).parameters())


MAX_PARAMETERS = 50_000_000  # 200 MB of fp32 weights, and as much again for each of the gradients and Adam's two moments
# The range of each size (far above anything useful on MNIST; they stop a typo from allocating gigabytes).
LIMITS = (("latent_dim", 1, 1024), ("channels", 1, 1024), ("hidden_dim", 0, 16384), ("fc_layers", 1, 16),
          ("res_blocks", 0, 16), ("out_conv", 0, 1024))


ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU}


class ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))): deepens the 7x7 stage without harming gradient flow."""

    def __init__(self, channels: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            act(), nn.Conv2d(channels, channels, kernel_size=3, padding=1), act(), nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VAE(nn.Module):
    """Conv encoder q(z|x) = N(mu, diag(exp(logvar))), transposed-conv decoder p(x|z) = Bernoulli(sigmoid(logits))."""

    def __init__(self, config: VAEConfig | None = None, **overrides) -> None:
        super().__init__()
        config = config or VAEConfig(**overrides)
        self.config = config
        c1, c2 = config.channels
        act = ACTIVATIONS[config.activation]
        flat = c2 * 7 * 7
        norm = (lambda c: [nn.BatchNorm2d(c)]) if config.norm == "batch" else (lambda c: [])
        encoder: list[nn.Module] = [nn.Conv2d(1, c1, kernel_size=4, stride=2, padding=1), *norm(c1), act(), nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1), *norm(c2)]
        encoder += [ResBlock(c2, act) for _ in range(config.res_blocks)]
        encoder += [act(), nn.Flatten()]
        hidden = [config.hidden_dim] * config.fc_layers if config.hidden_dim else []
        for n_in, n_out in zip([flat] + hidden, hidden):
            encoder += [nn.Linear(n_in, n_out), act()]
        self.encoder = nn.Sequential(*encoder)
        self.to_stats = nn.Linear(config.hidden_dim or flat, 2 * config.latent_dim)  # mu and logvar in one matmul

        decoder: list[nn.Module] = []
        for n_in, n_out in zip([config.latent_dim] + hidden, hidden):
            decoder += [nn.Linear(n_in, n_out), act()]
        decoder += [nn.Linear(hidden[-1] if hidden else config.latent_dim, flat)]
        decoder += [nn.Unflatten(1, (c2, 7, 7))]
        decoder += [ResBlock(c2, act) for _ in range(config.res_blocks)]
        decoder += [act(), nn.ConvTranspose2d(c2, c1, kernel_size=4, stride=2, padding=1), *norm(c1), act()]
        if config.out_conv:
            decoder += [nn.ConvTranspose2d(c1, config.out_conv, kernel_size=4, stride=2, padding=1), *norm(config.out_conv), act(), nn.Conv2d(config.out_conv, 1, 3, padding=1)]
        else:
            decoder += [nn.ConvTranspose2d(c1, 1, kernel_size=4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE or not x.is_floating_point():
            given = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected a float tensor of shape (B, 1, 28, 28) with values in [0, 1], got {given}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (B, latent_dim)."""
        self.check_input(x)
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (B, 1, 28, 28); apply torch.sigmoid for pixel intensities."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """(logits, mu, logvar) for one z ~ q(z|x) per image; eps is that draw's standard normal noise (drawn here,
        from `generator`, when not given)."""
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar, eps=eps, generator=generator)), mu, logvar

    @torch.inference_mode()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n new digits decoded from z ~ N(0, I), as intensities in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=device)
        return torch.sigmoid(self.decode(z))

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions through the posterior mean (the sharpest picture), as intensities in [0, 1]."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decode(mu))


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample of q(z|x) that is differentiable in mu and logvar (the
    reparameterization trick). eps is drawn from `generator` when not given; given, it may carry extra leading
    sample dimensions, which broadcast."""
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def neg_elbo_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    """Per-image (bce, kl) in nats: loss = bce + kl is the negative ELBO.

    bce sums the Bernoulli negative log-likelihood over the 784 pixels; kl is KL(q(z|x) || N(0, I)) in closed form.
    """
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    return bce, kl_per_dim(mu, logvar).sum(1)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) of each latent dimension in closed form, (B, latent_dim)."""
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar)


@torch.inference_mode()
def iwae_log_weights(model: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None, chunk: int | None = None):
    """log p(x|z) + log p(z) - log q(z|x) for k samples z ~ q(z|x) per image: a (B, k) tensor.

    chunk is about how many images one decoding pass holds; the result does not depend on it. By default 200 off CUDA,
    whose ~10 MB of activations stay in a CPU's cache (larger passes are slower there: docs/speed.md), and 8,192 on a GPU.
    """
    if chunk is None:
        chunk = 8192 if x.device.type == "cuda" else 200
    mu, logvar = model.encode(x)
    batch = x.shape[0]
    pixels = x.reshape(batch, -1)
    out = torch.empty(batch, k, device=x.device)
    # all k x B noise draws first, so the bound does not depend on how the decoding is chunked
    noise = torch.randn(k, batch, mu.shape[1], generator=generator, device=x.device)
    per_pass = max(1, chunk // batch)  # samples per image decoded in one pass, so a pass holds ~chunk images
    for start in range(0, k, per_pass):
        n = min(per_pass, k - start)
        eps = noise[start : start + n]
        z = reparameterize(mu, logvar, eps)  # (n, B, D)
        logits = model.decode(z.flatten(0, 1)).reshape(n, batch, -1)
        # log Bernoulli(x | sigmoid(l)) summed over pixels = x.l - sum softplus(l): the same value as -BCE-with-logits,
        # without materialising the n copies of x (a batched dot product and one elementwise pass)
        log_px_z = torch.einsum("nbp,bp->nb", logits, pixels) - F.softplus(logits).sum(2)
        log_pz = -0.5 * (z.square() + _LOG_2PI).sum(2)
        log_qz = -0.5 * (eps.square() + logvar + _LOG_2PI).sum(2)
        out[:, start : start + n] = (log_px_z + log_pz - log_qz).T
    return out


def iwae_nll(log_weights: torch.Tensor) -> torch.Tensor:
    """Per-image importance-weighted bound on -log p(x) (Burda et al. 2015) from (B, k) log-weights."""
    k = log_weights.shape[1]
    return -(torch.logsumexp(log_weights, dim=1) - math.log(k))
