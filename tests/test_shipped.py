"""The shipped checkpoint, pretrained/vae-mnist.pt: small, trimmed, loadable, and what every command uses until a model
has been trained (a trained models_mnist/best.pt wins, and says so); nothing is ever written into its folder."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal

import pytest
from PIL import Image, ImageDraw

import anomaly
import checkpoint
import prepare
from helpers import MNIST_DIR, copy_run, needs_mnist, run_cli, start_cli

SHIPPED = checkpoint.SHIPPED
USING = "using pretrained/vae-mnist.pt: the shipped model, epoch 20 of 20 on 55,000 training images"


def folder_digest() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(SHIPPED.parent.iterdir())}


@pytest.fixture(scope="module")
def untouched():
    """The shipped folder, checked byte for byte after the module's tests have run."""
    before = folder_digest()
    yield
    assert folder_digest() == before, "something was written into or beside the shipped checkpoint"


def test_shipped_checkpoint_is_a_trimmed_default_run(untouched):
    assert SHIPPED.stat().st_size <= 6_000_000
    model, ckpt = checkpoint.load_model(SHIPPED)  # the checksum and every value are checked
    assert set(ckpt) == set(checkpoint.USE_KEYS) | {"checksum"} and not model.training
    assert ckpt["config"] == ckpt["config"] | {"epochs": 20, "batch_size": 64, "lr": 1e-3, "seed": 1}  # a default run
    assert len(anomaly.reference_of(ckpt)["test_scores"]) == 10_000 and len(ckpt["history"]) == 20
    assert set(ckpt["latent_map"]) == {"mean", "axes", "points", "labels"}


def test_sample_and_reconstruct_use_the_shipped_checkpoint_with_no_data_at_hand(tmp_path, untouched):
    """In a folder with no models_mnist/best.pt and no MNIST: one line names the shipped model, and the commands work."""
    code, out, err = run_cli(["sample", "--n", "4"], cwd=tmp_path)
    assert code == 0, err
    assert out.splitlines()[0].startswith(USING) and (tmp_path / "images" / "samples.png").is_file()
    img = Image.new("L", (120, 160), 255)
    ImageDraw.Draw(img).line([(40, 20), (80, 20), (60, 140)], fill=0, width=12)  # a seven
    img.save(tmp_path / "seven.png")
    code, out, err = run_cli(["reconstruct", tmp_path / "seven.png", "--data-dir", tmp_path / "no-data"], cwd=tmp_path)
    assert code == 0, err
    assert out.startswith(USING) and "scoring the 10,000 test digits" not in out  # the stored scores give percentiles
    value = float(out.split("combined score ")[1].split(",")[0])
    model, ckpt = checkpoint.load_model(SHIPPED)
    x = prepare.load_digit_image(tmp_path / "seven.png")[1][None]
    assert value == pytest.approx(anomaly.score(model, x, reference=anomaly.reference_of(ckpt)).item(), abs=0.01)
    percentile = float(out.split("percentile ")[1].split(" ")[0])
    assert percentile == pytest.approx(anomaly.percentile(ckpt["anomaly_reference"]["test_scores"], value), abs=0.1)


@needs_mnist
def test_a_trained_checkpoint_wins_and_says_what_it_is(trained, tmp_path, untouched):
    copy_run(trained, tmp_path).rename(tmp_path / "models_mnist")
    code, out, err = run_cli(["sample", "--n", "4"], cwd=tmp_path)
    assert code == 0, err
    assert out.startswith("using models_mnist/best.pt: a model trained here, epoch 2 of 2 on the first 2,000 training")


@needs_mnist
def test_evaluate_and_score_write_nothing_beside_the_shipped_checkpoint(tmp_path, untouched):
    code, out, err = run_cli(["evaluate", "--iwae-k", "1", "--data-dir", MNIST_DIR], cwd=tmp_path)
    assert code == 0, err
    assert out.startswith(USING) and "(epoch 20)" in out and "metrics.json" not in out
    spelled_otherwise = os.path.relpath(SHIPPED, tmp_path)  # ../../.../pretrained/vae-mnist.pt, named by the user
    code, out, err = run_cli(
        ["score", "--method", "elbo", "--samples", "1", "--data-dir", MNIST_DIR, "--checkpoint", spelled_otherwise],
        cwd=tmp_path,
    )
    assert code == 0, err
    assert "anomaly_scores.csv" not in out and (tmp_path / "images" / "anomalies.png").is_file()
    code, out, err = run_cli(
        ["score", "--method", "elbo", "--samples", "1", "--data-dir", MNIST_DIR, "--output-dir", tmp_path / "mine"],
        cwd=tmp_path,
    )
    assert code == 0 and (tmp_path / "mine" / "anomaly_scores.csv").is_file(), err  # unless asked to, elsewhere


def test_demo_serves_the_shipped_checkpoint_and_says_so(tmp_path, untouched):
    proc = start_cli(["demo", "--port", "0"], cwd=tmp_path)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.startswith(USING) and second.startswith("demo ready at http://127.0.0.1:"), first + second
        port = int(second.split(":")[2].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/map")
        answer = conn.getresponse()
        assert answer.status == 200 and b'"method": "combined"' in answer.read()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
