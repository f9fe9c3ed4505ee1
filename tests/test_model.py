"""The core against oracles (hand-derived KL and BCE, independent computations), the network's door,
the settings (their checks, their help read from the fields), and the weight average."""

import functools
import inspect
import math
from dataclasses import asdict, field, fields, make_dataclass

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


def manual_bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-sum(x log p + (1-x) log(1-p)) per image, in float64."""
    p, x = torch.sigmoid(logits.double()), x.double()
    return -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)


def test_kl_and_bce_equal_hand_derived_values_and_mean_neg_elbo_the_per_batch_sum_by_hand():
    """KL and the Bernoulli NLL by hand; mean_neg_elbo: their batch sums with its seed's noise."""
    mu = torch.tensor([[0.0, 1.0, 0.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, 0.0, math.log(2.0), -1.0]], dtype=torch.float64)
    # KL(N(m, v) || N(0, 1)) = (m^2 + v - 1 - log v) / 2, worked out for each pair
    expected = [0.0, 0.5, (1 - math.log(2.0)) / 2, (4 + math.exp(-1) - 1 + 1) / 2]
    assert model.kl_per_dim(mu, logvar)[0].tolist() == pytest.approx(expected, abs=1e-12)
    assert torch.equal(model.kl_per_dim(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3, 5))
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(4, 1, 28, 28, generator=gen, dtype=torch.float64)
    x = (1.6 * torch.rand(4, 1, 28, 28, generator=gen, dtype=torch.float64) - 0.3).clamp(0, 1)
    mu, logvar = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)  # x: 0, 1 and between
    bce, kl = model.neg_elbo_terms(logits, x, mu, logvar)
    torch.testing.assert_close(bce, manual_bce(logits, x), rtol=1e-10, atol=0)
    torch.testing.assert_close(kl, model.kl_per_dim(mu, logvar).sum(1), rtol=1e-12, atol=0)
    m, x = tiny_model(), tiny_images(7, seed=5)
    got = model.mean_neg_elbo(m, x, seed=4, batch_size=3)
    gen, bce_sum, kl_sum = torch.Generator().manual_seed(4), 0.0, 0.0
    with torch.no_grad():
        for xb in (x[0:3], x[3:6], x[6:7]):  # batches of 3, 3 and 1, each drawing its noise in turn
            mu, logvar = m.encode(xb)
            z = mu + torch.randn(len(xb), 8, generator=gen) * torch.exp(logvar / 2)
            bce_sum += manual_bce(m.decode(z), xb).sum().item()
            kl_sum += (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum().item()
    assert [got["bce"], got["kl"]] == pytest.approx([bce_sum / 7, kl_sum / 7], rel=1e-5)
    assert got["loss"] == pytest.approx(got["bce"] + got["kl"], rel=1e-12)
    assert model.mean_neg_elbo(m, x, 4, 3) == got
    assert model.mean_neg_elbo(m, x, 5, 3)["bce"] != got["bce"]


def test_reparameterize_is_mu_plus_sigma_eps_passes_gradients_and_forward_uses_it():
    gen = torch.Generator().manual_seed(0)
    mu, logvar, eps = torch.randn(3, 3, 4, generator=gen, dtype=torch.float64)
    mu, logvar = mu.requires_grad_(), logvar.requires_grad_()
    z = model.reparameterize(mu, logvar, eps=eps)
    torch.testing.assert_close(z, mu + torch.exp(logvar / 2) * eps, rtol=0, atol=1e-12)
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones_like(mu))  # dz/dmu = 1, dz/dlogvar = eps sigma / 2
    torch.testing.assert_close(logvar.grad, 0.5 * eps * torch.exp(logvar.detach() / 2))
    m, x, eps = tiny_model(), tiny_images(3), eps[:, :2].repeat(1, 4).float()
    with torch.no_grad():  # forward decodes the noise it is given
        mu, logvar = m.encode(x)
        logits = m(x, eps=eps)[0]
        expected = m.decode(mu + eps * torch.exp(logvar / 2))
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(logits, m(x, eps=-eps)[0])


def test_iwae_at_k1_equals_the_single_sample_neg_elbo_and_does_not_depend_on_chunk():
    """(It tightens with k on a trained model: tests/test_evaluate.py.)"""
    m, x = tiny_model(), tiny_images(5, seed=3)
    with torch.no_grad():  # an untrained posterior far from N(0, I): mu + 1, logvar - 2
        m.to_stats.bias += torch.tensor([1.0] * 8 + [-2.0] * 8)
    log_weights = model.iwae_log_weights(m, x, 1, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(7))[0]  # the bound's draw
    with torch.no_grad():
        mu, logvar = m.encode(x)
        z = mu + eps * torch.exp(logvar / 2)
        prior, posterior = Normal(0.0, 1.0), Normal(mu.double(), torch.exp(logvar.double() / 2))
        # -(log p(x|z) + log p(z) - log q(z|x)), each density from torch.distributions
        log_ratio = (posterior.log_prob(z.double()) - prior.log_prob(z.double())).sum(1)
        expected = manual_bce(m.decode(z), x) + log_ratio
    assert log_ratio.abs().min() > 1  # the prior and posterior terms are large enough to matter
    torch.testing.assert_close(model.iwae_nll(log_weights).double(), expected, rtol=1e-5, atol=1e-3)
    x = tiny_images(48, seed=4)

    def bound(k, chunk=None, seed=11):
        gen = torch.Generator().manual_seed(seed)
        return model.iwae_nll(model.iwae_log_weights(m, x, k, generator=gen, chunk=chunk))

    reference = bound(9, chunk=10_000)
    for chunk in (1, 7, 100):  # passes of 1, 1 and 2 samples per image
        torch.testing.assert_close(bound(9, chunk=chunk), reference, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(bound(9, seed=12), reference)


IMAGES = tiny_images(2)
REFUSED = {  # images the door refuses, and what its ValueError must say it got
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
DOORS = {"encode": VAE.encode, "forward": VAE.__call__, "reconstruct": VAE.reconstruct}  # (m, x)
DOORS["mean_neg_elbo"] = functools.partial(model.mean_neg_elbo, seed=0)
DOORS["iwae"] = functools.partial(model.iwae_log_weights, k=2)
DOORS["score"] = functools.partial(anomaly.score, method="elbo")  # the other methods: the same door


@pytest.mark.parametrize("door", list(DOORS))
@pytest.mark.parametrize("case", list(REFUSED))
def test_each_door_refuses_bad_images_naming_what_it_got(door, case):
    x, words = REFUSED[case]
    with pytest.raises(ValueError, match=r"^images must") as err:
        DOORS[door](tiny_model(), x)
    assert words in str(err.value), err.value


def test_empty_batches_give_empty_results_decode_checks_z_and_training_skips_only_values():
    """check_values=False (the training step's call) lets NaN through, not a wrong dtype."""
    m, empty = tiny_model(), torch.zeros(0, 1, 28, 28)
    assert [t.shape for t in m.encode(empty)] == [(0, 8), (0, 8)]
    assert m(empty)[0].shape == m.reconstruct(empty).shape == m.sample(0).shape == (0, 1, 28, 28)
    assert model.iwae_log_weights(m, empty, k=3).shape == (0, 3)
    assert m.decode(torch.zeros(5, 8)).shape == (5, 1, 28, 28)
    bad_z = [torch.zeros(8), torch.zeros(5, 3), torch.zeros(5, 8, dtype=torch.float64), [0.0] * 8]
    got = ["(8,) torch.float32", "(5, 3) torch.float32", "(5, 8) torch.float64", "list"]
    for z, words in zip(bad_z, got):
        with pytest.raises(ValueError, match=r"z must be a float32 tensor \(B, 8\), got") as err:
            m.decode(z)
        assert f"got {words}" in str(err.value)
    with pytest.raises(ValueError, match="n must be a whole number, 0 or more, got -1"):
        m.sample(-1)
    assert m(REFUSED["NaN"][0], check_values=False)[0].isnan().any()
    with pytest.raises(ValueError, match="got torch.float64"):
        m(REFUSED["NaN"][0].double(), check_values=False)


def test_the_settings_are_vaes_arguments_and_their_help_is_read_from_the_fields(monkeypatch):
    """Help: each field's own, with the constants it cites; a setting added without help builds."""
    arguments = inspect.signature(VAE).parameters
    assert [f.name for f in fields(VAEConfig)] == list(arguments)
    assert asdict(VAEConfig()) == {name: p.default for name, p in arguments.items()}
    config.check(VAEConfig())
    config.check(TrainConfig())
    stored = checkpoint.config_dict(TrainConfig(), VAEConfig(channels=(4, 12)))  # as stored
    assert VAEConfig(**{f.name: stored[f.name] for f in fields(VAEConfig)}).channels == (4, 12)
    monkeypatch.setattr(anomaly, "KNN_K", 7)
    monkeypatch.setattr(anomaly, "LOCAL_WEIGHT", 2.5)
    parsers = main.build_parsers()
    shown = "".join(parsers["train"].format_help().split())
    for f in fields(TrainConfig) + fields(VAEConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"
        assert "range" in f.metadata or "choices" in f.metadata or f.default is False, f.name
        assert "".join(f.metadata["help"].split()) in shown, f.name
    method = " ".join(parsers["score"].format_help().split())
    assert "minus 2.5 times" in method and "to the 7 nearest" in method
    for command, unused in (("sample", []), ("demo", ["--image-dir"])):  # only the flags it uses
        shown = parsers[command].format_help()
        assert "--checkpoint" in shown, shown
        assert not [f for f in unused + ["--data-dir", "--progress"] if f in shown], shown
    new = field(default=1, metadata={"range": (0, 2), "none": "", "metavar": None})  # no help
    later = make_dataclass("Later", [("new", int, new)])  # a setting added without help: it builds
    main.add_settings(main.Parser().add_argument_group("x"), later)


# setting -> values its check must refuse
BAD_SETTINGS = dict(latent_dim=[0, 32.0, True, "8"], channels=[(8, 16, 32), (8, 16.0), 8])
BAD_SETTINGS |= dict(activation=["x"], norm=["layer"], binarize=[1], lr=[math.nan, 0.0], ema=[1.0])
BAD_SETTINGS["exclude_digit"] = [10]


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in BAD_SETTINGS.items() for v in vs])
def test_check_refuses_bad_settings_naming_them(name, value):
    kind = VAEConfig if name in VAEConfig.__dataclass_fields__ else TrainConfig
    with pytest.raises(ValueError) as err:
        config.check(kind(**{name: value}))
    assert str(err.value).startswith(f"{name} must be"), err.value


def test_weights_are_counted_on_the_meta_device_and_limited(monkeypatch):
    """By hand below; billions of weights, counted without allocating them: tests/test_cli.py."""
    # two 4x4 convs 1->1 and two transposed (17 each), Linear(49, 4) (200), Linear(2, 49) (147)
    smallest = VAEConfig(latent_dim=2, channels=(1, 1), hidden_dim=0, res_blocks=0, out_conv=0)
    assert smallest.parameter_count() == 415
    for more in ({}, dict(fc_layers=2, res_blocks=2, norm="batch"), dict(hidden_dim=0, out_conv=0)):
        c = VAEConfig(**dict(latent_dim=4, channels=(4, 8), hidden_dim=16, out_conv=4) | more)
        built, count = VAE(**asdict(c)), c.parameter_count()
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
    nets = (m, average.module)  # the live network and the average
    norms = [[x for x in net.modules() if isinstance(x, torch.nn.BatchNorm2d)] for net in nets]
    floats = [[*net.parameters(), *(x.running_mean for x in n)] for net, n in zip(nets, norms)]
    expected = []
    for step in range(30):
        with torch.no_grad():  # weights, statistics and counters move on; the average trails them
            for t in [*floats[0], *(x.num_batches_tracked for x in norms[0])]:
                t.add_(1)
        average.update_parameters(m)
        live = [t.detach().clone() for t in floats[0]]
        decay = 0.0 if step == 0 else min(0.9, (1 + step) / (10 + step))  # copy, 2/11, .. 0.9
        expected = [decay * e + (1 - decay) * t for e, t in zip(expected if step else live, live)]
    for e, a, t in zip(expected, floats[1], live):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-4)
        assert (t - a).min() > 1
    counters = [x.num_batches_tracked for x in norms[1]]  # copied, not averaged
    assert len(counters) == 3 and all(int(c) == 30 for c in counters)
