"""End-to-end tests of the command line on small real subsets (they need MNIST_DIR)."""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from helpers import ROOT, MNIST_DIR, needs_mnist, run_main, train_args



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
    assert not list(trained.ckpt_dir.glob("*.tmp")) and not list(trained.ckpt_dir.glob(".*"))


@needs_mnist
def test_checkpoint_is_self_describing(trained):
    ckpt = torch.load(trained.ckpt_dir / "last.pt", weights_only=True)
    assert ckpt["format"] == "vae-mnist/1"
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
def test_same_seed_gives_identical_run(trained, tmp_path):
    run_main(train_args(tmp_path, epochs=2))
    same_run(trained.ckpt_dir, tmp_path / "ckpt")


@needs_mnist
def test_other_seed_gives_other_run(trained, tmp_path):
    run_main(train_args(tmp_path, epochs=1) + ["--seed", "7"])
    a = torch.load(trained.ckpt_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(a["to_stats.weight"], b["to_stats.weight"])


@needs_mnist
def test_resume_after_one_epoch_equals_uninterrupted(trained, tmp_path):
    run_main(train_args(tmp_path, epochs=1))
    assert torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["epoch"] == 1
    code, out, _ = run_main(["--resume", str(tmp_path / "ckpt" / "last.pt"), "--epochs", "2", "--data-dir", MNIST_DIR,
                             "--image-dir", str(tmp_path / "img"), "--iwae-k", "5", "--no-progress", "--no-compile"])
    assert code == 0 and "resuming from epoch 1" in out
    same_run(trained.ckpt_dir, tmp_path / "ckpt")


@needs_mnist
def test_resume_refuses_a_changed_model_flag(trained, tmp_path, capsys):
    code, out, err = run_main(["--resume", str(trained.ckpt_dir / "last.pt"), "--latent-dim", "5", "--data-dir", MNIST_DIR])
    assert code == 2 and "--latent-dim" in err and "--resume" in err and len(err.strip().splitlines()) == 1


@needs_mnist
def test_resume_of_a_finished_run_only_evaluates(trained, tmp_path):
    import shutil

    shutil.copytree(trained.ckpt_dir, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "last.pt").read_bytes()
    code, out, _ = run_main(["--resume", "--checkpoint-dir", str(tmp_path / "ckpt"), "--data-dir", MNIST_DIR,
                             "--image-dir", str(tmp_path / "img"), "--iwae-k", "5", "--no-progress"])
    assert code == 0 and "already trained 2 epochs" in out and "negative ELBO" in out
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == before


def run_cli(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@needs_mnist
def test_ctrl_c_mid_epoch_then_printed_resume_command_matches_uninterrupted(tmp_path):
    common = ["--epochs", "2", "--subset", "16000", "--data-dir", MNIST_DIR, "--iwae-k", "3", "--no-progress", "--no-compile"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = run_cli(common, tmp_path / "a")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    proc = run_cli(common, tmp_path / "b")
    for line in proc.stdout:
        if line.startswith("epoch   1/2"):
            break
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ckpt = torch.load(tmp_path / "b" / "models_mnist" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["partial"] is not None and 0 < ckpt["partial"]["step"] < 250
    command = out.splitlines()[out.splitlines().index(next(l for l in out.splitlines() if "Resume with" in l)) + 1]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "main.py", "--resume"]
    resumed = run_cli(argv[2:] + ["--iwae-k", "3", "--no-progress", "--no-compile"], tmp_path / "b")
    r_out, r_err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, r_err
    assert "resuming from epoch 1, step" in r_out
    same_run(tmp_path / "a" / "models_mnist", tmp_path / "b" / "models_mnist")


@needs_mnist
def test_truncated_data_file_is_one_line_exit_2(tmp_path):
    import shutil

    for f in Path(MNIST_DIR).glob("*-ubyte.gz"):
        shutil.copy(f, tmp_path / f.name)
    data = (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(data[: len(data) // 2])
    proc = run_cli(["--data-dir", str(tmp_path), "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ck")], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "t10k-labels-idx1-ubyte.gz" in err
    assert not (tmp_path / "ck" / "best.pt").exists()


@needs_mnist
def test_wrong_content_is_reported_by_md5(tmp_path):
    import gzip
    import shutil

    for f in Path(MNIST_DIR).glob("*-ubyte.gz"):
        shutil.copy(f, tmp_path / f.name)
    raw = bytearray(gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()))
    raw[5000] ^= 0xFF  # one pixel changed: same size and header, different content
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    code, out, err = run_main(["--data-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ck")])
    assert code == 2 and "md5" in err and "t10k-images-idx3-ubyte.gz" in err


@needs_mnist
def test_readme_notebook_code_runs(trained, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- notebook:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "models_mnist").mkdir()
    (tmp_path / "models_mnist" / "best.pt").write_bytes((trained.ckpt_dir / "best.pt").read_bytes())
    (tmp_path / "data").symlink_to(Path(MNIST_DIR).resolve())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md notebook block", "exec"), namespace)
    assert namespace["recon"].shape == (8, 1, 28, 28) and namespace["samples"].shape == (8, 1, 28, 28)
    assert namespace["ckpt"]["epoch"] == 2 and not namespace["vae"].training


def test_offline_without_data_is_one_line_exit_2(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # a closed local port: offline
    target = tmp_path / "nonexistent"
    code, out, err = run_main(["--data-dir", target, "--checkpoint-dir", tmp_path / "ck"])
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "download failed" in err and "--data-dir" in err
    assert not target.exists() and not (tmp_path / "ck").exists()


@needs_mnist
def test_binarized_resume_equals_uninterrupted(tmp_path):
    """--binarize draws fresh Bernoulli pixels every step: its generator must resume exactly too."""
    run_main(train_args(tmp_path / "a", epochs=2, subset=1000) + ["--binarize", "--iwae-k", "1"])
    run_main(train_args(tmp_path / "b", epochs=1, subset=1000) + ["--binarize", "--iwae-k", "1"])
    code, out, err = run_main(["--resume", tmp_path / "b" / "ckpt" / "last.pt", "--epochs", "2", "--data-dir", MNIST_DIR,
                               "--image-dir", tmp_path / "b" / "img", "--iwae-k", "1", "--no-progress"])
    assert code == 0, err
    assert torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)["config"]["binarize"] is True
    same_run(tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt")


@pytest.mark.parametrize("broken", ["magic", "md5"])
def test_bad_idx_files_through_the_cli_are_one_line_exit_2(tmp_path, broken):
    """Tiny IDX files the test writes: a wrong magic number, or valid files whose content is not MNIST's (md5)."""
    import idx_helpers

    idx_helpers.write_tiny_mnist(tmp_path, gz=False)
    if broken == "magic":  # train-images is the first file read
        path = tmp_path / "train-images-idx3-ubyte"
        raw = bytearray(path.read_bytes())
        raw[3] = 7  # magic 2051 -> 2055
        path.write_bytes(bytes(raw))
    code, out, err = run_main(["--data-dir", tmp_path, "--checkpoint-dir", tmp_path / "ck", "--no-progress"])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert ("magic number" in err and "train-images-idx3-ubyte" in err) if broken == "magic" else "md5" in err
    assert not (tmp_path / "ck").exists()


def test_learning_rate_schedules():
    config = {"lr": 1e-3, "epochs": 10, "lr_schedule": "cosine"}
    assert main.learning_rate(config, 0) == pytest.approx(1e-3)
    assert main.learning_rate(config, 5) == pytest.approx(5e-4)
    assert main.learning_rate(config, 10) == pytest.approx(0, abs=1e-12)
    assert main.learning_rate(dict(config, lr_schedule="constant"), 7.3) == 1e-3


@needs_mnist
def test_kl_warmup_cosine_and_compile_options_train_and_report_plain_loss(tmp_path):
    code, out, err = run_main(train_args(tmp_path, epochs=2, subset=640)[:-1]
                              + ["--kl-warmup", "2", "--lr-schedule", "cosine", "--compile", "--iwae-k", "1"])
    assert code == 0, err
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["config"]["kl_warmup"] == 2 and ckpt["config"]["lr_schedule"] == "cosine"
    for h in ckpt["history"]:  # the reported figures are the plain negative ELBO, whatever the KL weight was
        assert h["val_loss"] == pytest.approx(h["val_bce"] + h["val_kl"])
        assert h["train_loss"] == pytest.approx(h["train_bce"] + h["train_kl"])
    assert ckpt["optimizer"]["param_groups"][0]["lr"] < 1e-3  # the schedule moved the learning rate


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(main, "cpu_has_amx", lambda: False)
    assert main.pick_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(main, "cpu_has_amx", lambda: True)
    assert main.pick_precision("auto", cpu) == "bf16"
    assert main.pick_precision("fp32", cpu) == "fp32" and main.pick_precision("bf16", cpu) == "bf16"
    assert main.pick_precision("auto", torch.device("mps")) == "fp32"
    # a GPU with bf16 still trains in fp32 (TF32) by default: at batch 64 autocast's extra casts cost more than they save
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert main.pick_precision("auto", torch.device("cuda")) == "fp32"
    assert main.pick_precision("bf16", torch.device("cuda")) == "bf16"
    with pytest.raises(main.UserError, match="--precision fp32"):
        main.pick_precision("bf16", torch.device("mps"))


def test_bf16_step_rounds_but_keeps_fp32_weights_and_loss():
    from model import VAE

    x = torch.rand(16, 1, 28, 28) ** 3
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = main.prepare_model(VAE(latent_dim=8, channels=(8, 16), hidden_dim=32), torch.device("cpu"))
        opt = main.make_optimizer(model, 1e-3, torch.device("cpu"))
        step = main.train_step_fn(model, opt, compile_step=False, precision=precision)
        bce, kl = step(x, torch.Generator().manual_seed(1), 1.0)
        assert bce.dtype == torch.float32 and kl.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for state in opt.state.values() for k, v in state.items() if k != "step")
        results[precision] = (bce.item(), kl.item(), [p.detach().clone() for p in model.parameters()])
    (bce32, kl32, w32), (bce16, kl16, w16) = results["fp32"], results["bf16"]
    assert bce16 != bce32  # bf16 arithmetic really ran
    assert bce16 == pytest.approx(bce32, rel=1e-2) and kl16 == pytest.approx(kl32, rel=5e-2, abs=1e-2)
    assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(w32, w16))  # one Adam step moves each weight by about lr


@needs_mnist
def test_precision_is_stored_and_kept_on_resume(tmp_path):
    code, _, err = run_main(train_args(tmp_path, epochs=1, subset=640) + ["--precision", "bf16", "--ema", "0", "--out-conv", "0"])
    assert code == 0, err
    last = tmp_path / "ckpt" / "last.pt"
    assert torch.load(last, weights_only=True)["config"]["precision"] == "bf16"
    code, _, err = run_main(["--resume", str(last), "--epochs", "2", "--precision", "fp32", "--data-dir", MNIST_DIR])
    assert code == 2 and "--precision" in err and len(err.strip().splitlines()) == 1

    # a checkpoint from before --precision, --ema, --out-conv, --fc-layers and --norm existed resumes as it was
    # trained: fp32, no weight average, the architecture of then
    ckpt = torch.load(last, weights_only=True)
    for key in ("precision", "ema", "out_conv", "fc_layers", "norm"):
        del ckpt["config"][key]
    torch.save(ckpt, last)
    code, out, err = run_main(["--resume", str(last), "--epochs", "2", "--data-dir", MNIST_DIR, "--image-dir", str(tmp_path / "img"),
                               "--iwae-k", "1", "--no-progress"])
    assert code == 0, err
    config = torch.load(last, weights_only=True)["config"]
    assert "(fp32)" in out and config["precision"] == "fp32" and config["ema"] == 0.0 and config["out_conv"] == 0


def test_weight_average_ramps_its_decay_and_follows_the_weights():
    from model import VAE

    torch.manual_seed(0)
    model = VAE(latent_dim=4, channels=(4, 8), hidden_dim=0)
    average = main.WeightAverage(model, decay=0.9)
    assert not any(p.requires_grad for p in average.model.parameters())
    start = [p.detach().clone() for p in model.parameters()]
    expected = [p.clone() for p in start]
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the live weights move; the average must trail them
        average.update()
        decay = min(0.9, (1 + step) / (10 + step))  # 0.1, 0.18, ... then capped at 0.9
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    assert average.updates == 30
    for e, a, p in zip(expected, average.model.parameters(), model.parameters()):
        assert torch.allclose(a, e, atol=1e-4)
        assert (p - a).min() > 1  # the average trails weights that keep moving


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
def test_ema_checkpoint_holds_the_average_and_resumes_exactly(tmp_path):
    run_main(train_args(tmp_path / "a", epochs=2, subset=640) + ["--ema", "0.95", "--iwae-k", "1"])
    run_main(train_args(tmp_path / "b", epochs=1, subset=640) + ["--ema", "0.95", "--iwae-k", "1"])
    code, out, err = run_main(["--resume", tmp_path / "b" / "ckpt" / "last.pt", "--epochs", "2", "--data-dir", MNIST_DIR,
                               "--image-dir", tmp_path / "b" / "img", "--iwae-k", "1", "--no-progress"])
    assert code == 0, err
    same_run(tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt")
    ckpt = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["config"]["ema"] == 0.95
    differs = [k for k in ckpt["model"] if not torch.equal(ckpt["model"][k], ckpt["train_weights"][k])]
    assert differs  # "model" is the average, not the live weights
    from model import VAE

    vae = VAE.from_checkpoint(tmp_path / "a" / "ckpt" / "best.pt")  # what a notebook gets is the average
    best = torch.load(tmp_path / "a" / "ckpt" / "best.pt", weights_only=True)
    assert all(torch.equal(v, best["model"][k]) for k, v in vae.state_dict().items())
