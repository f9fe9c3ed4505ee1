"""Tests for model.py (VAE, loss terms, IWAE bound, checkpoints) and utils.save_atomic."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import model
import utils
from model import VAE, VAEConfig

SMALL = dict(latent_dim=8, channels=(8, 16), hidden_dim=0, res_blocks=0, out_conv=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread is fastest and immune to spin-wait slowdowns when other jobs load the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(seed: int = 0, **kwargs) -> VAE:
    torch.manual_seed(seed)
    return VAE(**(kwargs or SMALL))


def fake_images(b: int, seed: int = 0, binary: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 28, 28, generator=gen)
    return torch.bernoulli(x, generator=gen) if binary else x


def one_line_with(excinfo, path) -> str:
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    return msg


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


def test_res_blocks_change_architecture():
    plain = make_model(**SMALL)
    deep = make_model(**dict(SMALL, res_blocks=1))
    n_plain = sum(p.numel() for p in plain.parameters())
    n_deep = sum(p.numel() for p in deep.parameters())
    c2 = SMALL["channels"][1]
    per_block = 2 * (c2 * c2 * 9 + c2)  # two 3x3 convs with bias
    assert n_deep - n_plain == 2 * per_block  # one block in the encoder, one in the decoder


def test_fc_layers_add_hidden_layers_in_encoder_and_decoder():
    one = make_model(**dict(SMALL, hidden_dim=16))
    three = make_model(**dict(SMALL, hidden_dim=16), fc_layers=3)
    extra = sum(p.numel() for p in three.parameters()) - sum(p.numel() for p in one.parameters())
    assert extra == 2 * 2 * (16 * 16 + 16)  # two more 16x16 layers with bias, in the encoder and in the decoder
    assert three(fake_images(2), generator=torch.Generator().manual_seed(0))[0].shape == (2, 1, 28, 28)
    with pytest.raises(ValueError):
        VAEConfig(fc_layers=0)


def test_out_conv_adds_a_full_resolution_layer_before_the_logits():
    plain = make_model(**SMALL)
    wide = make_model(**dict(SMALL, out_conv=4))
    c1 = SMALL["channels"][0]
    extra = (c1 * 4 * 16 + 4) + (4 * 9 + 1) - (c1 * 16 + 1)  # transposed conv c1->4 and 3x3 conv 4->1 replace transposed conv c1->1
    assert sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in plain.parameters()) == extra
    assert isinstance(wide.decoder[-1], torch.nn.Conv2d) and wide.decoder[-1].out_channels == 1
    with pytest.raises(ValueError):
        VAEConfig(out_conv=-1)


def test_batch_norm_option_adds_norm_layers_and_evaluates_per_image():
    m = make_model(**SMALL, norm="batch")
    assert sum(isinstance(layer, torch.nn.BatchNorm2d) for layer in m.modules()) == 3
    m.train()
    m(fake_images(8), generator=torch.Generator().manual_seed(0))  # updates the running statistics
    m.eval()
    x = fake_images(4, seed=3)
    alone = m.decode(m.encode(x[:1])[0])
    batched = m.decode(m.encode(x)[0])[:1]
    assert torch.allclose(alone, batched, atol=1e-5)  # eval mode uses running statistics, not the batch's
    with pytest.raises(ValueError):
        VAEConfig(norm="layer")


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
    a = VAE.reparameterize(mu, lv, torch.Generator().manual_seed(7))
    b = VAE.reparameterize(mu, lv, torch.Generator().manual_seed(7))
    c = VAE.reparameterize(mu, lv, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_reparameterize_tiny_variance_gives_mean():
    mu = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = VAE.reparameterize(mu, torch.full_like(mu, -80.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, mu, rtol=0, atol=1e-12)


def test_reparameterize_moments_and_gradient():
    n = 40000
    mu = torch.tensor([[1.5, -2.0]], requires_grad=True)
    lv = torch.tensor([[math.log(0.25), math.log(4.0)]], requires_grad=True)
    z = VAE.reparameterize(mu.expand(n, 2), lv.expand(n, 2), torch.Generator().manual_seed(3))
    sd = torch.tensor([0.5, 2.0])
    assert torch.all((z.mean(0) - mu[0]).abs() < 5 * sd / math.sqrt(n))
    assert torch.all((z.std(0) / sd - 1).abs() < 5 / math.sqrt(2 * n))
    z.sum().backward()
    assert torch.allclose(mu.grad, torch.full((1, 2), float(n)))  # dz/dmu = 1 for every sample
    assert lv.grad is not None and torch.isfinite(lv.grad).all()


# ----------------------------------------------------------------------------- IWAE


def posterior_shifted_model(seed: int = 0) -> VAE:
    """A small untrained model whose posterior is far from N(0, I), so every term of the bound matters."""
    m = make_model(seed)
    d = m.config.latent_dim
    with torch.no_grad():
        m.to_stats.bias[:d] += 1.0
        m.to_stats.bias[d:] -= 2.0
    return m.eval()


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
    with torch.no_grad():
        m.to_stats.weight.zero_()
        m.to_stats.bias.zero_()
        m.decoder[0].weight.zero_()  # first Linear(latent, ...) of the decoder
    x = fake_images(3, seed=2)
    k = 5
    lw = model.iwae_log_weights(m, x, k, generator=torch.Generator().manual_seed(0), chunk=chunk)
    logits = m.decode(torch.zeros(1, m.config.latent_dim)).double()
    s = torch.sigmoid(logits)
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


# ----------------------------------------------------------------------------- checkpoints


def make_checkpoint(path: Path, seed: int = 0, **cfg) -> VAE:
    m = make_model(seed, **(cfg or dict(SMALL, res_blocks=1, activation="silu")))
    utils.save_atomic({"format": "vae-mnist/1", "config": model.config_dict(m.config), "model": m.state_dict()}, path)
    return m


def test_checkpoint_from_before_newer_settings_loads_its_own_architecture(tmp_path):
    """A checkpoint written before --fc-layers, --norm and --out-conv existed has no such keys; it must rebuild the
    architecture it was trained with (one FC layer, no norm, no output conv), not today's defaults."""
    torch.manual_seed(0)
    old = VAE(latent_dim=8, channels=(8, 16), hidden_dim=32, fc_layers=1, norm="none", out_conv=0).eval()
    config = {k: v for k, v in model.config_dict(old.config).items() if k not in ("fc_layers", "norm", "out_conv")}
    path = tmp_path / "old.pt"
    torch.save({"format": "vae-mnist/1", "config": config, "model": old.state_dict()}, path)
    assert VAEConfig().out_conv != 0  # today's default differs, so a naive fill-in would fail to load
    loaded = VAE.from_checkpoint(path)
    assert loaded.config.out_conv == 0 and loaded.config.fc_layers == 1 and loaded.config.norm == "none"
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), old.decode(z))


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "vae.pt"
    m = make_checkpoint(path)
    m.eval()
    loaded = VAE.from_checkpoint(path)
    assert not loaded.training
    assert loaded.config == m.config
    assert isinstance(loaded.config.channels, tuple)
    z = torch.randn(5, m.config.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), m.decode(z))
        x = fake_images(2)
        assert torch.equal(loaded.encode(x)[0], m.encode(x)[0])
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_load_checkpoint_returns_dict(tmp_path):
    path = tmp_path / "vae.pt"
    m = make_checkpoint(path)
    ckpt = checkpoint.load(path)
    assert ckpt["format"] == checkpoint.FORMAT
    assert model.model_config(ckpt, path) == m.config


def expect_checkpoint_error(path, load=checkpoint.load) -> str:
    with pytest.raises(model.CheckpointError) as excinfo:
        load(path)
    return one_line_with(excinfo, path)


def test_load_checkpoint_missing(tmp_path):
    expect_checkpoint_error(tmp_path / "absent.pt")
    expect_checkpoint_error(tmp_path)  # a folder is not a checkpoint either


def test_load_checkpoint_truncated(tmp_path):
    good = tmp_path / "good.pt"
    make_checkpoint(good)
    cut = tmp_path / "cut.pt"
    blob = good.read_bytes()
    cut.write_bytes(blob[: len(blob) // 2])
    expect_checkpoint_error(cut)
    expect_checkpoint_error(cut, VAE.from_checkpoint)


def test_load_checkpoint_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\nsecond line\n")
    expect_checkpoint_error(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    expect_checkpoint_error(empty)


def test_load_checkpoint_no_format(tmp_path):
    path = tmp_path / "x.pt"
    m = make_model()
    torch.save({"config": model.config_dict(m.config), "model": m.state_dict()}, path)
    expect_checkpoint_error(path)
    bare = tmp_path / "bare.pt"
    torch.save(m.state_dict()["to_stats.bias"], bare)  # a tensor, not a dict
    expect_checkpoint_error(bare)


@pytest.mark.parametrize("fmt", ["other/1", "vae-mnist", "vae-mnist/x", 1])
def test_load_checkpoint_foreign_format(tmp_path, fmt):
    path = tmp_path / "x.pt"
    m = make_model()
    torch.save({"format": fmt, "config": model.config_dict(m.config), "model": m.state_dict()}, path)
    expect_checkpoint_error(path)


def test_load_checkpoint_newer_format(tmp_path):
    path = tmp_path / "x.pt"
    m = make_model()
    torch.save({"format": "vae-mnist/2", "config": model.config_dict(m.config), "model": m.state_dict()}, path)
    msg = expect_checkpoint_error(path)
    assert "newer" in msg


@pytest.mark.parametrize("missing", ["config", "model"])
def test_load_checkpoint_missing_key(tmp_path, missing):
    path = tmp_path / "x.pt"
    m = make_model()
    ckpt = {"format": "vae-mnist/1", "config": model.config_dict(m.config), "model": m.state_dict()}
    del ckpt[missing]
    torch.save(ckpt, path)
    msg = expect_checkpoint_error(path)
    assert missing in msg


@pytest.mark.parametrize(
    "bad",
    [{"activation": "tanh"}, {"channels": [8]}, {"latent_dim": 0}, {"hidden_dim": -1}],
    ids=["activation", "channels", "latent", "hidden"],
)
def test_from_checkpoint_bad_config(tmp_path, bad):
    path = tmp_path / "x.pt"
    m = make_model()
    config = dict(model.config_dict(m.config), **bad)
    torch.save({"format": "vae-mnist/1", "config": config, "model": m.state_dict()}, path)
    checkpoint.load(path)  # the file itself is fine
    expect_checkpoint_error(path, VAE.from_checkpoint)


def test_from_checkpoint_weights_do_not_match_config(tmp_path):
    path = tmp_path / "x.pt"
    m = make_model()
    other = make_model(latent_dim=4, channels=(8, 16), hidden_dim=0)
    torch.save({"format": "vae-mnist/1", "config": model.config_dict(m.config), "model": other.state_dict()}, path)
    expect_checkpoint_error(path, VAE.from_checkpoint)


class MakesMarker:
    """Unpickling this object opens (creates) `marker`: stands in for arbitrary code in a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_checkpoint(path: Path, marker: Path) -> None:
    payload = {"format": "vae-mnist/1", "config": model.config_dict(VAEConfig(**SMALL)), "model": {}, "extra": MakesMarker(marker)}
    torch.save(payload, path)


UNPICKLE_PLAINLY = """
import pickle, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith("data.pkl"))
    obj = pickle.loads(z.read(name))
obj["extra"].close()
"""


def test_pickle_payload_is_real(tmp_path):
    """Control: unpickling the crafted file without weights_only really runs the payload."""
    folder = tmp_path / "control"
    folder.mkdir()
    path, marker = folder / "evil.pt", folder / "marker"
    hostile_checkpoint(path, marker)
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", UNPICKLE_PLAINLY, str(path)], check=True, timeout=60)
    assert marker.exists()


def test_pickle_payload_refused(tmp_path):
    folder = tmp_path / "victim"
    folder.mkdir()
    path, marker = folder / "evil.pt", folder / "marker"
    hostile_checkpoint(path, marker)
    msg = expect_checkpoint_error(path)
    assert not marker.exists()
    assert "refused" in msg
    expect_checkpoint_error(path, VAE.from_checkpoint)
    assert not marker.exists()


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
