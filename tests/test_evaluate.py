"""`evaluate` and `sample`: honest metrics and legible pictures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import evaluate
from helpers import MNIST_DIR, copy_run, needs_mnist, resave, run_main
from model import VAE, VAEConfig, iwae_log_weights, iwae_nll

PICTURES = ("reconstructed_image.png", "samples.png", "loss_curves.png", "interpolation.png", "latent_space.png", "latent_traversal.png")


def assert_real_picture(path) -> None:
    """A valid PNG of plausible size that is not one flat colour."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= 200 and img.height >= 100
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, f"{path} looks blank"


@needs_mnist
def test_evaluate_agrees_with_end_of_training_and_writes_everything(trained, tmp_path):
    at_training = json.loads((trained.ckpt_dir / "metrics.json").read_text())
    folder = copy_run(trained, tmp_path)
    (folder / "metrics.json").unlink()
    code, out, err = run_main(["evaluate", "--checkpoint", folder / "best.pt", "--data-dir", MNIST_DIR,
                               "--image-dir", tmp_path / "img", "--iwae-k", "5"])
    assert code == 0, err
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("test_loss", "test_bce", "test_kl", "test_iwae_nll", "iwae_k", "bce_floor", "active_units", "kl_per_dim", "seed"):
        assert metrics[key] == at_training[key], key
    assert "IWAE bound" in out and "active units" in out and "bce floor" in out
    for name in PICTURES:
        assert_real_picture(tmp_path / "img" / name)


@needs_mnist
def test_metrics_json_keys_and_types(trained):
    m = json.loads((trained.ckpt_dir / "metrics.json").read_text())
    for key in ("test_loss", "test_bce", "test_kl", "test_iwae_nll", "bce_floor"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert isinstance(m["iwae_k"], int) and isinstance(m["active_units"], int) and isinstance(m["seed"], int)
    assert isinstance(m["checkpoint"], str) and m["checkpoint"].endswith("best.pt")
    assert len(m["kl_per_dim"]) == m["latent_dim"] and all(v >= 0 for v in m["kl_per_dim"])
    assert m["test_loss"] == pytest.approx(m["test_bce"] + m["test_kl"])
    assert sum(m["kl_per_dim"]) == pytest.approx(m["test_kl"], rel=1e-5)  # the same analytic KL, summed in another order
    assert 45.0 < m["bce_floor"] < 46.0  # computed from the test images: 45.53 nats per image on real MNIST


@needs_mnist
def test_bce_floor_matches_the_data_sets_entropy():
    x = data.to_float(data.load_mnist(MNIST_DIR, download=False)["test_images"])
    assert evaluate.bce_floor(x).mean().item() == pytest.approx(45.53, abs=0.01)


@needs_mnist
def test_iwae_bound_below_elbo_and_not_growing_with_k(trained):
    model, _ = checkpoint.load_model(trained.ckpt_dir / "best.pt")
    x = data.to_float(data.load_mnist(MNIST_DIR, download=False)["test_images"][:300])
    elbo = evaluate.neg_elbo(model, x, seed=3)["loss"]
    bounds = {k: evaluate.test_metrics(model, x, k, seed=3)[0]["test_iwae_nll"] for k in (1, 10, 100)}
    # k=1 is an estimate of the negative ELBO itself: equal up to the sampling noise of two independent estimates
    single = iwae_nll(iwae_log_weights(model, x, 1, torch.Generator().manual_seed(11)))
    noise = 4 * math.sqrt(2) * single.std().item() / math.sqrt(len(x))
    assert abs(bounds[1] - elbo) < noise
    assert bounds[10] < bounds[1] and bounds[100] < bounds[10] + 0.05
    assert bounds[100] < elbo


def test_active_units_counts_only_dimensions_the_encoder_uses():
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=6, channels=(4, 8), hidden_dim=16)).eval()
    with torch.no_grad():  # dimensions 0, 2 and 5: posterior mean fixed at 0 and the decoder ignores them
        for d in (0, 2, 5):
            model.to_stats.weight[d].zero_()
            model.to_stats.bias[d] = 0.0
            model.decoder[0].weight[:, d] = 0.0
        model.to_stats.weight[:6] *= 50  # make the used dimensions clearly vary across images
    x = torch.rand(200, 1, 28, 28)
    metrics, mu = evaluate.test_metrics(model, x, iwae_k=2, seed=0)
    assert metrics["active_units"] == 3
    assert mu[:, [0, 2, 5]].abs().max() == 0


@needs_mnist
def test_sample_command_writes_a_grid(trained, tmp_path):
    code, out, err = run_main(["sample", "--checkpoint", trained.ckpt_dir / "best.pt", "--n", "16", "--seed", "3", "--image-dir", tmp_path])
    assert code == 0, err
    assert_real_picture(tmp_path / "samples.png")


def test_binarized_evaluation_images_are_one_fixed_draw_whatever_the_seed():
    """--binarize runs are all scored on the same binary images: independent of the run's seed and the global RNG."""
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a = evaluate.test_images({"test_images": images}, {"binarize": True, "seed": 1}, torch.device("cpu"))
    torch.manual_seed(2)
    b = evaluate.test_images({"test_images": images}, {"binarize": True, "seed": 7}, torch.device("cpu"))
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}
    plain = evaluate.test_images({"test_images": images}, {"binarize": False, "seed": 1}, torch.device("cpu"))
    assert abs(a.mean().item() - plain.mean().item()) < 0.01  # a Bernoulli draw of the intensities, not a threshold


def test_latent_map_finds_the_directions_that_separate_the_digits():
    """Where a wide direction carries no label and a narrow one does, the map's first axis is the narrow one."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 3
    codes = torch.randn(600, 4, generator=g)
    codes[:, 0] *= 10  # wide, and says nothing about the digit
    codes[:, 2] += 3 * labels  # narrower, and tells the digits apart

    class Codes:  # stands in for the model: the "images" are the codes
        def encode(self, x):
            return x, None

    space = evaluate.latent_map(Codes(), codes, labels)
    first = space["axes"][:, 0].abs()
    assert first[2] > 5 * first[[0, 1, 3]].max()
    points = (codes - space["mean"]) @ space["axes"]
    assert torch.allclose(points.std(0), torch.ones(2), atol=1e-3)
    assert torch.allclose(space["points"], points[: evaluate.MAP_POINTS], atol=1e-4) and torch.equal(space["labels"], labels)


@needs_mnist
def test_evaluate_uses_a_weights_only_checkpoint(trained, tmp_path):
    """A file with only format, config and model (saved from a notebook, say) is evaluated like any other."""
    best = torch.load(trained.ckpt_dir / "best.pt", weights_only=True)
    resave({k: best[k] for k in ("format", "config", "model")}, tmp_path / "mine.pt")
    code, out, err = run_main(["evaluate", "--checkpoint", tmp_path / "mine.pt", "--data-dir", MNIST_DIR, "--iwae-k", "1",
                               "--image-dir", tmp_path / "img"])
    assert code == 0, err
    assert "(epoch None)" in out and json.loads((tmp_path / "metrics.json").read_text())["epoch"] is None
