"""The shipped checkpoint, pretrained/vae-mnist.pt: small, trimmed, loadable, and what every command
uses until a model has been trained (a trained models_mnist/best.pt wins, and says so:
tests/test_cli.py); nothing is ever written into its folder."""

from __future__ import annotations

import os
import signal
import urllib.request

import helpers
import pytest
from helpers import (
    MNIST_DIR,
    assert_one_line_error,
    digit,
    needs_mnist,
    run_main,
    snapshot,
    start_cli,
)

import anomaly
import checkpoint
import data
import demo
import evaluate
import prepare
from config import VAEConfig
from model import VAE, mean_neg_elbo

SHIPPED = checkpoint.SHIPPED
USING = "using pretrained/vae-mnist.pt: the shipped model, epoch 20 of 20 on 55,000 training images"


@pytest.fixture(scope="module")
def untouched():
    """The shipped folder, checked byte for byte after the module's tests have run."""
    before = snapshot(SHIPPED.parent)
    yield
    assert snapshot(SHIPPED.parent) == before, (
        "something was written into or beside the shipped checkpoint"
    )


def test_shipped_checkpoint_is_a_trimmed_default_run(untouched):
    assert SHIPPED.stat().st_size <= 6_000_000
    model, ckpt = checkpoint.load_model(SHIPPED)  # the checksum and every value are checked
    assert set(ckpt) == set(checkpoint.USE_KEYS) | {"checksum"} and not model.training
    # a default run
    assert ckpt["config"] == ckpt["config"] | {
        "epochs": 20,
        "batch_size": 64,
        "lr": 1e-3,
        "seed": 1,
    }
    assert len(anomaly.reference_of(ckpt)["test_scores"]) == 10_000 and len(ckpt["history"]) == 20
    assert set(ckpt["latent_map"]) == {"mean", "axes", "points", "labels", "kl_per_dim"}


@needs_mnist
def test_the_shipped_weights_in_the_default_network_give_the_readmes_test_loss(untouched):
    """VAE() as model.py writes it is the shipped network, and with the shipped weights it gives the
    README's test negative ELBO (evaluate's z draws are seeded with the training seed)."""
    model, ckpt = checkpoint.load_model(SHIPPED)
    assert checkpoint.model_config(ckpt) == VAEConfig()
    shapes = {name: t.shape for name, t in VAE().state_dict().items()}
    assert {name: t.shape for name, t in ckpt["model"].items()} == shapes
    x = data.to_float(data.load_mnist(MNIST_DIR)["test_images"])
    loss = mean_neg_elbo(model, x, seed=ckpt["config"]["seed"])["loss"]
    assert loss == pytest.approx(91.752, abs=1e-3)


def test_every_command_names_the_shipped_model_when_none_is_trained_here(tmp_path, untouched):
    """In a folder with no models_mnist/best.pt and no MNIST, in process (demo and score: below):
    one line names the shipped model; sample and reconstruct work (the stored test scores give the
    percentile), and evaluate names it before it stops at the data."""
    code, out, err = run_main(["sample", "--n", "4"], tmp_path)
    assert (
        code == 0 and out.startswith(USING) and (tmp_path / "images" / "samples.png").is_file()
    ), out + err
    picture = digit(tmp_path / "zero.png")
    code, out, err = run_main(
        ["reconstruct", picture, "--data-dir", tmp_path / "no-data"], tmp_path
    )
    assert code == 0 and out.startswith(USING) and "scoring the 10,000 test digits" not in out, (
        out + err
    )
    model, ckpt = checkpoint.load_model(SHIPPED)
    value = anomaly.score(
        model, prepare.load_digit_image(picture)[1][None], reference=anomaly.reference_of(ckpt)
    )
    assert float(out.split("combined score ")[1].split(",")[0]) == pytest.approx(
        value.item(), abs=0.01
    )
    percentile = anomaly.percentile(ckpt["anomaly_reference"]["test_scores"], value.item())
    assert float(out.split("as high as ")[1].split("%")[0]) == pytest.approx(percentile, abs=0.1)
    code, out, err = run_main(
        ["evaluate", "--data-dir", helpers.unreadable_data(tmp_path / "data")], tmp_path
    )
    assert out.startswith(USING), out
    assert_one_line_error(code, err, str(tmp_path / "data"))


@needs_mnist
def test_evaluate_and_score_write_nothing_beside_the_shipped_checkpoint(
    tmp_path, monkeypatch, untouched
):
    """In process, on the first 500 test images (where the commands write is the question here, not
    the figures): no metrics.json or anomaly_scores.csv unless --output-dir asks for one, however
    the shipped file is named."""
    helpers.first_test_images(monkeypatch)
    code, out, err = run_main(
        ["evaluate", "--iwae-k", "1", "--data-dir", MNIST_DIR, "--no-progress"], tmp_path
    )
    wrote = "".join(line for line in out.splitlines() if line.startswith("wrote"))
    assert code == 0 and out.startswith(USING) and "(epoch 20)" in out, out + err
    note = "metrics.json: not written beside the shipped model; --output-dir DIR writes it"
    assert "metrics.json" not in wrote and note in out
    score = [
        "score",
        "--method",
        "elbo",
        "--samples",
        "1",
        "--data-dir",
        MNIST_DIR,
        "--no-progress",
    ]
    # ../../.../pretrained/vae-mnist.pt, named by the user
    spelled_otherwise = os.path.relpath(SHIPPED, tmp_path)
    code, out, err = run_main(score + ["--checkpoint", spelled_otherwise], tmp_path)
    assert (
        code == 0
        and "anomaly_scores.csv" not in out
        and (tmp_path / "images" / "anomalies.png").is_file()
    ), err
    code, out, err = run_main(score + ["--output-dir", tmp_path / "mine"], tmp_path)
    assert (
        code == 0 and out.startswith(USING) and (tmp_path / "mine" / "anomaly_scores.csv").is_file()
    ), out + err
    # and nothing in the working folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "mine"]


def test_demo_serves_the_shipped_checkpoint_and_says_so(tmp_path, untouched):
    proc = start_cli(["demo", "--port", "0"], cwd=tmp_path)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.startswith(USING) and second.startswith("demo ready at http://127.0.0.1:"), (
            first + second
        )
        answer = urllib.request.urlopen(second.split()[3] + "api/map", timeout=60).read()
        assert b'"latent_dim": 32' in answer and b'"method": "combined"' in answer
    finally:
        proc.send_signal(signal.SIGINT)
        code, out, err = helpers.finish(proc, timeout=60)
    assert code == 0 and "Traceback" not in err, err


@needs_mnist
def test_test_image_0_scores_the_same_alone_in_a_batch_in_the_csv_and_in_the_demo(
    tmp_path, monkeypatch
):
    helpers.first_test_images(monkeypatch, n=100)
    code, _, err = run_main(["score", "--data-dir", MNIST_DIR, "--output-dir", tmp_path], tmp_path)
    assert code == 0, err
    in_csv = float((tmp_path / "anomaly_scores.csv").read_text().splitlines()[1].split(",")[2])
    model, ckpt = checkpoint.load_model(SHIPPED)
    reference = anomaly.reference_of(ckpt)
    x = data.to_float(data.load_mnist(MNIST_DIR, sets=("test",))["test_images"][:64])
    scores = [anomaly.score(model, x[:n], reference=reference)[0].item() for n in (1, 8, 64)]
    page = demo.Demo(model, reference, evaluate.latent_map_of(ckpt), binarize=False)
    in_demo = page.digit(x[0, 0])["score"]
    assert max(scores + [in_demo, in_csv]) - min(scores + [in_demo, in_csv]) < 1e-4
