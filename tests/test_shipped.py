"""pretrained/vae-mnist.pt: trimmed, loadable, used until a model is trained here, never written."""

import os
import signal
import urllib.request

import helpers
import pytest
from helpers import MNIST_DIR, assert_one_line_error, digit, needs_mnist, run_main, snapshot

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


@pytest.fixture(scope="module", autouse=True)
def untouched():
    """The shipped folder, checked byte for byte after the module's tests have run."""
    before = snapshot(SHIPPED.parent)
    yield
    assert snapshot(SHIPPED.parent) == before, "something was written beside the shipped checkpoint"


@needs_mnist
def test_shipped_checkpoint_is_a_trimmed_default_run_giving_the_readmes_test_loss():
    """A default run, trimmed; its network is VAE(); the README's test loss (evaluate's seed)."""
    assert SHIPPED.stat().st_size <= 6_000_000
    model, ckpt = checkpoint.load_model(SHIPPED)  # the checksum and every value are checked
    assert set(ckpt) == set(checkpoint.USE_KEYS) | {"checksum"} and not model.training
    default_run = {"epochs": 20, "batch_size": 64, "lr": 1e-3, "seed": 1}
    assert ckpt["config"] == ckpt["config"] | default_run and len(ckpt["history"]) == 20
    assert len(anomaly.reference_of(ckpt)["test_scores"]) == 10_000
    assert set(ckpt["latent_map"]) == {"mean", "axes", "points", "labels", "kl_per_dim"}
    assert checkpoint.model_config(ckpt) == VAEConfig()
    shapes = {name: t.shape for name, t in VAE().state_dict().items()}
    assert {name: t.shape for name, t in ckpt["model"].items()} == shapes
    x = data.to_float(data.load_mnist(MNIST_DIR)["test_images"])
    loss = mean_neg_elbo(model, x, seed=ckpt["config"]["seed"])["loss"]
    assert loss == pytest.approx(91.752, abs=1e-3)


def test_every_command_names_the_shipped_model_when_none_is_trained_here(tmp_path):
    """No best.pt or MNIST: sample and reconstruct work; evaluate names the model, then the data."""
    code, out, err = run_main(["sample", "--n", "4"], tmp_path)
    assert code == 0 and out.startswith(USING), out + err
    assert (tmp_path / "images" / "samples.png").is_file()
    picture = digit(tmp_path / "zero.png")
    code, out, err = run_main(["reconstruct", picture, "--data-dir", tmp_path / "none"], tmp_path)
    assert code == 0 and out.startswith(USING) and "scoring the 10,000" not in out, out + err
    model, ckpt = checkpoint.load_model(SHIPPED)
    reference = anomaly.reference_of(ckpt)
    value = anomaly.score(model, prepare.load_digit_image(picture)[1][None], reference=reference)
    printed = float(out.split("combined score ")[1].split(",")[0])
    assert printed == pytest.approx(value.item(), abs=0.01)
    percentile = anomaly.percentile(reference["test_scores"], value.item())
    assert float(out.split("as high as ")[1].split("%")[0]) == pytest.approx(percentile, abs=0.1)
    data_dir = helpers.unreadable_data(tmp_path / "data")
    code, out, err = run_main(["evaluate", "--data-dir", data_dir], tmp_path)
    assert_one_line_error(code, err, str(data_dir))
    assert out.startswith(USING), out


@needs_mnist
def test_evaluate_and_score_write_nothing_beside_the_shipped_checkpoint(tmp_path, monkeypatch):
    """On 500 test images: however the shipped file is named (--output-dir writes: test_cli.py)."""
    helpers.first_test_images(monkeypatch)
    argv = "evaluate --iwae-k 1 --no-progress --data-dir".split() + [MNIST_DIR]
    code, out, err = run_main(argv, tmp_path)
    wrote = "".join(line for line in out.splitlines() if line.startswith("wrote"))
    assert code == 0 and out.startswith(USING) and "(epoch 20)" in out, out + err
    note = "metrics.json: not written beside the shipped model; --output-dir DIR writes it"
    assert "metrics.json" not in wrote and note in out
    score = "score --method elbo --samples 1 --no-progress --data-dir".split() + [MNIST_DIR]
    spelled_otherwise = os.path.relpath(SHIPPED, tmp_path)  # ../../.../pretrained/vae-mnist.pt
    code, out, err = run_main(score + ["--checkpoint", spelled_otherwise], tmp_path)
    assert code == 0 and "anomaly_scores.csv" not in out, err
    assert (tmp_path / "images" / "anomalies.png").is_file()
    assert os.listdir(tmp_path) == ["images"]  # and nothing in the working folder


def test_demo_serves_the_shipped_model_ctrl_c_stops_it_a_busy_port_is_one_line(tmp_path):
    """The server as a user runs it; a second one on its port, on every interface, in process."""
    proc = helpers.start_cli(["demo", "--port", "0"], cwd=tmp_path)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.startswith(USING), first
        assert second.startswith("demo ready at http://127.0.0.1:"), second + proc.stderr.read()
        url = second.split()[3]
        answer = urllib.request.urlopen(url + "api/map", timeout=60).read()
        assert b'"latent_dim": 32' in answer and b'"method": "combined"' in answer
        code, out, err = run_main(["demo", "--port", url.split(":")[2][:-1], "--host", "0.0.0.0"])
        assert code == 2 and out.count("\n") == 2 == err.count("\n") + 1, out + err
        assert out.splitlines()[1].startswith("warning: --host 0.0.0.0 is not a loopback address")
        assert err.startswith("error: cannot serve on 0.0.0.0:") and "--port" in err, err
        proc.send_signal(signal.SIGINT)
        code, out, err = helpers.finish(proc, timeout=60)
    finally:
        proc.kill()
    assert code == 0 and (out + err).strip() == "demo stopped", (out, err)


@needs_mnist
def test_image_0_scores_alike_alone_in_batches_in_the_csv_and_demo(tmp_path, monkeypatch):
    helpers.first_test_images(monkeypatch, n=100)
    code, _, err = run_main(["score", "--data-dir", MNIST_DIR, "--output-dir", tmp_path], tmp_path)
    assert code == 0, err
    in_csv = float((tmp_path / "anomaly_scores.csv").read_text().splitlines()[1].split(",")[2])
    model, ckpt = checkpoint.load_model(SHIPPED)
    reference = anomaly.reference_of(ckpt)
    x = data.to_float(data.load_mnist(MNIST_DIR, sets=("test",))["test_images"][:64])
    scores = [anomaly.score(model, x[:n], reference=reference)[0].item() for n in (1, 8, 64)]
    page = demo.Demo(model, reference, evaluate.latent_map_of(ckpt), binarize=False)
    scores += [in_csv, page.digit(x[0, 0])["score"]]
    assert max(scores) - min(scores) < 1e-4, scores
