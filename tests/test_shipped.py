"""The shipped checkpoint, pretrained/vae-mnist.pt: small, trimmed, loadable, and what every command uses until a model
has been trained (a trained models_mnist/best.pt wins); nothing is ever written into its folder."""
from __future__ import annotations

import hashlib
import http.client
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

import anomaly
import checkpoint
import data
from helpers import MNIST_DIR, ROOT, copy_run, needs_mnist, run_cli, start_cli

SHIPPED = checkpoint.SHIPPED
NOTE = "uses the shipped checkpoint"


def folder_digest() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(SHIPPED.parent.iterdir())}


@pytest.fixture(scope="module")
def untouched():
    """The shipped folder, checked byte for byte after the module's tests have run."""
    before = folder_digest()
    yield
    assert folder_digest() == before, "something was written into or beside the shipped checkpoint"


def digit_picture(path):
    img = Image.new("L", (120, 160), 255)
    ImageDraw.Draw(img).line([(40, 20), (80, 20), (60, 140)], fill=0, width=12)  # a seven
    img.save(path)
    return path


def test_shipped_checkpoint_is_trimmed_and_complete(untouched):
    assert SHIPPED.stat().st_size <= 6_000_000
    model, ckpt = checkpoint.load_model(SHIPPED)  # the checksum and every value are checked
    assert set(ckpt) == set(checkpoint.USE_KEYS) and "optimizer" not in ckpt and "train_weights" not in ckpt
    assert ckpt["config"] == ckpt["config"] | {"epochs": 20, "batch_size": 64, "lr": 1e-3, "seed": 1}  # a default run
    reference = ckpt["anomaly_reference"]
    assert len(reference["test_scores"]) == 10_000 and set(reference["latent_map"]) == {"mean", "axes", "points", "labels"}
    assert len(ckpt["history"]) == 20 and not model.training


def test_sample_and_reconstruct_use_the_shipped_checkpoint_with_no_data_at_hand(tmp_path, untouched):
    """In a folder with no models_mnist/best.pt and no MNIST: a one-line note, and the commands work."""
    code, out, err = run_cli(["sample", "--n", "4"], cwd=tmp_path)
    assert code == 0, err
    assert out.splitlines()[0].startswith("note: models_mnist/best.pt does not exist yet") and NOTE in out
    assert (tmp_path / "images" / "samples.png").is_file()
    picture = digit_picture(tmp_path / "seven.png")
    code, out, err = run_cli(["reconstruct", picture, "--data-dir", tmp_path / "no-data"], cwd=tmp_path)
    assert code == 0, err
    assert NOTE in out and "scoring the 10,000 test digits" not in out  # the stored test scores give the percentile
    value = float(out.split("combined score ")[1].split(",")[0])
    percentile = float(out.split("percentile ")[1].split(" ")[0])
    _, ckpt = checkpoint.load_model(SHIPPED)
    x = data.load_digit_image(picture)[1][None]
    assert value == pytest.approx(anomaly.score(checkpoint.load_model(SHIPPED)[0], x, reference=ckpt["anomaly_reference"]).item(), abs=0.01)
    assert percentile == pytest.approx(anomaly.percentile(ckpt["anomaly_reference"]["test_scores"], value), abs=0.1)


@needs_mnist
def test_a_trained_checkpoint_wins(trained, tmp_path, untouched):
    copy_run(trained, tmp_path).rename(tmp_path / "models_mnist")
    code, out, err = run_cli(["sample", "--n", "4"], cwd=tmp_path)
    assert code == 0 and NOTE not in out, out + err


@needs_mnist
def test_evaluate_and_score_write_nothing_beside_the_shipped_checkpoint(tmp_path, untouched):
    code, out, err = run_cli(["evaluate", "--iwae-k", "1", "--data-dir", MNIST_DIR], cwd=tmp_path)
    assert code == 0, err
    assert NOTE in out and "negative ELBO (test loss)" in out and "(epoch 20)" in out and "metrics.json" not in out
    code, out, err = run_cli(["score", "--method", "elbo", "--samples", "1", "--data-dir", MNIST_DIR], cwd=tmp_path)
    assert code == 0, err
    assert NOTE in out and "anomaly_scores.csv" not in out and (tmp_path / "images" / "anomalies.png").is_file()
    spelled_otherwise = os.path.relpath(SHIPPED, tmp_path)  # ../../.../pretrained/vae-mnist.pt, named by the user
    for command in (["score", "--method", "elbo", "--samples", "1"], ["evaluate", "--iwae-k", "1"]):
        code, out, err = run_cli(command + ["--checkpoint", spelled_otherwise, "--data-dir", MNIST_DIR], cwd=tmp_path)
        assert code == 0 and NOTE not in out, out + err
        assert "anomaly_scores.csv" not in out and "metrics.json" not in out, out


def test_demo_serves_the_shipped_checkpoint(tmp_path, untouched):
    proc = start_cli(["demo", "--port", "0"], cwd=tmp_path)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert NOTE in first and second.startswith("demo ready at http://127.0.0.1:"), first + second
        port = int(second.split(":")[2].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/map")
        answer = conn.getresponse()
        assert answer.status == 200 and b'"method": "combined"' in answer.read()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_shipped_path_does_not_depend_on_the_working_folder(tmp_path):
    """SHIPPED is found beside the code, wherever the command is run from."""
    out = subprocess.run([sys.executable, "-c", "import checkpoint; print(checkpoint.SHIPPED)"], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(ROOT / "pretrained" / "vae-mnist.pt"), out.stderr
