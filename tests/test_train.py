"""Training: schedules, the bf16 step, start() and train() from a notebook, seeds, resume, stops."""

import json
import math
import os
import shlex
import signal
from dataclasses import fields, replace
from pathlib import Path

import helpers
import pytest
import torch
from helpers import MNIST_DIR, copy_run, needs_mnist, run_main, snapshot, start_cli, train_args

import checkpoint
import config
import data
import evaluate
import main
import train
import train_command
from config import TrainConfig, VAEConfig
from model import on_device

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as this process runs: the same arithmetic, bit for bit
PICTURES = "interpolation latent_space latent_traversal loss_curves reconstructed_image samples"
METRICS = ("test_loss", "test_bce", "test_kl", "test_iwae_nll", "bce_floor", "active_units")
SMALL = VAEConfig(latent_dim=4, channels=(4, 8), hidden_dim=16, res_blocks=0, out_conv=0)


def fake_mnist(n: int, seed: int) -> dict[str, torch.Tensor]:
    """n digit-like uint8 training images and their labels, as data.load_mnist gives them."""
    images = (helpers.tiny_images(n, seed) * 255).round().to(torch.uint8)[:, 0]
    return {"train_images": images, "train_labels": torch.arange(n) % 10}


def float_settings() -> tuple[bool, bool, bool]:
    flushed = (torch.full((1,), 1e-30) * 1e-10).item() == 0
    return flushed, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def ctrl_c(*args, **kwargs) -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def cheap_evaluation(monkeypatch):
    """The final evaluation without the anomaly reference (test_anomaly.py's) and the pictures."""
    # as finish_run does, the checkpoint as saved, here without the reference
    monkeypatch.setattr(evaluate, "finish_run", lambda path, *args, **kwargs: checkpoint.load(path))
    monkeypatch.setattr(evaluate, "draw_pictures", lambda *args, **kwargs: [])


@pytest.fixture
def evaluations(monkeypatch, cheap_evaluation) -> list[dict]:
    """The keywords of each final evaluation a command asks for, recorded instead of run."""
    calls = []
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: calls.append(kwargs))
    return calls


@pytest.fixture(autouse=True)
def own_signals():
    """Restores the stop signals, which a command run here that a signal stops leaves ignored."""
    handlers = {s: signal.getsignal(s) for s in train_command.STOP_SIGNALS}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


def test_learning_rate_and_kl_weight_schedules():
    cosine = TrainConfig(lr=1e-3, epochs=10, lr_schedule="cosine")
    rates = [train.learning_rate(cosine, at) for at in (0, 5, 10)]
    assert rates == pytest.approx([1e-3, 5e-4, 0], abs=1e-15)
    assert train.learning_rate(cosine, 2.5) == pytest.approx(1e-3 * (1 + math.sqrt(0.5)) / 2)
    assert train.learning_rate(replace(cosine, lr_schedule="constant"), 7.3) == 1e-3
    warm = TrainConfig(kl_warmup=4)
    assert [train.kl_weight(warm, at) for at in (0, 1, 2.5, 4, 9)] == [0, 0.25, 0.625, 1, 1]
    assert train.kl_weight(TrainConfig(kl_warmup=0), 0) == 1


def test_a_bf16_step_rounds_but_keeps_fp32_weights_adam_state_and_loss():
    x, results = helpers.tiny_images(16, seed=2), {}
    for precision in ("fp32", "bf16"):
        model = on_device(helpers.tiny_model(seed=0).train(), "cpu")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        noise = torch.Generator().manual_seed(1)
        bce, kl = train.train_step(model, opt, None, x, noise, 1.0, precision)
        states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
        assert all(t.dtype == torch.float32 for t in [bce, kl, *model.parameters(), *states])
        results[precision] = bce.item(), kl.item(), [p.detach().clone() for p in model.parameters()]
    (bce32, kl32, w32), (bce16, kl16, w16) = results["fp32"], results["bf16"]
    assert bce16 != bce32 and bce16 == pytest.approx(bce32, rel=1e-2)  # bf16 really ran
    assert kl16 == pytest.approx(kl32, rel=5e-2, abs=1e-2)
    assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(w32, w16))  # one step moves ~lr


def test_start_resolves_precision_auto_and_its_errors_name_no_flag(tmp_path, monkeypatch):
    mnist, settings = fake_mnist(300, seed=1), TrainConfig(val_size=100)
    for amx, resolved in ((True, "bf16"), (False, "fp32")):  # bf16 only where AMX runs it fast
        monkeypatch.setattr(config, "cpu_has_amx", lambda amx=amx: amx)
        assert train.start(settings, SMALL, mnist, tmp_path, "cpu").config.precision == resolved
    too_few = "^this run would train on 50 images and validate on 250; each needs at least 100$"
    with pytest.raises(ValueError, match=too_few):
        train.start(replace(settings, val_size=250), SMALL, mnist, tmp_path)
    with pytest.raises(ValueError, match="^bf16 is supported on cpu and cuda, not mps$"):
        config.resolve_precision("bf16", torch.device("mps"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^cuda: no CUDA GPU is available here$"):
            train.start(settings, SMALL, mnist, tmp_path, device="cuda")
    assert list(tmp_path.iterdir()) == []  # nothing is written before train()


def test_train_flushes_denormals_with_tf32_and_gives_them_back(tmp_path, monkeypatch):
    """A notebook's other work keeps its float settings: after train() returns and after Ctrl-C."""
    seen, step = [], train.train_step

    def watched_step(*args):
        seen.append(float_settings())
        if len(seen) == 3:  # the second run's first step
            raise KeyboardInterrupt
        return step(*args)

    monkeypatch.setattr(train, "train_step", watched_step)
    run = train.start(TrainConfig(epochs=1, val_size=100), SMALL, fake_mnist(228, 3), tmp_path)
    torch.backends.cudnn.allow_tf32 = False  # so that each of the three is off before
    try:
        assert train.train(run, show_progress=False).epoch == 1 and len(seen) == 2
        assert float_settings() == (False, False, False)
        with pytest.raises(KeyboardInterrupt):
            train.train(replace(run, epoch=0), show_progress=False)
        assert float_settings() == (False, False, False)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert seen == [(True, True, True)] * 3  # in every step


def test_the_run_prints_its_epochs_and_leaves_checkpoints_metrics_pictures_and_no_lock(trained):
    ckpt = torch.load(trained.ckpt_dir / "last.pt", weights_only=True)
    lines = [line for line in trained.output.splitlines() if line.startswith("epoch ")]
    assert [line[:11] for line in lines] == ["epoch   1/2", "epoch   2/2"]
    for line, h in zip(lines, ckpt["history"]):  # what was printed is what was saved
        train_loss, val_loss, bce = h["train_loss"], h["val_loss"], h["val_bce"]
        assert f"train {train_loss:8.3f}  val {val_loss:8.3f} (bce {bce:.3f}" in line
    assert sorted(os.listdir(trained.ckpt_dir)) == ["best.pt", "last.pt", "metrics.json"]  # no lock
    assert sorted(os.listdir(trained.image_dir)) == [f"{n}.png" for n in PICTURES.split()]
    for name in PICTURES.split():
        helpers.assert_real_picture(trained.image_dir / f"{name}.png")


def same_run(a: Path, b: Path, metrics: bool = True) -> None:
    """Bit-identical last.pt (all but each epoch's seconds), best weights and metrics."""
    ca, cb = (torch.load(d / "last.pt", weights_only=True) for d in (a, b))
    ta, tb = (list(checkpoint.tensors(c)) for c in (ca, cb))
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    for c in (ca, cb):
        c["history"] = [h | {"seconds": 0} for h in c["history"]]
    keys = ("config", "epoch", "best_val_loss", "history")
    assert {k: ca[k] for k in keys} == {k: cb[k] for k in keys}
    ba, bb = (torch.load(d / "best.pt", weights_only=True)["model"] for d in (a, b))
    assert all(torch.equal(ba[n], bb[n]) for n in ba)
    if metrics:
        ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
        assert {k: ma[k] for k in METRICS} == {k: mb[k] for k in METRICS}


@pytest.mark.parametrize("stop", [signal.SIGHUP, signal.SIGTERM])
def test_replace_then_stop_signal_resumes_bit_identical(trained, tmp_path, cheap_evaluation, stop):
    """--replace of a copy of the shared run, stopped; the printed command ends it bit-identical."""
    folder, name = copy_run(trained, tmp_path), signal.Signals(stop).name
    argv = train_args(tmp_path, epochs=2) + ["--replace", "--device", "cpu"]
    proc = start_cli(argv, cwd=tmp_path, env=ONE_THREAD)
    helpers.read_until(proc, "epoch   1/2")  # kills it and fails if never printed
    proc.send_signal(stop)
    code, out, err = helpers.finish(proc, timeout=120)
    assert code == 128 + stop and "Traceback" not in err and "epoch   2/2" not in out, err
    assert f"{name}: stopping after this step; the epochs already saved are kept" in err, err
    assert f"stopped in epoch 2; {folder / 'last.pt'} holds the run up to epoch 1. Resume" in err
    last = checkpoint.load(folder / "last.pt", resume=True)  # whole, and resumable
    best = checkpoint.load(folder / "best.pt")
    assert [h["epoch"] for h in last["history"]] == [1] == [best["epoch"]], last["history"]
    assert not (folder / "metrics.json").exists()  # the earlier run's evaluation went with it
    printed = shlex.split(err.split("Resume with:\n")[1])
    parser = main.build_parsers()["train"]
    resumed, original = parser.parse_args(printed[2:]), parser.parse_args(argv)
    assert printed[:2] == ["python", "main.py"] and "--latent-dim" not in printed, printed
    kept = ("epochs", "data_dir", "image_dir", "device", "iwae_k", "progress")
    assert [n for n in kept if getattr(resumed, n) != getattr(original, n)] == [], printed
    # the flags that are no stored setting are the ones a resume command repeats
    settings = {"--" + f.name.replace("_", "-") for f in fields(TrainConfig) + fields(VAEConfig)}
    others = {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - settings
    resumable = {*train_command.RESUME_FLAGS, *train_command.SWITCHES} - {"--epochs"}
    assert others - {"--help", "--resume", "--replace", "--checkpoint-dir"} == resumable
    code, out, err = run_main(printed[2:], tmp_path)
    assert resumed.resume == str(folder / "last.pt") and code == 0, err
    assert "resuming from epoch 1" in out and "epoch   2/2" in out, out
    same_run(trained.ckpt_dir, folder)


@needs_mnist
def test_ctrl_c_twice_ends_without_a_traceback_keeping_the_saved_epoch(tmp_path):
    argv = train_args(tmp_path, 10, 640) + ["--val-size", "200"]
    proc = start_cli(argv, cwd=tmp_path, env=ONE_THREAD)
    helpers.read_until(proc, "epoch   1/10")
    proc.send_signal(signal.SIGINT)
    err = helpers.read_until(proc, "SIGINT: stopping after this step", proc.stderr)
    assert proc.poll() is None, "the run ended before the second Ctrl-C"
    proc.send_signal(signal.SIGINT)  # while it stops: abort at once, or ignored if it is done
    code, out, rest = helpers.finish(proc, timeout=120)
    assert code == 130 and "Traceback" not in err + rest and "Exception ignored" not in err + rest
    assert "interrupted" in err + rest or "--resume" in err + rest, err + rest
    assert checkpoint.load(tmp_path / "ckpt" / "last.pt", resume=True)["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.pt", "last.pt"]


def test_ctrl_c_as_the_last_epoch_saves_keeps_ctrl_c_working(tmp_path, monkeypatch, evaluations):
    """Every epoch is kept, and the promised second Ctrl-C, in the final evaluation, ends it."""
    end_epoch = train.end_epoch
    monkeypatch.setattr(train, "end_epoch", lambda *args: end_epoch(*args) or ctrl_c())
    monkeypatch.setattr(evaluate, "finish_run", ctrl_c)
    code, out, err = run_main(train_args(tmp_path, epochs=1, subset=200) + ["--val-size", "200"])
    assert code == 130 and "SIGINT again aborts at once" in err and evaluations == [], err
    assert checkpoint.load(tmp_path / "ckpt" / "last.pt", resume=True)["epoch"] == 1


def test_a_binarized_averaged_run_resumes_exactly_and_another_seed_gives_another_run(tmp_path):
    """Fresh pixels at every step, and an average with its own update count: restored exactly."""
    mnist = fake_mnist(400, seed=1)
    settings = TrainConfig(batch_size=32, seed=5, val_size=100, binarize=True, ema=0.95)
    for folder, epochs in (("a", 2), ("b", 1), ("b", 2)):  # straight to 2, and 1 then resumed
        resumed = (folder, epochs) == ("b", 2)
        resume = checkpoint.load(tmp_path / "b" / "last.pt", resume=True) if resumed else None
        settings = replace(settings, epochs=epochs)
        run = train.start(settings, SMALL, mnist, tmp_path / folder, resume=resume)
        train.train(run, show_progress=False)
    same_run(tmp_path / "a", tmp_path / "b", metrics=False)
    ckpt = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["precision"] in ("fp32", "bf16")
    assert not all(torch.equal(v, ckpt["train_weights"][k]) for k, v in ckpt["model"].items())
    seen = []
    for seed in (1, 1, 7):  # the same seed gives the same start; another, other weights and draws
        run = train.start(TrainConfig(seed=seed, val_size=100), SMALL, mnist, tmp_path / "c")
        order = torch.cat(list(data.batches(run.train_x, 64, run.generators["shuffle"])))
        noise = torch.randn(5, generator=run.generators["noise"])
        seen.append((run.model.state_dict()["to_stats.weight"], run.val_x, order, noise))
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
    assert not any(torch.equal(a, b) for a, b in zip(seen[0], seen[2]))


def test_resume_a_changed_flag_a_done_run_a_stop(trained, tmp_path, evaluations, monkeypatch):
    """A changed model flag refused; a done run only evaluated; a stop in a new folder resumable."""
    source = copy_run(trained, tmp_path / "a")
    before = snapshot(source)  # nothing is written in it: the refusal leaves no lock, resume reads
    argv = ["--resume", source / "last.pt", "--data-dir", MNIST_DIR, "--no-progress"]
    code, _, err = run_main(argv + ["--latent-dim", "5"], tmp_path)
    words = "--latent-dim 5 differs from the checkpoint's 8", "--epochs may change"
    helpers.assert_one_line_error(code, err, *words)
    assert snapshot(source) == before and evaluations == []
    code, out, err = run_main(argv + ["--checkpoint-dir", tmp_path / "b"])  # into another folder
    assert code == 0 and "already trained 2 epochs" in out and len(evaluations) == 1, err
    assert not any(line.startswith("epoch ") for line in out.splitlines())
    assert evaluations[0]["path"] == source / "best.pt" and len(evaluations[0]["history"]) == 2
    assert evaluations[0]["metrics_path"] == tmp_path / "b" / "metrics.json"
    assert snapshot(source) == before
    step = train.train_step  # stopped before the new folder holds a checkpoint: it names source's
    monkeypatch.setattr(train, "train_step", lambda *args: ctrl_c() or step(*args))
    code, _, err = run_main(argv + ["--checkpoint-dir", tmp_path / "c", "--epochs", 3])
    resume = shlex.split(err.strip().splitlines()[-1])
    assert code == 130 and Path(resume[resume.index("--resume") + 1]).is_file(), err


def test_a_diverging_run_stops_naming_epoch_and_step_and_saves_nothing(trained, tmp_path):
    folder = copy_run(trained, tmp_path)
    ckpt = torch.load(folder / "last.pt", weights_only=True)  # goes on at a rate that blows it up
    helpers.resave(ckpt | {"config": ckpt["config"] | {"lr": 10.0}}, folder / "last.pt")
    before = snapshot(folder)
    args = ["--resume", folder / "last.pt", "--epochs", "3", "--data-dir", MNIST_DIR]
    code, out, err = run_main(args + ["--no-progress", "--image-dir", tmp_path / "img"], tmp_path)
    words = "epoch 3, step ", "the training loss became nan", "lower lr (this run: 10)"
    helpers.assert_one_line_error(code, err, *words)
    assert "the checkpoints already saved are kept as they were" in err and "epoch   3/3" not in out
    assert snapshot(folder) == before and not (tmp_path / "img").exists()
