"""Tests for model.py (VAEConfig, VAE, reparameterize, loss terms, IWAE bound) and utils.save_atomic.

Checkpoints (reading, checking, rebuilding a model from one) are tested in test_checkpoint.py."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import model
import utils
from helpers import SMALL
from model import VAE, VAEConfig



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: these tensors are tiny


def make_model(seed: int = 0, **kwargs) -> VAE:
    torch.manual_seed(seed)
    return VAE(**(kwargs or SMALL))


def fake_images(b: int, seed: int = 0, binary: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 28, 28, generator=gen)
    return torch.bernoulli(x, generator=gen) if binary else x


# ----------------------------------------------------------------------------- shapes


CONFIGS = {
    "default": {},
    "small_no_hidden": SMALL,
    "res_block": dict(latent_dim=6, channels=(8, 16), hidden_dim=32, res_blocks=1, activation="silu"),
    "out_conv_batch_norm": dict(SMALL, out_conv=4, norm="batch"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vae_shapes(name):
    torch.manual_seed(0)
    m = VAE(**CONFIGS[name])
    latent = m.config.latent_dim
    assert latent == CONFIGS[name].get("latent_dim", 32)
    b = 3
    x = fake_images(b, binary=False)
    logits, mu, logvar = m(x, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (b, 1, 28, 28)
    assert mu.shape == (b, latent) and logvar.shape == (b, latent)
    mu2, logvar2 = m.encode(x)
    assert torch.equal(mu, mu2) and torch.equal(logvar, logvar2)
    assert m.decode(torch.zeros(5, latent)).shape == (5, 1, 28, 28)

    s = m.sample(4, generator=torch.Generator().manual_seed(1))
    assert s.shape == (4, 1, 28, 28)
    assert float(s.min()) >= 0 and float(s.max()) <= 1
    s2 = m.sample(4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s, s2)

    r = m.reconstruct(x)
    assert r.shape == (b, 1, 28, 28)
    assert float(r.min()) >= 0 and float(r.max()) <= 1
    # reconstruction goes through the posterior mean
    assert torch.allclose(r, torch.sigmoid(m.decode(mu2)), atol=1e-6)


def count_weights(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def count_modules(m: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(layer, kind) for layer in m.modules())


def logits_of(m: VAE, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return m(fake_images(2, seed=seed), eps=torch.zeros(2, m.config.latent_dim))[0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_the_built_model(name):
    config = VAEConfig(**CONFIGS[name])
    assert config.parameter_count() == count_weights(VAE(config)) > 0
    assert not any(p.is_meta for p in VAE(config).parameters())  # counting on the meta device leaves later models real


def test_res_blocks_deepen_the_model():
    counts = [VAEConfig(**dict(SMALL, res_blocks=n)).parameter_count() for n in (0, 1, 2)]
    assert counts[0] < counts[1] < counts[2]
    assert counts[2] - counts[1] == counts[1] - counts[0]  # every block costs the same
    plain, deep = make_model(**SMALL), make_model(**dict(SMALL, res_blocks=2))
    assert count_modules(plain, model.ResBlock) == 0 and count_modules(deep, model.ResBlock) == 4  # encoder and decoder
    assert not torch.allclose(logits_of(plain), logits_of(deep))
    assert logits_of(deep).shape == (2, 1, 28, 28)


def test_res_block_is_residual():
    """x + f(x): with its convolutions zeroed a block passes its input through unchanged, and gradients reach x."""
    block = model.ResBlock(4, torch.nn.SiLU)
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert not torch.allclose(block(x), x)
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
    y = block(x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fc_layers_add_hidden_layers_in_encoder_and_decoder():
    counts = [VAEConfig(**dict(SMALL, hidden_dim=16), fc_layers=n).parameter_count() for n in (1, 2, 3)]
    assert counts[0] < counts[1] < counts[2] and counts[2] - counts[1] == counts[1] - counts[0]
    one, three = make_model(**dict(SMALL, hidden_dim=16)), make_model(**dict(SMALL, hidden_dim=16), fc_layers=3)
    # every extra layer appears twice: once in the encoder, once in the decoder
    assert count_modules(three, torch.nn.Linear) - count_modules(one, torch.nn.Linear) == 2 * 2
    assert not torch.allclose(logits_of(one), logits_of(three))
    assert logits_of(three).shape == (2, 1, 28, 28)
    # without a hidden width there are no hidden layers to repeat
    assert VAEConfig(**SMALL, fc_layers=3).parameter_count() == VAEConfig(**SMALL, fc_layers=1).parameter_count()
    with pytest.raises(ValueError):
        VAEConfig(fc_layers=0)


def full_resolution_widths(m: VAE) -> list[int]:
    """The channel counts of every 28x28 output of a decoder layer, in the order the layers run."""
    widths = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]) if out.shape[-2:] == (28, 28) else None)
             for layer in m.decoder.modules() if not list(layer.children())]
    try:
        with torch.no_grad():
            m.decode(torch.zeros(2, m.config.latent_dim))
    finally:
        for hook in hooks:
            hook.remove()
    return widths


def test_out_conv_adds_a_full_resolution_layer_before_the_logits():
    plain, wide = make_model(**SMALL), make_model(**dict(SMALL, out_conv=4))
    # without it the upsampling layer makes the 1-channel logits; with it, a 4-wide 28x28 feature map comes first
    assert set(full_resolution_widths(plain)) == {1}
    widths = full_resolution_widths(wide)
    assert 4 in widths and widths[-1] == 1
    assert VAEConfig(**dict(SMALL, out_conv=4)).parameter_count() > VAEConfig(**SMALL).parameter_count()
    assert VAEConfig(**dict(SMALL, out_conv=8)).parameter_count() > VAEConfig(**dict(SMALL, out_conv=4)).parameter_count()
    assert not torch.allclose(logits_of(plain), logits_of(wide))
    assert logits_of(wide).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError):
        VAEConfig(out_conv=-1)


def test_batch_norm_option_adds_norm_layers_and_evaluates_per_image():
    assert count_modules(make_model(**SMALL), torch.nn.BatchNorm2d) == 0
    m = make_model(**SMALL, norm="batch")
    assert count_modules(m, torch.nn.BatchNorm2d) == 3  # after each hidden convolution: two in the encoder, one in the decoder
    assert count_modules(make_model(**dict(SMALL, out_conv=4), norm="batch"), torch.nn.BatchNorm2d) == 4
    x = fake_images(4, seed=3)
    m.train()
    with torch.no_grad():  # in training mode an image's code depends on the rest of its batch
        assert not torch.allclose(m.encode(x[:2])[0], m.encode(x)[0][:2], atol=1e-5)
    m(fake_images(8), generator=torch.Generator().manual_seed(0))  # updates the running statistics
    m.eval()
    alone = m.decode(m.encode(x[:1])[0])
    batched = m.decode(m.encode(x)[0])[:1]
    assert torch.allclose(alone, batched, atol=1e-5)  # eval mode uses running statistics, not the batch's
    with pytest.raises(ValueError):
        VAEConfig(norm="layer")


@pytest.mark.parametrize(
    "bad",
    [
        dict(latent_dim=32.0), dict(latent_dim=True), dict(latent_dim=0), dict(latent_dim=1025), dict(latent_dim="8"),
        dict(channels=(8,)), dict(channels=(8, 16, 32)), dict(channels=8), dict(channels=(8, 16.0)), dict(channels=(0, 16)),
        dict(hidden_dim=-1), dict(hidden_dim=16385), dict(fc_layers=17), dict(res_blocks=-1), dict(res_blocks=17),
        dict(out_conv=1025), dict(out_conv=False), dict(activation="tanh"), dict(norm="layer"),
    ],
    ids=lambda d: "-".join(f"{k}={v!r}" for k, v in d.items()),
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError) as excinfo:
        VAEConfig(**bad)
    assert next(iter(bad)) in str(excinfo.value)


def test_config_accepts_the_limits_and_keeps_channels_a_tuple():
    for name, low, high in model.LIMITS:
        for value in (low, high):
            config = VAEConfig(**{name: (value, value) if name == "channels" else value})
            assert getattr(config, name) == ((value, value) if name == "channels" else value)
    config = VAEConfig(channels=[8, 16])
    assert config.channels == (8, 16) and isinstance(config.channels, tuple)
    assert VAEConfig(channels=[8, 16]) == VAEConfig(channels=(8, 16))


def test_gradients_reach_every_parameter():
    m = make_model(**dict(SMALL, hidden_dim=16, res_blocks=1, out_conv=4), fc_layers=2)
    x = fake_images(4)
    logits, mu, logvar = m(x, generator=torch.Generator().manual_seed(0))
    bce, kl = model.neg_elbo_terms(logits, x, mu, logvar)
    (bce + kl).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------- input check


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(2, 28, 28),
        torch.zeros(2, 3, 28, 28),
        torch.zeros(2, 1, 32, 32),
        torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
        torch.zeros(2, 1, 28, 28, dtype=torch.int64),
    ],
    ids=["no_channel", "rgb", "32x32", "uint8", "int64"],
)
@pytest.mark.parametrize("method", ["forward", "encode", "reconstruct"])
def test_input_shape_check(x, method):
    m = make_model()
    with pytest.raises(ValueError) as excinfo:
        getattr(m, method)(x)
    msg = str(excinfo.value)
    assert "(B, 1, 28, 28)" in msg
    assert str(tuple(x.shape)) in msg


# ----------------------------------------------------------------------------- loss terms


def test_kl_zero_for_standard_normal_posterior():
    mu = torch.zeros(5, 7)
    logvar = torch.zeros(5, 7)
    logits = torch.zeros(5, 1, 28, 28)
    _, kl = model.neg_elbo_terms(logits, torch.zeros_like(logits), mu, logvar)
    assert kl.shape == (5,)
    assert torch.equal(kl, torch.zeros(5))


def test_kl_matches_hand_formula():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 2
    lv = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 1.5
    logits = torch.zeros(6, 1, 28, 28, dtype=torch.float64)
    _, kl = model.neg_elbo_terms(logits, torch.zeros_like(logits), mu, lv)
    m, v = mu.numpy(), lv.numpy()
    expected = np.array([0.5 * sum(m[i, j] ** 2 + math.exp(v[i, j]) - 1 - v[i, j] for j in range(9)) for i in range(6)])
    assert kl.shape == (6,)
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-12)
    assert (kl > 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bce_matches_hand_formula(dtype):
    gen = torch.Generator().manual_seed(1)
    b = 4
    logits = torch.randn(b, 1, 28, 28, generator=gen, dtype=torch.float64) * 3
    x = torch.rand(b, 1, 28, 28, generator=gen, dtype=torch.float64)
    x[0] = torch.bernoulli(x[0], generator=gen)  # binary targets as well as soft ones
    bce, kl = model.neg_elbo_terms(logits.to(dtype), x.to(dtype), torch.zeros(b, 3, dtype=dtype), torch.zeros(b, 3, dtype=dtype))
    assert bce.shape == (b,) and kl.shape == (b,)
    l, t = logits.numpy(), x.numpy()
    s = 1.0 / (1.0 + np.exp(-l))
    expected = -(t * np.log(s) + (1 - t) * np.log(1 - s)).reshape(b, -1).sum(1)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(bce.double().numpy(), expected, rtol=rtol)


def test_bce_stable_for_large_logits():
    logits = torch.full((1, 1, 28, 28), 200.0)
    bce, _ = model.neg_elbo_terms(logits, torch.ones_like(logits), torch.zeros(1, 2), torch.zeros(1, 2))
    assert torch.isfinite(bce).all() and float(bce) < 1e-6
    bce, _ = model.neg_elbo_terms(logits, torch.zeros_like(logits), torch.zeros(1, 2), torch.zeros(1, 2))
    assert float(bce) == pytest.approx(784 * 200.0, rel=1e-6)


# ----------------------------------------------------------------------------- reparameterize


def test_reparameterize_reproducible():
    mu = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    lv = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    a = model.reparameterize(mu, lv, generator=torch.Generator().manual_seed(7))
    b = model.reparameterize(mu, lv, generator=torch.Generator().manual_seed(7))
    c = model.reparameterize(mu, lv, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_reparameterize_with_given_noise():
    gen = torch.Generator().manual_seed(0)
    mu, lv = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randn(4, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(model.reparameterize(mu, lv, eps), mu + eps * torch.exp(0.5 * lv), rtol=0, atol=1e-12)
    # the same noise as drawing it from the generator
    drawn = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(model.reparameterize(mu, lv, generator=torch.Generator().manual_seed(3)),
                               model.reparameterize(mu, lv, drawn), rtol=0, atol=1e-12)
    # extra leading sample dimensions broadcast: (3, 4, 5) noise gives three samples of every image
    many = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    z = model.reparameterize(mu, lv, many)
    assert z.shape == (3, 4, 5)
    torch.testing.assert_close(z[1], model.reparameterize(mu, lv, many[1]), rtol=0, atol=1e-12)


def test_forward_uses_the_given_noise():
    m = make_model().eval()
    x = fake_images(3, seed=1)
    with torch.no_grad():
        mu, logvar = m.encode(x)
        logits, mu2, _ = m(x, eps=torch.zeros(3, m.config.latent_dim))
        assert torch.equal(mu, mu2)
        torch.testing.assert_close(logits, m.decode(mu), rtol=0, atol=1e-6)  # zero noise decodes the posterior mean
        eps = torch.randn(3, m.config.latent_dim, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(m(x, eps=eps)[0], m.decode(mu + eps * torch.exp(0.5 * logvar)), rtol=0, atol=1e-6)
        a = m(x, generator=torch.Generator().manual_seed(5))[0]
        assert torch.equal(a, m(x, generator=torch.Generator().manual_seed(5))[0])
        assert not torch.allclose(a, m(x, generator=torch.Generator().manual_seed(6))[0])


def test_reparameterize_tiny_variance_gives_mean():
    mu = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = model.reparameterize(mu, torch.full_like(mu, -80.0), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, mu, rtol=0, atol=1e-12)


def test_reparameterize_moments_and_gradient():
    n = 40000
    mu = torch.tensor([[1.5, -2.0]], requires_grad=True)
    lv = torch.tensor([[math.log(0.25), math.log(4.0)]], requires_grad=True)
    z = model.reparameterize(mu.expand(n, 2), lv.expand(n, 2), generator=torch.Generator().manual_seed(3))
    sd = torch.tensor([0.5, 2.0])
    assert torch.all((z.mean(0) - mu[0]).abs() < 5 * sd / math.sqrt(n))
    assert torch.all((z.std(0) / sd - 1).abs() < 5 / math.sqrt(2 * n))
    z.sum().backward()
    assert torch.allclose(mu.grad, torch.full((1, 2), float(n)))  # dz/dmu = 1 for every sample
    assert lv.grad is not None and torch.isfinite(lv.grad).all()


# ----------------------------------------------------------------------------- IWAE


def posterior_shifted_model(seed: int = 0) -> VAE:
    """A small untrained model whose posterior is far from N(0, I), so every term of the bound matters."""
    m = make_model(seed).eval()
    encode = m.encode

    def shifted(x):
        mu, logvar = encode(x)
        return mu + 1.0, logvar - 2.0

    m.encode = shifted  # an instance attribute: forward and iwae_log_weights call it
    return m


def test_iwae_log_weights_shape():
    m = make_model()
    x = fake_images(3)
    for k, chunk in [(1, 8192), (5, 8192), (5, 7), (11, 1)]:
        lw = model.iwae_log_weights(m, x, k, generator=torch.Generator().manual_seed(0), chunk=chunk)
        assert lw.shape == (3, k)
        assert torch.isfinite(lw).all()


@pytest.mark.parametrize("chunk", [1, 7, 8192])
def test_iwae_log_weights_exact_when_posterior_is_prior_and_decoder_ignores_z(chunk):
    """With q(z|x) = N(0, I) and a decoder that ignores z, log p(z) - log q(z|x) = 0 and every log-weight is -BCE."""
    m = make_model()
    d = m.config.latent_dim
    fixed = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    m.encode = lambda x: (torch.zeros(len(x), d), torch.zeros(len(x), d))  # q(z|x) = N(0, I)
    m.decode = lambda z: fixed.expand(len(z), 1, 28, 28)  # p(x|z) the same for every z
    x = fake_images(3, seed=2)
    k = 5
    lw = model.iwae_log_weights(m, x, k, generator=torch.Generator().manual_seed(0), chunk=chunk)
    s = torch.sigmoid(fixed.double())
    t = x.double()
    expected = (t * torch.log(s) + (1 - t) * torch.log(1 - s)).flatten(1).sum(1)  # log p(x|z), same for every z
    torch.testing.assert_close(lw.double(), expected[:, None].expand(3, k), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(model.iwae_nll(lw).double(), -expected, rtol=1e-5, atol=1e-3)


def test_iwae_k1_matches_elbo_in_expectation():
    m = posterior_shifted_model()
    x = fake_images(6, seed=3)
    reps = 400
    gen = torch.Generator().manual_seed(0)
    iw = torch.stack([-model.iwae_nll(model.iwae_log_weights(m, x, 1, generator=gen)) for _ in range(reps)])  # (reps, B)
    with torch.no_grad():
        el = []
        for _ in range(reps):
            logits, mu, logvar = m(x, generator=gen)
            bce, kl = model.neg_elbo_terms(logits, x, mu, logvar)
            el.append(-(bce + kl))
        el = torch.stack(el)
    iw_mean, el_mean = iw.double().mean(), el.double().mean()
    se = math.sqrt(iw.double().mean(1).var() / reps + el.double().mean(1).var() / reps)
    # sanity: the KL term is large here, so a missing log p(z) or log q(z|x) term would be many standard errors off
    assert float(kl.mean()) > 5
    assert abs(float(iw_mean - el_mean)) < 5 * se + 0.05, (float(iw_mean), float(el_mean), se)


def test_iwae_k50_bound_is_tighter_than_elbo():
    m = posterior_shifted_model(seed=1)
    x = fake_images(64, seed=4)
    gen = torch.Generator().manual_seed(0)
    iwae = model.iwae_nll(model.iwae_log_weights(m, x, 50, generator=gen)).double().mean()
    with torch.no_grad():
        neg_elbo = []
        for _ in range(20):
            logits, mu, logvar = m(x, generator=gen)
            bce, kl = model.neg_elbo_terms(logits, x, mu, logvar)
            neg_elbo.append(bce + kl)
        neg_elbo = torch.stack(neg_elbo).double().mean()
    assert torch.isfinite(iwae)
    assert float(iwae) <= float(neg_elbo) + 0.5, (float(iwae), float(neg_elbo))


def test_iwae_same_seed_same_result_however_chunked():
    m = posterior_shifted_model()
    x = fake_images(3, seed=5)  # 3 images: passes of 1 to 4 samples draw blocks that torch's normal sampler fills differently
    k = 9
    a = model.iwae_log_weights(m, x, k, generator=torch.Generator().manual_seed(11), chunk=3 * k)
    b = model.iwae_log_weights(m, x, k, generator=torch.Generator().manual_seed(11))
    c = model.iwae_log_weights(m, x, k, generator=torch.Generator().manual_seed(11), chunk=10 * 3 * k)
    assert torch.equal(a, b) and torch.equal(a, c)
    d = model.iwae_log_weights(m, x, k, generator=torch.Generator().manual_seed(12))
    assert not torch.allclose(a, d)
    # the noise is drawn before the decoding is split into passes: any chunk size gives the same samples
    # (equal up to the rounding of differently shaped matrix products)
    for chunk in (1, 4, 7, 13):
        e = model.iwae_log_weights(m, x, k, generator=torch.Generator().manual_seed(11), chunk=chunk)
        torch.testing.assert_close(e, a, rtol=1e-5, atol=1e-4)


def test_iwae_nll_hand_computed():
    lw = torch.tensor([[-1.0, -2.0, -3.0], [-1000.0, -1001.0, -1000.5], [5.0, 5.0, 5.0]], dtype=torch.float64)
    k = 3
    expected = []
    for row in lw.tolist():
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        expected.append(-(lse - math.log(k)))
    out = model.iwae_nll(lw)
    assert out.shape == (3,)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-13)
    assert out[2].item() == pytest.approx(-5.0, abs=1e-12)
    # k = 1 is just the negative log-weight
    assert torch.allclose(model.iwae_nll(lw[:, :1]), -lw[:, 0])


# ----------------------------------------------------------------------------- save_atomic


def write_some(f, blob: bytes) -> None:
    """Write like torch.save does: to a file object or to a path (save_atomic may pass either)."""
    if hasattr(f, "write"):
        f.write(blob)
        f.flush()
    else:
        with open(f, "wb") as fh:
            fh.write(blob)


def test_save_atomic_writes_loadable_file_and_no_temp(tmp_path):
    path = tmp_path / "ckpt.pt"
    obj = {"a": torch.arange(5), "b": [1, 2.5, "x"]}
    utils.save_atomic(obj, path)
    utils.save_atomic({"a": torch.arange(3)}, path)  # overwrite
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["a"], torch.arange(3)) and set(loaded) == {"a"}


def fail_midway(exc):
    """A stand-in for Path.write_bytes that writes half the bytes to the temporary file, then fails like a full disk would."""
    def write_bytes(self, blob):
        with open(self, "wb") as fh:
            fh.write(bytes(blob)[: len(blob) // 2])
        raise exc
    return write_bytes


def test_save_atomic_failure_keeps_old_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    utils.save_atomic({"a": torch.arange(4)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(utils.Path, "write_bytes", fail_midway(OSError(28, "No space left on device")))
    with pytest.raises(utils.UserError, match="No space left on device.*previous ckpt.pt is untouched"):
        utils.save_atomic({"a": torch.arange(100)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(4))


def test_save_atomic_interrupted_without_old_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.Path, "write_bytes", fail_midway(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        utils.save_atomic({"a": 1}, tmp_path / "new.pt")
    assert os.listdir(tmp_path) == []
