"""The core with oracles: KL, BCE, reparameterization, the IWAE bound and the mean ELBO against
hand-derived values and independent computations; the network's door; the settings (their checks
and their help, read from the fields); the weight average with batch norm."""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import asdict, dataclass, field, fields

import pytest
import torch
from helpers import tiny_images, tiny_model
from torch.distributions import Normal
from torch.optim.swa_utils import AveragedModel

import anomaly
import checkpoint
import config
import main
import model
import train
from config import TrainConfig, VAEConfig
from model import VAE


# -sum(x log p + (1-x) log(1-p)) per image
def manual_bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    p, x = torch.sigmoid(logits.double()), x.double()
    return -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)


def test_kl_per_dim_equals_hand_derived_values_and_neg_elbo_terms_the_bernoulli_nll_and_summed_kl():
    mu = torch.tensor([[0.0, 1.0, 0.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, 0.0, math.log(2.0), -1.0]], dtype=torch.float64)
    # KL(N(m, v) || N(0, 1)) = (m^2 + v - 1 - log v) / 2, worked out for each pair
    expected = [0.0, 0.5, (1 - math.log(2.0)) / 2, (4 + math.exp(-1) - 1 + 1) / 2]
    assert model.kl_per_dim(mu, logvar)[0].tolist() == pytest.approx(expected, abs=1e-12)
    assert torch.equal(model.kl_per_dim(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3, 5))
    # neg_elbo_terms: the manual Bernoulli NLL, and the KL summed over dimensions
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(4, 1, 28, 28, generator=gen, dtype=torch.float64)
    # 0, 1 and between
    x = (1.6 * torch.rand(4, 1, 28, 28, generator=gen, dtype=torch.float64) - 0.3).clamp(0, 1)
    mu = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    logvar = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    bce, kl = model.neg_elbo_terms(logits, x, mu, logvar)
    torch.testing.assert_close(bce, manual_bce(logits, x), rtol=1e-10, atol=0)
    torch.testing.assert_close(kl, model.kl_per_dim(mu, logvar).sum(1), rtol=1e-12, atol=0)


def test_reparameterize_is_mu_plus_sigma_eps_passes_gradients_and_forward_uses_it():
    gen = torch.Generator().manual_seed(0)
    mu, logvar, eps = torch.randn(3, 3, 4, generator=gen, dtype=torch.float64)
    mu.requires_grad_()
    logvar.requires_grad_()
    z = model.reparameterize(mu, logvar, eps=eps)
    torch.testing.assert_close(z, mu + torch.exp(logvar / 2) * eps, rtol=0, atol=1e-12)
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones_like(mu))  # dz/dmu = 1
    # dz/dlogvar = eps sigma / 2
    torch.testing.assert_close(logvar.grad, 0.5 * eps * torch.exp(logvar.detach() / 2))
    # forward decodes the noise it is given
    m, x = tiny_model(), tiny_images(3)
    eps = eps[:, :2].repeat(1, 4).float()
    with torch.no_grad():
        mu, logvar = m.encode(x)
        logits = m(x, eps=eps)[0]
        expected = m.decode(mu + eps * torch.exp(logvar / 2))
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(logits, m(x, eps=-eps)[0])


def shifted_model(seed: int = 0) -> VAE:
    """An untrained model whose posterior is far from N(0, I): mu + 1, logvar - 2."""
    m = tiny_model(seed)
    with torch.no_grad():
        m.to_stats.bias += torch.tensor([1.0] * m.latent_dim + [-2.0] * m.latent_dim)
    return m


def test_iwae_at_k1_equals_the_single_sample_neg_elbo_with_the_same_noise():
    m, x = shifted_model(), tiny_images(5, seed=3)
    log_weights = model.iwae_log_weights(m, x, 1, generator=torch.Generator().manual_seed(7))
    # the draw the bound makes
    eps = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(7))[0]
    with torch.no_grad():
        mu, logvar = m.encode(x)
        z = mu + eps * torch.exp(logvar / 2)
        prior, posterior = Normal(0.0, 1.0), Normal(mu.double(), torch.exp(logvar.double() / 2))
        # -(log p(x|z) + log p(z) - log q(z|x)), each density from torch.distributions
        log_ratio = (posterior.log_prob(z.double()) - prior.log_prob(z.double())).sum(1)
        expected = manual_bce(m.decode(z), x) + log_ratio
    assert log_ratio.abs().min() > 1  # the prior and posterior terms are large enough to matter
    nll = model.iwae_nll(log_weights).double()
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-3)


def test_iwae_bound_does_not_depend_on_chunk():
    """(It tightens with k on a trained model: tests/test_evaluate.py.)"""
    m, x = shifted_model(1), tiny_images(48, seed=4)

    def bound(k, chunk=None, seed=11):
        gen = torch.Generator().manual_seed(seed)
        return model.iwae_nll(model.iwae_log_weights(m, x, k, generator=gen, chunk=chunk))

    reference = bound(9, chunk=10_000)
    for chunk in (1, 7, 100):  # passes of 1, 1 and 2 samples per image
        torch.testing.assert_close(bound(9, chunk=chunk), reference, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(bound(9, seed=12), reference)


def test_mean_neg_elbo_equals_the_per_batch_sum_by_hand_and_repeats_for_a_seed():
    m, x = tiny_model(), tiny_images(7, seed=5)
    got = model.mean_neg_elbo(m, x, seed=4, batch_size=3)
    gen, bce_sum, kl_sum = torch.Generator().manual_seed(4), 0.0, 0.0
    with torch.no_grad():
        # batches of 3, 3 and 1, each drawing its own noise in turn
        for xb in (x[0:3], x[3:6], x[6:7]):
            mu, logvar = m.encode(xb)
            z = mu + torch.randn(len(xb), 8, generator=gen) * torch.exp(logvar / 2)
            bce_sum += manual_bce(m.decode(z), xb).sum().item()
            kl_sum += (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum().item()
    assert got["bce"] == pytest.approx(bce_sum / 7, rel=1e-5)
    assert got["kl"] == pytest.approx(kl_sum / 7, rel=1e-5)
    assert got["loss"] == pytest.approx(got["bce"] + got["kl"], rel=1e-12)
    assert model.mean_neg_elbo(m, x, 4, 3) == got
    assert model.mean_neg_elbo(m, x, 5, 3)["bce"] != got["bce"]


# ----------------------------------------------------------------------------- the network's door

IMAGES = tiny_images(2)
# images the door refuses, and what its ValueError must say it got
REFUSED = {
    "no channel": (IMAGES[:, 0], "got (2, 28, 28); x.unsqueeze(1)"),
    "one image": (IMAGES[0], "got (1, 28, 28)"),
    "rgb": (IMAGES.expand(2, 3, 28, 28), "got (2, 3, 28, 28)"),
    "float64": (IMAGES.double(), "got torch.float64"),
    "float16": (IMAGES.half(), "got torch.float16"),
    "uint8": ((IMAGES * 255).byte(), "x.float() / 255 for pixels), got torch.uint8"),
    "a list": (IMAGES.tolist(), "got list"),
    "NaN": (IMAGES.index_fill(2, torch.tensor([5]), math.nan), "got NaN"),
    "0 to 255": (IMAGES * 255, "got values from 0 to 255"),
    "negative": (IMAGES - 0.5, "got values from -0.5 to 0.5"),
    "infinite": (IMAGES.index_fill(3, torch.tensor([1]), math.inf), "from 0 to inf"),
}
DOORS = {
    "encode": lambda m, x: m.encode(x),
    "forward": lambda m, x: m(x),
    "reconstruct": lambda m, x: m.reconstruct(x),
    "mean_neg_elbo": lambda m, x: model.mean_neg_elbo(m, x, seed=0),
    "iwae": lambda m, x: model.iwae_log_weights(m, x, k=2),
}


@pytest.mark.parametrize("door", list(DOORS))
@pytest.mark.parametrize("case", list(REFUSED))
def test_each_door_refuses_bad_images_naming_what_it_got(door, case):
    x, words = REFUSED[case]
    with pytest.raises(ValueError, match=r"^images must") as err:
        DOORS[door](tiny_model(), x)
    assert words in str(err.value), err.value


def test_empty_batches_give_empty_results_and_decode_checks_z():
    m, empty = tiny_model(), torch.zeros(0, 1, 28, 28)
    assert [t.shape for t in m.encode(empty)] == [(0, 8), (0, 8)]
    assert m(empty)[0].shape == m.reconstruct(empty).shape == m.sample(0).shape == (0, 1, 28, 28)
    assert model.iwae_log_weights(m, empty, k=3).shape == (0, 3)
    assert m.decode(torch.zeros(5, 8)).shape == (5, 1, 28, 28)
    for z, got in [
        (torch.zeros(8), "got (8,) torch.float32"),
        (torch.zeros(5, 3), "got (5, 3) torch.float32"),
        (torch.zeros(5, 8, dtype=torch.float64), "got (5, 8) torch.float64"),
        ([0.0] * 8, "got list"),
    ]:
        with pytest.raises(ValueError, match=r"z must be a float32 tensor \(B, 8\), got") as err:
            m.decode(z)
        assert got in str(err.value)
    with pytest.raises(ValueError, match="n must be a whole number, 0 or more, got -1"):
        m.sample(-1)


def test_the_training_path_skips_only_the_value_check():
    """check_values=False (the training step's call) reads no value, so NaN passes through; the
    shape and dtype are still checked."""
    m, x = tiny_model(), REFUSED["NaN"][0]
    assert m(x, check_values=False)[0].isnan().any()
    with pytest.raises(ValueError, match="got torch.float64"):
        m(x.double(), check_values=False)


# ----------------------------------------------------------------------------- the settings


def test_the_networks_settings_are_vaes_arguments_with_vaes_defaults():
    arguments = inspect.signature(VAE).parameters
    assert [f.name for f in fields(VAEConfig)] == list(arguments)
    assert asdict(VAEConfig()) == {name: p.default for name, p in arguments.items()}
    config.check(VAEConfig())
    config.check(TrainConfig())
    # as a checkpoint stores them
    stored = checkpoint.config_dict(TrainConfig(), VAEConfig(channels=(4, 12)))
    assert VAEConfig(**{f.name: stored[f.name] for f in fields(VAEConfig)}).channels == (4, 12)


def test_help_is_read_from_each_field_and_from_the_constants_it_cites(monkeypatch):
    for f in fields(TrainConfig) + fields(VAEConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"
        assert "range" in f.metadata or "choices" in f.metadata or f.default is False, f.name
    monkeypatch.setattr(anomaly, "KNN_K", 7)
    monkeypatch.setattr(anomaly, "LOCAL_WEIGHT", 2.5)
    parsers = main.build_parsers()
    shown = "".join(parsers["train"].format_help().split())
    for f in fields(TrainConfig) + fields(VAEConfig):
        assert "".join(f.metadata["help"].split()) in shown, f.name
    method = " ".join(parsers["score"].format_help().split())
    assert "minus 2.5 times" in method and "to the 7 nearest" in method

    @dataclass
    class Later:  # a setting added without help: --help still builds
        new: int = field(default=1, metadata={"range": (0, 2), "none": "", "metavar": None})

    main.add_settings(main.Parser().add_argument_group("x"), Later)


BAD_SETTINGS = {  # setting -> values its check must refuse
    "latent_dim": [0, 32.0, True, "8"],
    "channels": [(8, 16, 32), (8, 16.0), 8],
    "activation": ["x"],
    "norm": ["layer"],
    "binarize": [1],
    "lr": [math.nan, 0.0],
    "ema": [1.0],
    "exclude_digit": [10],
}


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in BAD_SETTINGS.items() for v in vs])
def test_check_refuses_bad_settings_naming_them(name, value):
    kind = VAEConfig if name in VAEConfig.__dataclass_fields__ else TrainConfig
    with pytest.raises(ValueError) as err:
        config.check(kind(**{name: value}))
    assert str(err.value).startswith(f"{name} must be"), err.value


@pytest.mark.parametrize(
    "settings", [{}, dict(fc_layers=2, res_blocks=2, norm="batch"), dict(hidden_dim=0, out_conv=0)]
)
def test_weights_are_counted_on_the_meta_device_and_limited(settings, monkeypatch):
    """(Billions of weights, counted without allocating them: tests/test_cli.py.)"""
    # by hand: two 4x4 convs 1->1 (17 each), Linear(49, 4) (200), Linear(2, 49) (147), two 4x4
    # transposed convs (17)
    smallest = VAEConfig(latent_dim=2, channels=(1, 1), hidden_dim=0, res_blocks=0, out_conv=0)
    assert smallest.parameter_count() == 415
    c = VAEConfig(**dict(latent_dim=4, channels=(4, 8), hidden_dim=16, out_conv=4) | settings)
    built = VAE(**asdict(c))
    count = c.parameter_count()
    assert count == sum(p.numel() for p in built.parameters())
    assert not any(p.is_meta for p in built.parameters())  # counting left later models real
    monkeypatch.setattr(config, "MAX_PARAMETERS", count)
    config.check(c)  # exactly at the limit: allowed
    monkeypatch.setattr(config, "MAX_PARAMETERS", count - 1)
    with pytest.raises(ValueError, match=f"{count:,} weights"):
        config.check(c)


def test_weight_average_with_batch_norm_ramps_its_decay_and_copies_counters():
    torch.manual_seed(0)
    m = VAE(latent_dim=4, channels=(4, 8), hidden_dim=0, res_blocks=0, out_conv=0, norm="batch")
    averaging = functools.partial(train.ema_with_warmup, decay=0.9)
    average = AveragedModel(m, multi_avg_fn=averaging, use_buffers=True)

    def norms(net):
        return [x for x in net.modules() if isinstance(x, torch.nn.BatchNorm2d)]

    def floats(net):
        return [*net.parameters(), *(x.running_mean for x in norms(net))]

    expected = []
    for step in range(30):
        with torch.no_grad():
            for t in floats(m):
                t.add_(1.0)  # the live weights and statistics move on; the average trails them
        for x in norms(m):
            x.num_batches_tracked += 1
        average.update_parameters(m)
        live = [t.detach().clone() for t in floats(m)]
        # copy, then 2/11, 3/12, ... up to 0.9
        decay = 0.0 if step == 0 else min(0.9, (1 + step) / (10 + step))
        expected = [decay * e + (1 - decay) * t for e, t in zip(expected if step else live, live)]
    for e, a, t in zip(expected, floats(average.module), live):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-4)
        assert (t - a).min() > 1
    counters = [x.num_batches_tracked for x in norms(average.module)]
    # integers copied, not averaged
    assert len(counters) == 3 and all(int(c) == 30 for c in counters)
