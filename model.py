"""The convolutional VAE: the network, the loss terms and the importance-weighted bound. Imports
nothing else of the project: the settings are config.py's, training train.py's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
ACTIVATIONS = dict(relu=nn.ReLU, silu=nn.SiLU, elu=nn.ELU, leaky_relu=nn.LeakyReLU, gelu=nn.GELU)
NORMS = ("none", "batch")
_LOG_2PI = math.log(2 * math.pi)


class VAE(nn.Module):
    """Conv encoder q(z|x) = N(mu, diag(exp(logvar))), transposed-conv decoder p(x|z) =
    Bernoulli(sigmoid(logits)). VAE() is the default network (the shipped model's); the other
    arguments are the knobs docs/model-selection.md searched."""

    def __init__(
        self,
        latent_dim: int = 32,
        channels: tuple[int, int] = (32, 32),  # of the two stride-2 convolutions, mirrored
        hidden_dim: int = 256,  # width of the fully connected layers; 0: none
        fc_layers: int = 1,  # fully connected layers, in the encoder and again in the decoder
        res_blocks: int = 1,  # residual blocks at 7x7, in the encoder and again in the decoder
        out_conv: int = 16,  # width of a 3x3 convolution at 28x28 that makes the logits; 0: none
        activation: str = "silu",
        norm: str = "none",  # "batch": BatchNorm after every hidden convolution
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        c1, c2 = channels
        act = ACTIVATIONS[activation]
        flat = c2 * 7 * 7
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=4, stride=2, padding=1),  # 1x28x28 -> c1x14x14
            *norm_layer(norm, c1),
            act(),
            nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1),  # -> c2x7x7
            *norm_layer(norm, c2),
            *[ResBlock(c2, act) for _ in range(res_blocks)],
            act(),
            nn.Flatten(),  # -> flat
            *fully_connected(flat, hidden_dim, fc_layers, act),  # -> hidden_dim
        )
        # mu and logvar, 2 x latent_dim, from one matrix product
        self.to_stats = nn.Linear(hidden_dim if hidden_dim else flat, 2 * latent_dim)
        self.decoder = nn.Sequential(
            *fully_connected(latent_dim, hidden_dim, fc_layers, act),  # z -> hidden_dim
            nn.Linear(hidden_dim if hidden_dim else latent_dim, flat),
            nn.Unflatten(1, (c2, 7, 7)),  # -> c2x7x7
            *[ResBlock(c2, act) for _ in range(res_blocks)],
            act(),
            nn.ConvTranspose2d(c2, c1, kernel_size=4, stride=2, padding=1),  # -> c1x14x14
            *norm_layer(norm, c1),
            act(),
            *to_logits(c1, out_conv, norm, act),  # -> 1x28x28 logits
        )

    def encode(self, x: torch.Tensor, check_values: bool = True):
        """Posterior mean and log-variance, each (B, latent_dim), of images x (see check_images)."""
        check_images(x, values=check_values)
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (B, 1, 28, 28) of float32 codes z (B, latent_dim); sigmoid: pixels."""
        fits = isinstance(z, torch.Tensor) and z.shape[1:] == (self.latent_dim,)
        if not (fits and z.dtype == torch.float32):
            got = f"{tuple(z.shape)} {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a float32 tensor (B, {self.latent_dim}), got {got}")
        return self.decoder(z)

    def forward(self, x, eps=None, generator=None, check_values: bool = True):
        """(logits, mu, logvar) for one z ~ q(z|x) per image, eps its N(0, I) noise (else drawn from
        `generator`). The training step passes check_values=False: its batches come from checked
        uint8 data, and reading whether they hold NaN or values outside [0, 1] waits for a GPU."""
        mu, logvar = self.encode(x, check_values=check_values)
        z = reparameterize(mu, logvar, eps=eps, generator=generator)
        return self.decoder(z), mu, logvar

    @torch.inference_mode()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n new digits (n, 1, 28, 28) decoded from z ~ N(0, I), as intensities in [0, 1]."""
        if type(n) is not int or n < 0:
            raise ValueError(f"n must be a whole number, 0 or more, got {n!r}")
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return torch.sigmoid(self.decoder(z))

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Intensities in [0, 1] decoded from the posterior mean (the sharpest picture)."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decoder(mu))


class ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))): deepens the 7x7 stage without harming gradient flow."""

    def __init__(self, channels: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            act(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            act(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def norm_layer(norm: str, channels: int) -> list[nn.Module]:
    """BatchNorm after a hidden convolution when norm is "batch"; nothing when it is "none"."""
    return [nn.BatchNorm2d(channels)] if norm == "batch" else []


def fully_connected(n_in: int, width: int, layers: int, act: type[nn.Module]) -> list[nn.Module]:
    """`layers` linear layers of `width` outputs, each followed by act; none when width is 0."""
    blocks = []
    for _ in range(layers if width else 0):
        blocks += [nn.Linear(n_in, width), act()]
        n_in = width
    return blocks


def to_logits(c_in: int, out_conv: int, norm: str, act: type[nn.Module]) -> list[nn.Module]:
    """The last upsampling, 14x14 -> 28x28: to the logits, or to out_conv channels that a 3x3
    convolution turns into the logits."""
    if not out_conv:
        return [nn.ConvTranspose2d(c_in, 1, kernel_size=4, stride=2, padding=1)]
    return [
        nn.ConvTranspose2d(c_in, out_conv, kernel_size=4, stride=2, padding=1),
        *norm_layer(norm, out_conv),
        act(),
        nn.Conv2d(out_conv, 1, kernel_size=3, padding=1),
    ]


def check_images(x, values: bool = True) -> None:
    """The network's door: ValueError unless x is a float32 tensor (B, 1, 28, 28) with values in
    [0, 1]. float64 and float16 are refused, not converted (x.float() converts). The value check
    (NaN, infinite, outside [0, 1]) waits for the device once; values=False skips it."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor (B, 1, 28, 28), got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        hint = "; x.unsqueeze(1) adds the channel" if tuple(x.shape[1:]) == (28, 28) else ""
        raise ValueError(f"images must have shape (B, 1, 28, 28), got {tuple(x.shape)}{hint}")
    if x.dtype != torch.float32:
        hint = "x.float() converts" if x.is_floating_point() else "x.float() / 255 for pixels"
        raise ValueError(f"images must be float32 ({hint}), got {x.dtype}")
    if not values or x.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(x)).tolist()  # one wait for the device
    if not 0 <= low <= high <= 1:  # NaN fails too
        got = "NaN" if math.isnan(low) else f"values from {low:g} to {high:g}"
        raise ValueError(f"images must have values in [0, 1], got {got}")


def on_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The model on `device`; on the CPU in channels-last layout, oneDNN's fast one for convs."""
    model = model.to(device)
    if torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def reparameterize(mu, logvar, eps=None, generator=None) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I): a sample of q(z|x) differentiable in mu and logvar (the
    reparameterization trick). eps (else drawn from `generator`) may have leading sample dims."""
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def neg_elbo_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    """Per-image (bce, kl) in nats: loss = bce + kl is the negative ELBO. bce sums the Bernoulli
    negative log-likelihood over the 784 pixels; kl is KL(q(z|x) || N(0, I)) in closed form."""
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    return bce, kl_per_dim(mu, logvar).sum(1)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) of each latent dimension, (B, latent_dim)."""
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar)


@torch.inference_mode()
def mean_neg_elbo(model: VAE, x: torch.Tensor, seed: int, batch_size: int = 250) -> dict:
    """Mean negative ELBO, bce and kl per image in nats, z sampled with a seeded generator (never
    z = mu: that would not be the ELBO), in batches small enough to stay in a CPU's cache."""
    check_images(x)
    if len(x) == 0:
        raise ValueError("the mean negative ELBO needs at least one image, got an empty batch")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    sums = torch.zeros(2, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        logits, mu, logvar = model(xb, generator=gen, check_values=False)
        bce, kl = neg_elbo_terms(logits, x=xb, mu=mu, logvar=logvar)
        sums += torch.stack([bce.sum(), kl.sum()])
    bce, kl = (sums / len(x)).tolist()
    return {"loss": bce + kl, "bce": bce, "kl": kl}


@torch.inference_mode()
def iwae_log_weights(model: VAE, x: torch.Tensor, k: int, generator=None, chunk=None):
    """log p(x|z) + log p(z) - log q(z|x) for k samples z ~ q(z|x) per image: a (B, k) tensor. chunk
    is about how many images a decoding pass holds (the result does not depend on it): by default
    200 off CUDA, whose ~10 MB of activations stay in a CPU's cache (docs/speed.md), else 8,192."""
    if type(k) is not int or k < 1:
        raise ValueError(f"k must be a whole number of at least 1, got {k!r}")
    mu, logvar = model.encode(x)
    chunk = chunk or (8192 if x.device.type == "cuda" else 200)
    batch = x.shape[0]
    pixels = x.flatten(1)
    out = torch.empty(batch, k, device=x.device)
    # all k x B noise draws first, so the bound does not depend on how the decoding is chunked
    noise = torch.randn(k, batch, mu.shape[1], generator=generator, device=x.device)
    # samples per image decoded in one pass, so a pass holds ~chunk images
    per_pass = max(1, chunk // max(batch, 1))
    for start in range(0, k, per_pass):
        eps = noise[start : start + per_pass]
        z = reparameterize(mu, logvar, eps)  # (n, B, D)
        logits = model.decode(z.flatten(0, 1)).reshape(len(eps), batch, pixels.shape[1])
        # log Bernoulli(x | sigmoid(l)) summed over pixels = x.l - sum softplus(l): -BCE-with-logits
        # without n copies of x (a batched dot product and one elementwise pass)
        log_px_z = torch.einsum("nbp,bp->nb", logits, pixels) - F.softplus(logits).sum(2)
        log_pz = -0.5 * (z.square() + _LOG_2PI).sum(2)
        log_qz = -0.5 * (eps.square() + logvar + _LOG_2PI).sum(2)
        out[:, start : start + len(eps)] = (log_px_z + log_pz - log_qz).T
    return out


def iwae_nll(log_weights: torch.Tensor) -> torch.Tensor:
    """Per-image importance-weighted bound on -log p(x) (Burda et al. 2015) from log-weights."""
    k = log_weights.shape[1]
    return -(torch.logsumexp(log_weights, dim=1) - math.log(k))
