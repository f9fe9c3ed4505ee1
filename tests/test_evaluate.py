"""`evaluate` and `sample`: honest metrics (the bound below the ELBO, active units, the data's entropy), legible
pictures, progress on long work, and the latent map."""

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
from helpers import MNIST_DIR, copy_run, needs_mnist, resave, run_main, tiny_images, tiny_model
from model import iwae_log_weights, iwae_nll, mean_neg_elbo

PICTURES = (
    "reconstructed_image.png",
    "samples.png",
    "loss_curves.png",
    "interpolation.png",
    "latent_space.png",
    "latent_traversal.png",
)


def assert_real_picture(path) -> None:
    """A valid PNG of plausible size that is not one flat colour."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 200 and img.height >= 100
        assert np.asarray(img.convert("L"), dtype=np.float32).std() > 10, f"{path} looks blank"


@needs_mnist
def test_evaluate_agrees_with_the_end_of_training_says_what_it_computes_and_writes_everything(trained, tmp_path):
    at_training = json.loads((trained.ckpt_dir / "metrics.json").read_text())
    folder = copy_run(trained, tmp_path)
    (folder / "metrics.json").unlink()
    argv = ["evaluate", "--checkpoint", folder / "best.pt", "--data-dir", MNIST_DIR, "--image-dir", tmp_path / "img"]
    code, out, err = run_main(argv + ["--iwae-k", "2"])
    assert code == 0, err
    assert out.startswith(f"using {folder / 'best.pt'}: a model trained here, epoch 2 of 2")
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("test_loss", "test_bce", "test_kl", "test_iwae_nll", "iwae_k", "bce_floor", "active_units", "seed"):
        assert metrics[key] == at_training[key], key
    assert "IWAE bound" in out and "active units" in out and "bce floor" in out
    assert "IWAE bound (k=2) on 10,000 test images" in err  # the long part shows a progress bar ...
    for name in PICTURES:
        assert_real_picture(tmp_path / "img" / name)
    code, out, err = run_main(argv + ["--iwae-k", "1", "--no-progress"])
    assert code == 0 and "IWAE bound (k=1)" not in err  # ... which --no-progress silences


@needs_mnist
def test_metrics_json_holds_consistent_finite_figures(trained):
    m = json.loads((trained.ckpt_dir / "metrics.json").read_text())
    for key in ("test_loss", "test_bce", "test_kl", "test_iwae_nll", "bce_floor", "seconds"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["checkpoint"].endswith("best.pt") and m["epoch"] == 2
    assert len(m["kl_per_dim"]) == m["latent_dim"] and all(v >= 0 for v in m["kl_per_dim"])
    assert m["test_loss"] == pytest.approx(m["test_bce"] + m["test_kl"])
    assert sum(m["kl_per_dim"]) == pytest.approx(m["test_kl"], rel=1e-5)  # the same analytic KL, summed otherwise
    x = data.to_float(data.load_mnist(MNIST_DIR)["test_images"])  # the floor is the test images' pixel entropy
    p = x.double().clamp(1e-12, 1 - 1e-12)
    assert m["bce_floor"] == pytest.approx(
        -(p * p.log() + (1 - p) * (1 - p).log()).flatten(1).sum(1).mean().item(), rel=1e-6
    )


@needs_mnist
def test_iwae_bound_is_below_the_elbo_and_tightens_with_k(trained):
    model, _ = checkpoint.load_model(trained.ckpt_dir / "best.pt")
    x = data.to_float(data.load_mnist(MNIST_DIR)["test_images"][:300])
    elbo = mean_neg_elbo(model, x, seed=3)["loss"]
    bounds = {k: evaluate.test_metrics(model, x, k, seed=3)[0]["test_iwae_nll"] for k in (1, 10, 100)}
    # k=1 estimates the negative ELBO itself: equal up to the sampling noise of two independent estimates
    single = iwae_nll(iwae_log_weights(model, x, 1, torch.Generator().manual_seed(11)))
    assert abs(bounds[1] - elbo) < 4 * math.sqrt(2) * single.std().item() / math.sqrt(len(x))
    assert bounds[10] < bounds[1] and bounds[100] < bounds[10] + 0.05 and bounds[100] < elbo


def test_active_units_count_only_the_dimensions_the_encoder_uses():
    model = tiny_model(latent_dim=6)
    with torch.no_grad():  # dimensions 0, 2 and 5: posterior mean fixed at 0
        for d in (0, 2, 5):
            model.to_stats.weight[d].zero_()
            model.to_stats.bias[d] = 0.0
        model.to_stats.weight[:6] *= 50  # the used dimensions clearly vary across images
    metrics, mu = evaluate.test_metrics(model, tiny_images(200), iwae_k=2, seed=0)
    assert metrics["active_units"] == 3 and mu[:, [0, 2, 5]].abs().max() == 0


def test_binarized_evaluation_images_are_one_fixed_draw_whatever_the_global_seed():
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a = evaluate.test_images({"test_images": images}, True, torch.device("cpu"))
    torch.manual_seed(2)
    b = evaluate.test_images({"test_images": images}, True, torch.device("cpu"))
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}
    plain = evaluate.test_images({"test_images": images}, False, torch.device("cpu"))
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
    assert torch.allclose(space["points"], points[: evaluate.MAP_POINTS], atol=1e-4) and torch.equal(
        space["labels"], labels
    )
    assert evaluate.latent_map_of({"config": {"latent_dim": 4}, "latent_map": space}) is space
    with pytest.raises(ValueError, match="latent map is malformed"):
        evaluate.latent_map_of({"config": {"latent_dim": 5}, "latent_map": space})


@needs_mnist
def test_a_weights_only_checkpoint_is_evaluated_and_sampled(trained, tmp_path):
    """A file with only format, config and model (saved from a notebook, say) works like any other."""
    best = torch.load(trained.ckpt_dir / "best.pt", weights_only=True)
    resave({k: best[k] for k in ("format", "config", "model")}, tmp_path / "mine.pt")
    code, out, err = run_main(
        [
            "evaluate",
            "--checkpoint",
            tmp_path / "mine.pt",
            "--data-dir",
            MNIST_DIR,
            "--iwae-k",
            "1",
            "--image-dir",
            tmp_path / "img",
            "--no-progress",
        ]
    )
    assert code == 0, err
    assert "a model with no training history" in out and "(epoch None)" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["epoch"] is None
    code, out, err = run_main(["sample", "--checkpoint", tmp_path / "mine.pt", "--n", "16", "--image-dir", tmp_path])
    assert code == 0, err
    assert_real_picture(tmp_path / "samples.png")
