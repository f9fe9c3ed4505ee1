"""`evaluate` and `sample`: honest metrics, legible pictures, progress bars, the latent map."""

import json
import math
import os

import helpers
import pytest
import torch
from helpers import MNIST_DIR, copy_run, resave, run_main, tiny_images, tiny_model

import checkpoint
import data
import evaluate
from model import mean_neg_elbo


def test_evaluate_agrees_with_training_and_writes_sound_figures(trained, tmp_path):
    at_training = json.loads((trained.ckpt_dir / "metrics.json").read_text())
    folder = copy_run(trained, tmp_path)
    (folder / "metrics.json").unlink()
    best, img = folder / "best.pt", tmp_path / "img"
    argv = ["evaluate", "--checkpoint", best, "--data-dir", MNIST_DIR, "--image-dir", img]
    code, out, err = run_main(argv + ["--iwae-k", "2", "--progress"])
    assert code == 0 and out.startswith(f"using {best}: a model trained here, epoch 2 of 2"), err
    metrics = json.loads((folder / "metrics.json").read_text())
    same = "test_loss test_bce test_kl test_iwae_nll iwae_k bce_floor active_units seed".split()
    assert {k: metrics[k] for k in same} == {k: at_training[k] for k in same}
    assert "IWAE bound" in out and "active units" in out and "bce floor" in out
    # the long part shows a progress bar when asked (stderr here is no terminal)
    assert "IWAE bound (k=2) on 10,000 test images" in err
    assert sorted(os.listdir(img)) == sorted(os.listdir(trained.image_dir))  # as training drew
    m = at_training  # consistent, finite figures
    for key in ("test_loss", "test_bce", "test_kl", "test_iwae_nll", "bce_floor", "seconds"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["checkpoint"].endswith("best.pt") and m["epoch"] == 2 and m["images"] == 10_000
    assert f"{m['test_loss']:.3f}" in trained.output  # what the end of training printed
    assert len(m["kl_per_dim"]) == m["latent_dim"] and all(v >= 0 for v in m["kl_per_dim"])
    assert m["test_loss"] == pytest.approx(m["test_bce"] + m["test_kl"])
    # no model beats the pixels' own entropy; after 2 epochs it beats p = 1/2 (784 ln 2 nats)
    assert m["bce_floor"] < m["test_bce"] < m["test_loss"] < 784 * math.log(2) and m["test_kl"] > 0
    assert m["test_iwae_nll"] < m["test_loss"]  # k = 2 samples: a tighter bound than the ELBO
    assert sum(m["kl_per_dim"]) == pytest.approx(m["test_kl"], rel=1e-5)
    x = data.to_float(data.load_mnist(MNIST_DIR)["test_images"])
    p = x.double().clamp(1e-12, 1 - 1e-12)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).flatten(1).sum(1).mean().item()
    assert m["bce_floor"] == pytest.approx(entropy, rel=1e-6)  # the pixels' entropy
    model, x = checkpoint.load_model(best)[0], x[:300]  # the IWAE bound tightens with k
    elbo = mean_neg_elbo(model, x, seed=3)["loss"]
    bounds = {k: evaluate.test_metrics(model, x, k, 3)[0]["test_iwae_nll"] for k in (1, 10, 100)}
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
    gen = torch.Generator().manual_seed(0)
    mnist = {"test_images": torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=gen)}
    torch.manual_seed(1)
    a = evaluate.test_images(mnist, True, torch.device("cpu"))
    torch.manual_seed(2)
    b = evaluate.test_images(mnist, True, torch.device("cpu"))
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}
    plain = evaluate.test_images(mnist, False, torch.device("cpu"))
    assert abs(a.mean().item() - plain.mean().item()) < 0.01  # a Bernoulli draw, no threshold


def test_latent_map_finds_the_directions_that_separate_the_digits_and_keeps_to_the_active_ones():
    """A narrow labelled direction beats a wide unlabelled one; an inactive one is left out."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 3
    codes = torch.randn(600, 4, generator=g)
    codes[:, 0] *= 10  # wide, and says nothing about the digit
    codes[:, 2] += 3 * labels  # narrower, and tells the digits apart

    codes_as_model = type("Codes", (), {"encode": lambda self, x: (x, x)})()  # images are codes
    space = evaluate.latent_map(codes_as_model, codes, labels)
    first = space["axes"][:, 0].abs()
    assert first[2] > 5 * first[[0, 1, 3]].max()
    points = (codes - space["mean"]) @ space["axes"]
    assert torch.allclose(points.std(0), torch.ones(2), atol=1e-3)
    assert torch.allclose(space["points"], points[: evaluate.MAP_POINTS], atol=1e-4)
    assert torch.equal(space["labels"], labels)
    assert evaluate.latent_map_of({"config": {"latent_dim": 4}, "latent_map": space}) is space
    with pytest.raises(ValueError, match="latent map is malformed"):
        evaluate.latent_map_of({"config": {"latent_dim": 5}, "latent_map": space})
    codes[:, 3] = 0.01 * labels + 0.001 * torch.randn(600, generator=g)  # Var ~ 1e-4
    axes = evaluate.latent_map(codes_as_model, codes, labels)["axes"]
    assert axes[3].abs().max() == 0 and axes[2, 0].abs() > 5 * axes[[0, 1], 0].abs().max()


def test_a_weights_only_checkpoint_is_evaluated_and_sampled(trained, tmp_path):
    """A file of only format, config and model (saved from a notebook) works like any other."""
    best, mine = torch.load(trained.ckpt_dir / "best.pt", weights_only=True), tmp_path / "mine.pt"
    resave({k: best[k] for k in ("format", "config", "model")}, mine)
    argv = ["evaluate", "--checkpoint", mine, "--data-dir", MNIST_DIR, "--iwae-k", "1"]
    code, out, err = run_main(argv + ["--image-dir", tmp_path / "img", "--no-progress"])
    assert code == 0 and "a model with no training history" in out and "(epoch None)" in out, err
    assert "IWAE bound" not in err  # no bar
    assert json.loads((tmp_path / "metrics.json").read_text())["epoch"] is None
    code, out, err = run_main(["sample", "--checkpoint", mine, "--n", 16, "--image-dir", tmp_path])
    assert code == 0, err
    helpers.assert_real_picture(tmp_path / "samples.png", height=100)
