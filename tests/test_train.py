"""Training: schedules, the bf16 step, the shared run, same seed same run, resume, stop signals, a
diverging run."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
from dataclasses import replace
from pathlib import Path

import helpers
import pytest
import torch
from helpers import (
    MNIST_DIR,
    copy_run,
    needs_mnist,
    run_main,
    snapshot,
    start_cli,
    tiny_images,
    train_args,
)
from PIL import Image

import checkpoint
import commands
import data
import evaluate
import train
from config import TrainConfig, VAEConfig
from model import on_device

# as this process runs: the same arithmetic, so bit-identical runs
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PICTURES = (
    "interpolation latent_space latent_traversal loss_curves reconstructed_image samples".split()
)
METRICS = (
    "test_loss",
    "test_bce",
    "test_kl",
    "test_iwae_nll",
    "bce_floor",
    "active_units",
    "kl_per_dim",
)
SMALL = VAEConfig(latent_dim=4, channels=(4, 8), hidden_dim=16, res_blocks=0, out_conv=0)


def uint8_images(n: int, seed: int) -> torch.Tensor:
    return (tiny_images(n, seed) * 255).round().to(torch.uint8)[:, 0]


@pytest.fixture
def cheap_evaluation(monkeypatch):
    """The final evaluation without the anomaly reference (test_anomaly.py's) and pictures: the test
    metrics only."""
    monkeypatch.setattr(commands, "store_reference", lambda best, ckpt, *args: ckpt)
    monkeypatch.setattr(evaluate, "draw_pictures", lambda *args, **kwargs: [])


@pytest.fixture
def evaluations(monkeypatch, cheap_evaluation) -> list[Path]:
    """The checkpoints a command's final evaluation is run on, recorded instead of evaluated."""
    calls = []
    monkeypatch.setattr(
        evaluate, "evaluate", lambda path, *args, **kwargs: calls.append(Path(path))
    )
    return calls


@pytest.fixture
def own_signals():
    """For a command run in this process that is stopped by a signal: it leaves the stop signals
    ignored."""
    handlers = {s: signal.getsignal(s) for s in commands.STOP_SIGNALS}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


def test_learning_rate_and_kl_weight_schedules():
    cosine = TrainConfig(lr=1e-3, epochs=10, lr_schedule="cosine")
    assert [train.learning_rate(cosine, at) for at in (0, 5, 10)] == pytest.approx(
        [1e-3, 5e-4, 0], abs=1e-15
    )
    # cos(pi/4)
    assert train.learning_rate(cosine, 2.5) == pytest.approx(1e-3 * (1 + math.sqrt(0.5)) / 2)
    assert train.learning_rate(replace(cosine, lr_schedule="constant"), 7.3) == 1e-3
    warm = TrainConfig(kl_warmup=4)
    assert [train.kl_weight(warm, at) for at in (0, 1, 2.5, 4, 9)] == [0, 0.25, 0.625, 1, 1]
    assert train.kl_weight(TrainConfig(kl_warmup=0), 0) == 1


def test_a_bf16_step_rounds_but_keeps_fp32_weights_adam_state_and_loss():
    x, results = tiny_images(16, seed=2), {}
    for precision in ("fp32", "bf16"):
        model = on_device(helpers.tiny_model(seed=0).train(), "cpu")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        bce, kl = train.train_step(
            model, opt, None, x, torch.Generator().manual_seed(1), 1.0, precision
        )
        assert bce.dtype == kl.dtype == torch.float32 and all(
            p.dtype == torch.float32 for p in model.parameters()
        )
        assert all(
            v.dtype == torch.float32
            for s in opt.state.values()
            for k, v in s.items()
            if k != "step"
        )
        results[precision] = bce.item(), kl.item(), [p.detach().clone() for p in model.parameters()]
    (bce32, kl32, w32), (bce16, kl16, w16) = results["fp32"], results["bf16"]
    assert bce16 != bce32  # bf16 arithmetic really ran
    assert bce16 == pytest.approx(bce32, rel=1e-2) and kl16 == pytest.approx(
        kl32, rel=5e-2, abs=1e-2
    )
    # one Adam step moves a weight by ~lr
    assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(w32, w16))


@needs_mnist
def test_the_run_prints_its_epochs_and_leaves_checkpoints_metrics_pictures_and_no_lock(trained):
    ckpt = torch.load(trained.ckpt_dir / "last.pt", weights_only=True)
    lines = [line for line in trained.output.splitlines() if line.startswith("epoch ")]
    assert [line[:11] for line in lines] == ["epoch   1/2", "epoch   2/2"]
    for line, h in zip(lines, ckpt["history"]):  # what was printed is what was saved
        assert (
            f"train {h['train_loss']:8.3f}  val {h['val_loss']:8.3f} (bce {h['val_bce']:.3f}"
            in line
        )
    # no .lock
    assert sorted(p.name for p in trained.ckpt_dir.iterdir()) == [
        "best.pt",
        "last.pt",
        "metrics.json",
    ]
    assert sorted(p.name for p in trained.image_dir.iterdir()) == [
        f"{name}.png" for name in PICTURES
    ]
    for name in PICTURES:
        with Image.open(trained.image_dir / f"{name}.png") as picture:
            assert picture.format == "PNG" and min(picture.size) > 200


def same_run(a: Path, b: Path, metrics: bool = True) -> None:
    """Bit-identical weights, average, Adam state, generators, history (but seconds), best weights
    and metrics."""
    ca, cb = (torch.load(d / "last.pt", weights_only=True) for d in (a, b))
    assert ca["epoch"] == cb["epoch"] and ("train_weights" in ca) == ("train_weights" in cb)
    for key in ("model", "train_weights") if "train_weights" in ca else ("model",):
        assert all(torch.equal(ca[key][n], cb[key][n]) for n in ca[key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]
    )
    assert all(torch.equal(ca["rng"][k], cb["rng"][k]) for k in ca["rng"] if k != "device")
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert (
        strip(ca["history"]) == strip(cb["history"]) and ca["best_val_loss"] == cb["best_val_loss"]
    )
    ba, bb = (torch.load(d / "best.pt", weights_only=True)["model"] for d in (a, b))
    assert all(torch.equal(ba[n], bb[n]) for n in ba)
    if metrics:
        ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
        assert {k: ma[k] for k in METRICS} == {k: mb[k] for k in METRICS}


@needs_mnist
def test_sigterm_then_the_printed_resume_command_ends_bit_identical(
    trained, tmp_path, cheap_evaluation
):
    """Same seed, same run; stopped by SIGTERM and resumed as it says, the run ends as the
    uninterrupted one did."""
    proc, last = (
        start_cli(train_args(tmp_path, epochs=2), cwd=tmp_path, env=ONE_THREAD),
        tmp_path / "ckpt" / "last.pt",
    )
    try:
        helpers.read_until(proc, "epoch   1/2")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert (
        "SIGTERM: stopping after this step; the epochs already saved are kept" in err
        and "epoch   2/2" not in out
    )
    assert f"stopped in epoch 2; {last} holds the run up to epoch 1. Resume with:" in err
    assert checkpoint.load(last, resume=True)["epoch"] == 1
    argv = shlex.split(err.strip().splitlines()[-1])
    assert argv[:4] == ["python", "main.py", "--resume", str(last)]
    # the evaluation as the shared run's
    code, out, err = run_main(argv[2:] + ["--iwae-k", "2", "--no-progress"])
    assert code == 0 and "resuming from epoch 1" in out and "epoch   2/2" in out, err
    same_run(trained.ckpt_dir, tmp_path / "ckpt")


@needs_mnist
def test_ctrl_c_twice_ends_without_a_traceback_keeping_the_saved_epoch(tmp_path):
    proc = start_cli(
        train_args(tmp_path, 10, 640) + ["--val-size", "200"], cwd=tmp_path, env=ONE_THREAD
    )
    try:
        helpers.read_until(proc, "epoch   1/10")
        proc.send_signal(signal.SIGINT)
        err = helpers.read_until(proc, "SIGINT: stopping after this step", proc.stderr)
        assert proc.poll() is None, "the run ended before the second Ctrl-C"
        # while it stops: abort at once, or ignored once it is saying how to resume
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err += rest
    assert proc.returncode == 130, err
    assert (
        "Traceback" not in err
        and "Exception ignored" not in err
        and ("interrupted" in err or "--resume" in err)
    )
    assert checkpoint.load(tmp_path / "ckpt" / "last.pt", resume=True)["epoch"] == 1
    # no lock, no temporary
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.pt", "last.pt"]


@needs_mnist
def test_ctrl_c_as_the_last_epoch_saves_leaves_ctrl_c_working(
    tmp_path, monkeypatch, evaluations, own_signals
):
    """Ctrl-C while the last epoch is saved: every epoch is kept, and the message promises that a
    second Ctrl-C aborts at once; one during the (long) final evaluation that follows must then end
    the command, not be ignored."""
    end_epoch, ctrl_c = train.end_epoch, lambda: os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train, "end_epoch", lambda *args: (end_epoch(*args), ctrl_c())[0])
    monkeypatch.setattr(commands, "store_reference", lambda best, ckpt, *args: (ctrl_c(), ckpt)[1])
    code, out, err = run_main(train_args(tmp_path, epochs=1, subset=200) + ["--val-size", "200"])
    assert code == 130 and "SIGINT again aborts at once" in err and evaluations == [], (
        code,
        err,
        evaluations,
    )
    assert checkpoint.load(tmp_path / "ckpt" / "last.pt", resume=True)["epoch"] == 1


@needs_mnist
def test_a_stop_in_a_new_checkpoint_dir_prints_a_working_command(
    trained, tmp_path, monkeypatch, own_signals
):
    """--resume A/last.pt --checkpoint-dir B, stopped before B holds a checkpoint: the command must
    resume from one."""
    source, step = copy_run(trained, tmp_path / "a"), train.train_step
    monkeypatch.setattr(
        train, "train_step", lambda *args: (os.kill(os.getpid(), signal.SIGINT), step(*args))[1]
    )
    args = [
        "--resume",
        source / "last.pt",
        "--checkpoint-dir",
        tmp_path / "b",
        "--epochs",
        3,
        "--data-dir",
        MNIST_DIR,
    ]
    code, _, err = run_main(args + ["--no-progress"])  # Ctrl-C in its first step
    argv = shlex.split(err.strip().splitlines()[-1])
    assert code == 130 and Path(argv[argv.index("--resume") + 1]).is_file(), err


@needs_mnist
def test_a_finished_run_resumed_into_another_folder_is_evaluated_into_that_folder(
    trained, tmp_path, monkeypatch
):
    source = copy_run(trained, tmp_path / "a")
    before, calls = snapshot(source), []
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: calls.append(args))
    args = [
        "--resume",
        source / "last.pt",
        "--checkpoint-dir",
        tmp_path / "b",
        "--data-dir",
        MNIST_DIR,
    ]
    code, out, err = run_main(args + ["--no-progress"])
    assert code == 0 and "already trained 2 epochs" in out and len(calls) == 1, err
    best, *_, metrics, history = calls[0]
    assert (
        best == source / "best.pt"
        and metrics == tmp_path / "b" / "metrics.json"
        and len(history) == 2
    )
    assert snapshot(source) == before  # the run resumed from is only read


def test_binarized_averaged_run_resumes_exactly(tmp_path):
    """Fresh pixels at every step, and an average with its own update count: both restored exactly."""
    images = uint8_images(300, seed=1), uint8_images(100, seed=2)
    settings = TrainConfig(
        epochs=2, batch_size=32, seed=5, binarize=True, ema=0.95, precision="fp32"
    )

    # straight to 2 epochs, and 1 epoch then resumed to 2
    for folder, epochs in (("a", 2), ("b", 1), ("b", 2)):
        resume = (
            checkpoint.load(tmp_path / "b" / "last.pt", resume=True)
            if (folder, epochs) == ("b", 2)
            else None
        )
        run = train.start(
            replace(settings, epochs=epochs), SMALL, images, tmp_path / folder, resume=resume
        )
        train.train(run, show_progress=False)
    same_run(tmp_path / "a", tmp_path / "b", metrics=False)
    ckpt = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not all(
        torch.equal(v, ckpt["train_weights"][k]) for k, v in ckpt["model"].items()
    )


def test_another_seed_gives_other_weights_split_order_and_noise(tmp_path):
    labels, images = torch.arange(400) % 10, uint8_images(400, seed=3)
    seen = []
    for seed in (1, 1, 7):
        split = data.run_split(labels, val_size=100, seed=seed)[1]
        # the same images
        run = train.start(TrainConfig(seed=seed), SMALL, (images[:300], images[300:]), tmp_path)
        order = torch.cat(list(data.batches(run.train_x, 64, run.generators["shuffle"])))
        noise = torch.randn(5, generator=run.generators["noise"])
        seen.append((run.model.state_dict()["to_stats.weight"], split, order, noise))
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
    assert not any(torch.equal(a, b) for a, b in zip(seen[0], seen[2]))


@needs_mnist
def test_resume_refuses_a_changed_model_flag_and_of_a_finished_run_only_evaluates(
    trained, tmp_path, evaluations
):
    folder = copy_run(trained, tmp_path)
    before = snapshot(folder)
    code, _, err = run_main(
        ["--resume", folder / "last.pt", "--latent-dim", "5", "--data-dir", MNIST_DIR], tmp_path
    )
    helpers.assert_one_line_error(
        code, err, "--latent-dim 5 differs from the checkpoint's 8", "--epochs may change"
    )
    assert snapshot(folder) == before and evaluations == []  # nothing written, no lock left
    code, out, err = run_main(
        ["--resume", "--checkpoint-dir", folder, "--data-dir", MNIST_DIR, "--no-progress"]
    )
    assert code == 0 and "already trained 2 epochs" in out, err
    assert not any(line.startswith("epoch ") for line in out.splitlines())
    # last.pt untouched, no lock left
    assert evaluations == [folder / "best.pt"] and snapshot(folder) == before


@needs_mnist
def test_a_diverging_run_stops_naming_epoch_and_step_and_saves_nothing(trained, tmp_path):
    folder = copy_run(trained, tmp_path)
    ckpt = torch.load(folder / "last.pt", weights_only=True)
    # the stored run continues at a learning rate that blows the weights up at once
    ckpt["config"]["lr"] = 10.0
    helpers.resave(ckpt, folder / "last.pt")
    before = snapshot(folder)
    args = [
        "--resume",
        folder / "last.pt",
        "--epochs",
        "3",
        "--data-dir",
        MNIST_DIR,
        "--no-progress",
    ]
    code, out, err = run_main(args + ["--image-dir", tmp_path / "img"], tmp_path)
    helpers.assert_one_line_error(
        code, err, "epoch 3, step ", "the training loss became nan", "(this run: 10)"
    )
    assert "the checkpoints already saved are kept as they were" in err and "epoch   3/3" not in out
    assert snapshot(folder) == before and not (tmp_path / "img").exists()
