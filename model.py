"""The convolutional VAE: its settings, the network, the loss terms and the importance-weighted
bound.

This file imports nothing else of the project. Training lives in train.py, the checkpoint file in
checkpoint.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}
_LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- the architecture's
# settings


def setting(default, low, high, optional: bool = False):
    """A number setting and its range, low to high inclusive (whole numbers when the bounds are
    ints; None too if optional). Written once, here in the field: the flags, a checkpoint's config
    and config.check all read it."""
    return field(default=default, metadata={"range": (low, high), "optional": optional})


def choice(default: str, options: tuple[str, ...]):
    return field(default=default, metadata={"choices": options})


@dataclass
class VAEConfig:
    """Everything needed to rebuild the architecture (plain Python values, stored in checkpoints)."""

    latent_dim: int = setting(32, 1, 1024)
    # the two stride-2 convs (28 -> 14 -> 7), mirrored
    channels: tuple[int, int] = setting((32, 32), 1, 1024)
    # fully connected layers between the 7x7 map and z; 0 for none
    hidden_dim: int = setting(256, 0, 16384)
    # how many such layers, in the encoder and again in the decoder
    fc_layers: int = setting(1, 1, 16)
    # residual 3x3 blocks at 7x7, in the encoder and again in the decoder
    res_blocks: int = setting(1, 0, 16)
    # width of a 3x3 conv at 28x28 that makes the logits; 0 for none
    out_conv: int = setting(16, 0, 1024)
    activation: str = choice("silu", tuple(ACTIVATIONS))
    # "batch": BatchNorm after every hidden convolution
    norm: str = choice("none", ("none", "batch"))

    def __post_init__(self) -> None:
        # from a file
        self.channels = tuple(self.channels) if isinstance(self.channels, list) else self.channels

    def parameter_count(self) -> int:
        """How many weights this architecture has, counted without allocating them (on the meta
        device)."""
        with torch.device("meta"):
            return sum(p.numel() for p in VAE(self).parameters())


# ----------------------------------------------------------------------------- the network


class ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))): deepens the 7x7 stage without harming gradient flow."""

    def __init__(self, channels: int, act: type[nn.Module]) -> None:
        super().__init__()
        conv = lambda: nn.Conv2d(channels, channels, kernel_size=3, padding=1)  # noqa: E731
        self.body = nn.Sequential(act(), conv(), act(), conv())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VAE(nn.Module):
    """Conv encoder q(z|x) = N(mu, diag(exp(logvar))), transposed-conv decoder p(x|z) =
    Bernoulli(sigmoid(logits))."""

    def __init__(self, config: VAEConfig | None = None, **overrides) -> None:
        super().__init__()
        self.config = config = config or VAEConfig(**overrides)
        c1, c2 = config.channels
        act = ACTIVATIONS[config.activation]
        norm = (lambda c: [nn.BatchNorm2d(c)]) if config.norm == "batch" else (lambda c: [])
        down = lambda c_in, c_out: nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1)  # noqa: E731
        up = lambda c_in, c_out: nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)  # noqa: E731
        flat = c2 * 7 * 7
        hidden = [config.hidden_dim] * config.fc_layers if config.hidden_dim else []

        encoder = [down(1, c1), *norm(c1), act(), down(c1, c2), *norm(c2)]
        encoder += [ResBlock(c2, act) for _ in range(config.res_blocks)] + [act(), nn.Flatten()]
        for n_in, n_out in zip([flat] + hidden, hidden):
            encoder += [nn.Linear(n_in, n_out), act()]
        self.encoder = nn.Sequential(*encoder)
        # mu and logvar in one matmul
        self.to_stats = nn.Linear(config.hidden_dim or flat, 2 * config.latent_dim)

        decoder = []
        for n_in, n_out in zip([config.latent_dim] + hidden, hidden):
            decoder += [nn.Linear(n_in, n_out), act()]
        decoder += [
            nn.Linear(hidden[-1] if hidden else config.latent_dim, flat),
            nn.Unflatten(1, (c2, 7, 7)),
        ]
        decoder += [ResBlock(c2, act) for _ in range(config.res_blocks)]
        decoder += [act(), up(c2, c1), *norm(c1), act()]
        if config.out_conv:
            decoder += [
                up(c1, config.out_conv),
                *norm(config.out_conv),
                act(),
                nn.Conv2d(config.out_conv, 1, 3, padding=1),
            ]
        else:
            decoder += [up(c1, 1)]
        self.decoder = nn.Sequential(*decoder)

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        """The model's door: images must be a float batch (B, 1, 28, 28)."""
        if not (
            isinstance(x, torch.Tensor)
            and x.dim() == 4
            and tuple(x.shape[1:]) == IMAGE_SHAPE
            and x.is_floating_point()
        ):
            given = (
                f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            )
            raise ValueError(
                f"expected a float tensor of shape (B, 1, 28, 28) with values in [0, 1], got {given}"
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (B, latent_dim)."""
        self.check_input(x)
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (B, 1, 28, 28); apply torch.sigmoid for pixel intensities."""
        return self.decoder(z)

    def forward(
        self,
        x: torch.Tensor,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        """(logits, mu, logvar) for one z ~ q(z|x) per image; eps is that draw's standard normal
        noise (drawn here, from `generator`, when not given)."""
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
        """Reconstructions through the posterior mean (the sharpest picture), as intensities in [0,
        1]."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decode(mu))


def on_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The model on `device`; on the CPU in channels-last layout, oneDNN's fast one for these
    convolutions."""
    model = model.to(device)
    return (
        model.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else model
    )


# ----------------------------------------------------------------------------- the loss and the
# bound


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample of q(z|x) that is differentiable in mu and
    logvar (the reparameterization trick). eps is drawn from `generator` when not given; given, it
    may carry extra leading sample dimensions, which broadcast."""
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def neg_elbo_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    """Per-image (bce, kl) in nats: loss = bce + kl is the negative ELBO.

    bce sums the Bernoulli negative log-likelihood over the 784 pixels; kl is KL(q(z|x) || N(0, I))
    in closed form.
    """
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    return bce, kl_per_dim(mu, logvar).sum(1)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) of each latent dimension in closed form, (B, latent_dim)."""
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar)


@torch.inference_mode()
def mean_neg_elbo(
    model: VAE, x: torch.Tensor, seed: int, batch_size: int = 250
) -> dict[str, float]:
    """Mean negative ELBO, bce and kl per image in nats over float images x, z sampled with a seeded
    generator (never z = mu: that would not be the ELBO), in batches small enough to stay in a CPU's
    cache. One host sync."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    sums = torch.zeros(2, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        logits, mu, logvar = model(xb, generator=gen)
        bce, kl = neg_elbo_terms(logits, x=xb, mu=mu, logvar=logvar)
        sums += torch.stack([bce.sum(), kl.sum()])
    bce, kl = (sums / len(x)).tolist()
    return {"loss": bce + kl, "bce": bce, "kl": kl}


@torch.inference_mode()
def iwae_log_weights(
    model: VAE,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x) for k samples z ~ q(z|x) per image: a (B, k) tensor.

    chunk is about how many images one decoding pass holds; the result does not depend on it. By
    default 200 off CUDA, whose ~10 MB of activations stay in a CPU's cache (docs/speed.md), and
    8,192 on a GPU.
    """
    chunk = chunk or (8192 if x.device.type == "cuda" else 200)
    mu, logvar = model.encode(x)
    batch = x.shape[0]
    pixels = x.reshape(batch, -1)
    out = torch.empty(batch, k, device=x.device)
    # all k x B noise draws first, so the bound does not depend on how the decoding is chunked
    noise = torch.randn(k, batch, mu.shape[1], generator=generator, device=x.device)
    # samples per image decoded in one pass, so a pass holds ~chunk images
    per_pass = max(1, chunk // batch)
    for start in range(0, k, per_pass):
        eps = noise[start : start + per_pass]
        z = reparameterize(mu, logvar, eps)  # (n, B, D)
        logits = model.decode(z.flatten(0, 1)).reshape(len(eps), batch, -1)
        # log Bernoulli(x | sigmoid(l)) summed over pixels = x.l - sum softplus(l):
        # -BCE-with-logits, without materialising n copies of x (a batched dot product and one
        # elementwise pass)
        log_px_z = torch.einsum("nbp,bp->nb", logits, pixels) - F.softplus(logits).sum(2)
        log_pz = -0.5 * (z.square() + _LOG_2PI).sum(2)
        log_qz = -0.5 * (eps.square() + logvar + _LOG_2PI).sum(2)
        out[:, start : start + len(eps)] = (log_px_z + log_pz - log_qz).T
    return out


def iwae_nll(log_weights: torch.Tensor) -> torch.Tensor:
    """Per-image importance-weighted bound on -log p(x) (Burda et al. 2015) from (B, k) log-weights."""
    k = log_weights.shape[1]
    return -(torch.logsumexp(log_weights, dim=1) - math.log(k))
