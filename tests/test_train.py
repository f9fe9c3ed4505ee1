"""Training end to end on small real subsets: checkpoints, same-seed and resume guarantees, training options."""
from __future__ import annotations

import json
import math
import shlex
import signal
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import main
import train
from helpers import MNIST_DIR, copy_run, needs_mnist, resave, run_main, start_cli, train_args
from utils import UserError

@needs_mnist
def test_training_writes_checkpoint_pictures_and_finite_test_loss(trained):
    out = trained.output
    epoch_lines = [l for l in out.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "saved best.pt" in epoch_lines[0]
    assert all(key in epoch_lines[0] for key in ("train", "val", "bce", "kl"))
    for name in ("best.pt", "last.pt", "metrics.json"):
        assert (trained.ckpt_dir / name).is_file()
    for name in ("reconstructed_image.png", "samples.png", "loss_curves.png", "interpolation.png", "latent_space.png", "latent_traversal.png"):
        assert (trained.image_dir / name).stat().st_size > 2000
    line = next(l for l in out.splitlines() if "negative ELBO (test loss)" in l)
    test_loss = float(line.split()[-1])
    assert math.isfinite(test_loss) and 50 < test_loss < 400
    # no temporary file is left; the only hidden file is the lock that kept a second run out of the folder
    assert not list(trained.ckpt_dir.glob("*.tmp")) and [p.name for p in trained.ckpt_dir.glob(".*")] == [".lock"]


@needs_mnist
def test_checkpoint_is_self_describing(trained):
    ckpt = torch.load(trained.ckpt_dir / "last.pt", weights_only=True)
    assert ckpt["format"] == "vae-mnist/2" and ckpt["checksum"] == checkpoint.checksum(ckpt)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    assert {"epochs", "batch_size", "lr", "seed", "latent_dim", "channels", "hidden_dim"} <= set(ckpt["config"])
    assert {"train_loss", "val_loss", "val_bce", "val_kl", "seconds"} <= set(ckpt["history"][0])
    assert set(ckpt["versions"]) == {"torch", "torchvision", "python"}
    assert ckpt["best_val_loss"] == min(h["val_loss"] for h in ckpt["history"])
    best = torch.load(trained.ckpt_dir / "best.pt", weights_only=True)
    assert best["history"][-1]["val_loss"] == best["best_val_loss"]


def same_run(a: Path, b: Path) -> None:
    """Two checkpoint folders hold bitwise-identical weights, optimizer state, history (but wall time) and test figures."""
    ca, cb = (torch.load(d / "last.pt", weights_only=True) for d in (a, b))
    assert ("train_weights" in ca) == ("train_weights" in cb)
    for weights in ("model", "train_weights") if "train_weights" in ca else ("model",):
        for key in ca[weights]:
            assert torch.equal(ca[weights][key], cb[weights][key]), (weights, key)
    for pa, pb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]
    assert strip(ca["history"]) == strip(cb["history"])
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("test_loss", "test_bce", "test_kl", "test_iwae_nll", "active_units", "kl_per_dim"):
        assert ma[key] == mb[key], key


@needs_mnist
def test_other_seed_gives_other_weights_split_and_order(tmp_path):
    """--seed sets the initial weights, the validation split and the batch order (set up, not trained: that is all
    a seed decides before the first step)."""
    runs = []
    for seed in (1, 7):
        args = main.build_parsers()["train"].parse_args(train_args(tmp_path / str(seed), epochs=1) + ["--seed", str(seed)])
        trainer, _ = train.setup(args, tmp_path / str(seed) / "ckpt", resumed_from=None)
        runs.append((trainer.model.state_dict()["to_stats.weight"], trainer.val_x, torch.randperm(10, generator=trainer.generators["shuffle"])))
    (w1, val1, order1), (w7, val7, order7) = runs
    assert not torch.equal(w1, w7) and not torch.equal(val1, val7) and not torch.equal(order1, order7)


@needs_mnist
def test_resume_after_one_epoch_equals_uninterrupted(trained, tmp_path):
    """A second run with the same seed trains epoch 1 bit for bit as the first, and resumed for epoch 2 it ends
    identical to the uninterrupted run: same seed, same run; stopped and resumed, the same run."""
    run_main(train_args(tmp_path, epochs=1))
    assert torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["epoch"] == 1
    code, out, _ = run_main(["--resume", str(tmp_path / "ckpt" / "last.pt"), "--epochs", "2", "--data-dir", MNIST_DIR,
                             "--image-dir", str(tmp_path / "img"), "--iwae-k", "5", "--no-progress"])
    assert code == 0 and "resuming from epoch 1" in out
    same_run(trained.ckpt_dir, tmp_path / "ckpt")


@needs_mnist
def test_resume_refuses_a_changed_model_flag(trained):
    code, out, err = run_main(["--resume", str(trained.ckpt_dir / "last.pt"), "--latent-dim", "5", "--data-dir", MNIST_DIR])
    assert code == 2 and "--latent-dim" in err and "--resume" in err and len(err.strip().splitlines()) == 1


@needs_mnist
def test_resume_of_a_finished_run_only_evaluates(trained, tmp_path):
    copy_run(trained, tmp_path)
    before = (tmp_path / "ckpt" / "last.pt").read_bytes()
    code, out, _ = run_main(["--resume", "--checkpoint-dir", str(tmp_path / "ckpt"), "--data-dir", MNIST_DIR,
                             "--image-dir", str(tmp_path / "img"), "--iwae-k", "5", "--no-progress"])
    assert code == 0 and "already trained 2 epochs" in out and "negative ELBO" in out
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == before


@needs_mnist
def test_ctrl_c_mid_epoch_then_printed_resume_command_matches_uninterrupted(tmp_path):
    common = ["--epochs", "2", "--subset", "4000", "--data-dir", MNIST_DIR, "--iwae-k", "3", "--no-progress", "--device", "cpu"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = start_cli(common, tmp_path / "a")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    proc = start_cli(common, tmp_path / "b")
    for line in proc.stdout:
        if line.startswith("epoch   1/2"):
            break
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ckpt = torch.load(tmp_path / "b" / "models_mnist" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["partial"] is not None and 0 < ckpt["partial"]["step"] < math.ceil(4000 / 64)
    command = out.splitlines()[out.splitlines().index(next(l for l in out.splitlines() if "Resume with" in l)) + 1]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "main.py", "--resume"]
    resumed = start_cli(argv[2:] + ["--iwae-k", "3", "--no-progress"], tmp_path / "b")
    r_out, r_err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, r_err
    assert "resuming from epoch 1, step" in r_out
    same_run(tmp_path / "a" / "models_mnist", tmp_path / "b" / "models_mnist")


def test_learning_rate_schedules():
    config = {"lr": 1e-3, "epochs": 10, "lr_schedule": "cosine"}
    assert train.learning_rate(config, 0) == pytest.approx(1e-3)
    assert train.learning_rate(config, 5) == pytest.approx(5e-4)
    assert train.learning_rate(config, 10) == pytest.approx(0, abs=1e-12)
    assert train.learning_rate(dict(config, lr_schedule="constant"), 7.3) == 1e-3


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "cpu_has_amx", lambda: False)
    assert train.pick_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(train, "cpu_has_amx", lambda: True)
    assert train.pick_precision("auto", cpu) == "bf16"
    assert train.pick_precision("fp32", cpu) == "fp32" and train.pick_precision("bf16", cpu) == "bf16"
    assert train.pick_precision("auto", torch.device("mps")) == "fp32"
    # a GPU with bf16 still trains in fp32 (TF32) by default: at batch 64 autocast's extra casts cost more than they save
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert train.pick_precision("auto", torch.device("cuda")) == "fp32"
    assert train.pick_precision("bf16", torch.device("cuda")) == "bf16"
    with pytest.raises(UserError, match="--precision fp32"):
        train.pick_precision("bf16", torch.device("mps"))


def test_bf16_step_rounds_but_keeps_fp32_weights_and_loss():
    from model import VAE
    from utils import prepare_model

    x = torch.rand(16, 1, 28, 28) ** 3
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = prepare_model(VAE(latent_dim=8, channels=(8, 16), hidden_dim=32), torch.device("cpu"))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        bce, kl = train.train_step(model, opt, None, x, torch.Generator().manual_seed(1), kl_weight=1.0, precision=precision)
        assert bce.dtype == torch.float32 and kl.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for state in opt.state.values() for k, v in state.items() if k != "step")
        results[precision] = (bce.item(), kl.item(), [p.detach().clone() for p in model.parameters()])
    (bce32, kl32, w32), (bce16, kl16, w16) = results["fp32"], results["bf16"]
    assert bce16 != bce32  # bf16 arithmetic really ran
    assert bce16 == pytest.approx(bce32, rel=1e-2) and kl16 == pytest.approx(kl32, rel=5e-2, abs=1e-2)
    assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(w32, w16))  # one Adam step moves each weight by about lr


@needs_mnist
def test_training_options_are_stored_and_kept_on_resume(tmp_path):
    """--precision, --kl-warmup and --lr-schedule train, are stored, and the reported losses stay the plain negative ELBO."""
    code, _, err = run_main(train_args(tmp_path, epochs=1, subset=640) + ["--precision", "bf16", "--ema", "0", "--out-conv", "0",
                                                                         "--kl-warmup", "2", "--lr-schedule", "cosine", "--iwae-k", "1"])
    assert code == 0, err
    last = tmp_path / "ckpt" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["config"]["precision"] == "bf16" and ckpt["config"]["kl_warmup"] == 2 and ckpt["config"]["lr_schedule"] == "cosine"
    for h in ckpt["history"]:  # the reported figures are the plain negative ELBO, whatever the KL weight was
        assert h["val_loss"] == pytest.approx(h["val_bce"] + h["val_kl"])
        assert h["train_loss"] == pytest.approx(h["train_bce"] + h["train_kl"])
    assert ckpt["optimizer"]["param_groups"][0]["lr"] < 1e-3  # the schedule moved the learning rate
    code, _, err = run_main(["--resume", str(last), "--epochs", "2", "--precision", "fp32", "--data-dir", MNIST_DIR])
    assert code == 2 and "--precision" in err and len(err.strip().splitlines()) == 1


def test_weight_average_ramps_its_decay_and_follows_the_weights():
    from torch.optim.swa_utils import AveragedModel

    from model import VAE

    assert train.weight_average(VAE(latent_dim=4, channels=(4, 8), hidden_dim=0), 0.0) is None  # --ema 0: no average

    torch.manual_seed(0)
    model = VAE(latent_dim=4, channels=(4, 8), hidden_dim=0, norm="batch")
    average = train.weight_average(model, 0.9)
    assert isinstance(average, AveragedModel)
    expected = None
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the live weights move; the average must trail them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.num_batches_tracked += 1
        average.update_parameters(model)
        live = [p.detach().clone() for p in model.parameters()]
        if expected is None:  # the first update copies the weights
            expected = live
        else:
            decay = min(0.9, (1 + step) / (10 + step))  # 0.18, 0.25, ... then capped at 0.9
            expected = [decay * e + (1 - decay) * p for e, p in zip(expected, live)]
    assert int(average.n_averaged) == 30
    for e, a, p in zip(expected, average.module.parameters(), model.parameters()):
        assert torch.allclose(a, e, atol=1e-4)
        assert (p - a).min() > 1  # the average trails weights that keep moving
    counters = [m.num_batches_tracked for m in average.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert counters and all(int(c) == 30 for c in counters)  # integer buffers are copied, not averaged


def test_ema_flag_must_be_a_decay_below_one():
    for bad in ("1", "1.5", "-0.1", "x"):
        code, _, err = run_main(["--ema", bad])
        assert code == 2 and "--ema" in err and len(err.strip().splitlines()) == 1


def test_kl_warmup_flag_must_not_be_negative(tmp_path):
    # a negative warm-up gave a negative KL weight (training that rewards a spread-out posterior) without a word
    for bad in ("-1", "1.5", "x"):
        code, _, err = run_main(["--kl-warmup", bad, "--data-dir", tmp_path / "no-data", "--checkpoint-dir", tmp_path / "ck"])
        assert code == 2 and "--kl-warmup" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ck").exists()


@needs_mnist
def test_binarized_averaged_run_resumes_exactly_and_saves_the_average(tmp_path):
    """--binarize draws fresh Bernoulli pixels every step and --ema keeps an average with its own update count: both
    resume exactly. "model" holds the average (what a notebook gets), "train_weights" the weights Adam trains."""
    flags = ["--binarize", "--ema", "0.95", "--iwae-k", "1"]
    run_main(train_args(tmp_path / "a", epochs=2, subset=1000) + flags)
    run_main(train_args(tmp_path / "b", epochs=1, subset=1000) + flags)
    code, out, err = run_main(["--resume", tmp_path / "b" / "ckpt" / "last.pt", "--epochs", "2", "--data-dir", MNIST_DIR,
                               "--image-dir", tmp_path / "b" / "img", "--iwae-k", "1", "--no-progress"])
    assert code == 0, err
    same_run(tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt")
    ckpt = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["config"]["ema"] == 0.95 and ckpt["config"]["binarize"] is True
    differs = [k for k in ckpt["model"] if not torch.equal(ckpt["model"][k], ckpt["train_weights"][k])]
    assert differs  # "model" is the average, not the live weights
    vae, _ = checkpoint.load_model(tmp_path / "a" / "ckpt" / "best.pt")  # what a notebook gets is the average
    best = torch.load(tmp_path / "a" / "ckpt" / "best.pt", weights_only=True)
    assert all(torch.equal(v, best["model"][k]) for k, v in vae.state_dict().items())


@needs_mnist
def test_resume_into_another_folder_evaluates_the_best_checkpoint_it_came_from(trained, tmp_path):
    """--resume A/last.pt --checkpoint-dir B with nothing left to train: B/best.pt was never written, so A/best.pt is evaluated."""
    source = copy_run(trained, tmp_path / "a")
    code, out, err = run_main(["--resume", source / "last.pt", "--checkpoint-dir", tmp_path / "b", "--data-dir", MNIST_DIR,
                               "--image-dir", tmp_path / "img", "--iwae-k", "1", "--no-progress"])
    assert code == 0, err
    assert f"evaluating {source / 'best.pt'}" in out and not (tmp_path / "b" / "best.pt").exists()


@needs_mnist
def test_resume_of_a_checkpoint_from_another_device_reseeds_its_noise_reproducibly(trained, tmp_path):
    """A CUDA generator's state (16 bytes) does not fit a CPU generator: the noise is re-seeded from seed and step count."""
    runs = []
    for name in ("a", "b"):
        folder = copy_run(trained, tmp_path / name)
        ckpt = torch.load(folder / "last.pt", weights_only=True)
        ckpt["rng"]["noise"] = torch.arange(16, dtype=torch.uint8)  # the shape of a CUDA Philox state: seed and offset
        ckpt["rng"]["device"] = "cuda"
        resave(ckpt, folder / "last.pt")
        code, out, err = run_main(["--resume", folder / "last.pt", "--epochs", "3", "--data-dir", MNIST_DIR,
                                   "--image-dir", tmp_path / name / "img", "--iwae-k", "1", "--no-progress"])
        assert code == 0, err
        assert "another kind of device" in out and "noise generator was re-seeded" in out
        runs.append(torch.load(folder / "last.pt", weights_only=True))
    assert runs[0]["epoch"] == 3 and runs[0]["rng"]["device"] == "cpu"
    assert all(torch.equal(runs[0]["model"][k], runs[1]["model"][k]) for k in runs[0]["model"])
