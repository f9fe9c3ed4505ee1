"""A user's mistakes, run as a user runs them (`python main.py ...` in a subprocess, so a traceback would show):
each ends with one line on stderr and exit status 2, before long work, with nothing already saved damaged.
docs/errors.md lists them with the test that checks each."""
from __future__ import annotations

import gzip
import resource
import shutil
from pathlib import Path

import pytest
import torch

import idx_helpers
from helpers import MNIST_DIR, assert_one_line_error, copy_run, needs_mnist, run_cli, train_args


def mnist_copy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(MNIST_DIR).glob("*-ubyte.gz"):
        shutil.copy(f, folder / f.name)
    return folder


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("argv,flag", [
    (["--epochs", "0"], "--epochs"), (["--batch-size", "x"], "--batch-size"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--seed", str(2**64)], "--seed"), (["--seed", "-1"], "--seed"), (["--exclude-digit", "12"], "--exclude-digit"),
    (["--ema", "1"], "--ema"), (["--kl-warmup", "-1"], "--kl-warmup"), (["--device", "tpu"], "--device"),
    (["evaluate", "--iwae-k", "0"], "--iwae-k"), (["sample", "--n", "0"], "--n"), (["sample", "--seed", str(2**64)], "--seed"),
    (["score", "--method", "magic"], "--method"), (["reconstruct", "x.png", "--method", "magic"], "--method"),
])
def test_bad_flag_is_one_line_exit_2(tmp_path, argv, flag):
    code, out, err = run_cli(argv + ["--data-dir", tmp_path / "no-data"], cwd=tmp_path)
    assert_one_line_error(code, err, flag)
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing downloaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_a_gpu_that_is_not_there_is_one_line_exit_2(tmp_path):
    code, out, err = run_cli(["--device", "cuda", "--data-dir", tmp_path / "no-data"], cwd=tmp_path)
    assert_one_line_error(code, err, "--device cuda", "no CUDA GPU")


# ----------------------------------------------------------------------------- output folders


@pytest.mark.parametrize("flag", ["--image-dir", "--checkpoint-dir"])
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_unwritable_output_folder_is_reported_before_training(tmp_path, flag, where):
    (tmp_path / "taken").write_text("a file, not a folder")
    target = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "sub"
    code, out, err = run_cli([flag, target, "--data-dir", tmp_path / "no-data"], cwd=tmp_path)
    assert_one_line_error(code, err, flag, "not a folder")
    assert "training on" not in out and not (tmp_path / "no-data").exists()  # stopped before the data and the first step


@pytest.mark.parametrize("command", ["evaluate", "sample", "score"])
def test_unwritable_image_dir_is_reported_before_loading_anything(tmp_path, command):
    (tmp_path / "taken").write_text("")
    code, out, err = run_cli([command, "--image-dir", tmp_path / "taken", "--checkpoint", tmp_path / "nope.pt"], cwd=tmp_path)
    assert_one_line_error(code, err, "--image-dir", "taken")


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("command", ["evaluate", "sample", "score"])
def test_missing_or_foreign_checkpoint_is_one_line_exit_2(tmp_path, command):
    code, out, err = run_cli([command, "--checkpoint", tmp_path / "nope.pt", "--data-dir", tmp_path], cwd=tmp_path)
    assert_one_line_error(code, err, "nope.pt", "no such checkpoint", "--checkpoint PATH")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    code, out, err = run_cli([command, "--checkpoint", tmp_path / "notes.pt", "--data-dir", tmp_path], cwd=tmp_path)
    assert_one_line_error(code, err, "notes.pt", "not a checkpoint")


def test_resume_of_a_weights_only_checkpoint_is_one_line_exit_2(tmp_path):
    """A checkpoint saved from a notebook (format, config, model) loads for use, but has no training state to resume."""
    from model import VAE, config_dict

    model = VAE()
    torch.save({"format": "vae-mnist/1", "config": config_dict(model.config), "model": model.state_dict()}, tmp_path / "mine.pt")
    code, out, err = run_cli(["--resume", tmp_path / "mine.pt", "--data-dir", tmp_path / "no-data"], cwd=tmp_path)
    assert_one_line_error(code, err, "mine.pt", "cannot be resumed", "optimizer")
    code, out, err = run_cli(["--resume", "--data-dir", tmp_path / "no-data"], cwd=tmp_path)  # no models_mnist/last.pt here
    assert_one_line_error(code, err, "last.pt", "no such checkpoint", "--resume PATH")


# ----------------------------------------------------------------------------- data


def test_offline_without_data_is_one_line_exit_2(tmp_path):
    """torchvision's mirrors replaced by a closed local port: the download fails at once, as offline."""
    script = ("import sys, torchvision; torchvision.datasets.MNIST.mirrors = ['http://127.0.0.1:9/']; "
              "sys.argv = ['main.py'] + sys.argv[1:]; import main; sys.exit(main.main())")
    import subprocess
    import sys

    from helpers import ROOT
    proc = subprocess.run([sys.executable, "-c", script, "--data-dir", str(tmp_path / "nonexistent"), "--checkpoint-dir", str(tmp_path / "ck")],
                          cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "download failed", "--data-dir")
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("broken", ["magic", "md5"])
def test_bad_idx_files_are_one_line_exit_2(tmp_path, broken):
    """Tiny IDX files the test writes: a wrong magic number, or valid files whose content is not MNIST's (md5)."""
    idx_helpers.write_tiny_mnist(tmp_path, gz=False)
    if broken == "magic":  # train-images is the first file read
        path = tmp_path / "train-images-idx3-ubyte"
        raw = bytearray(path.read_bytes())
        raw[3] = 7  # magic 2051 -> 2055
        path.write_bytes(bytes(raw))
    code, out, err = run_cli(["--data-dir", tmp_path, "--checkpoint-dir", tmp_path / "ck", "--no-progress"], cwd=tmp_path)
    assert_one_line_error(code, err, *(["magic number", "train-images-idx3-ubyte"] if broken == "magic" else ["md5"]))
    assert not (tmp_path / "ck").exists()


@needs_mnist
@pytest.mark.parametrize("damage", ["truncated", "one pixel changed"])
def test_damaged_real_data_file_is_one_line_exit_2(tmp_path, damage):
    folder = mnist_copy(tmp_path / "mnist")
    if damage == "truncated":
        path = folder / "t10k-labels-idx1-ubyte.gz"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path = folder / "t10k-images-idx3-ubyte.gz"
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[5000] ^= 0xFF  # same size and header, different content
        path.write_bytes(gzip.compress(bytes(raw)))
    code, out, err = run_cli(["--data-dir", folder, "--epochs", "1", "--checkpoint-dir", tmp_path / "ck"], cwd=tmp_path)
    assert_one_line_error(code, err, path.name, *(["md5"] if damage != "truncated" else []))
    assert not (tmp_path / "ck" / "best.pt").exists()


# ----------------------------------------------------------------------------- training that goes wrong


@needs_mnist
def test_diverging_loss_stops_and_keeps_the_last_good_checkpoints(trained, tmp_path):
    """A run whose loss turns NaN stops at once, names the epoch and step, and does not overwrite best.pt or last.pt.
    The learning rate stored in a copy of the shared run is raised to 1e12, so epoch 3 diverges after two good epochs."""
    folder = copy_run(trained, tmp_path)
    ckpt = torch.load(folder / "last.pt", weights_only=True)
    ckpt["config"]["lr"] = 1e12
    torch.save(ckpt, folder / "last.pt")
    before = {name: (folder / name).read_bytes() for name in ("best.pt", "last.pt")}
    code, out, err = run_cli(["--resume", folder / "last.pt", "--epochs", "4", "--data-dir", MNIST_DIR, "--no-progress"], cwd=tmp_path)
    assert_one_line_error(code, err, "epoch 3, step", "nan", "new run with a lower --lr")
    assert "epoch   3/4" not in out
    assert {name: (folder / name).read_bytes() for name in before} == before


@needs_mnist
def test_diverging_first_epoch_says_no_checkpoint_was_written(tmp_path):
    code, out, err = run_cli(train_args(tmp_path, epochs=1, subset=640) + ["--lr", "1e12"], cwd=tmp_path)
    assert_one_line_error(code, err, "epoch 1, step", "no checkpoint was written")
    assert not (tmp_path / "ckpt" / "best.pt").exists() and not (tmp_path / "ckpt" / "last.pt").exists()


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # 1 MB: a checkpoint (about 11 MB) cannot be written


@needs_mnist
def test_full_disk_keeps_the_previous_checkpoint_and_says_so(trained, tmp_path):
    """Disk full, simulated by a 1 MB file-size limit in the child process: the next save fails with one line,
    and the checkpoints already there stay whole and loadable."""
    folder = copy_run(trained, tmp_path)
    before = {name: (folder / name).read_bytes() for name in ("best.pt", "last.pt")}
    code, out, err = run_cli(["--resume", folder / "last.pt", "--epochs", "3", "--data-dir", MNIST_DIR, "--no-progress",
                              "--image-dir", tmp_path / "img"], cwd=tmp_path, preexec_fn=limit_file_size)
    assert_one_line_error(code, err, "cannot write", "File too large", "untouched")
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert torch.load(folder / "best.pt", weights_only=True)["epoch"] == 2
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left behind


# ----------------------------------------------------------------------------- the user's own images


@needs_mnist
def test_reconstruct_reports_each_bad_image_in_one_line_and_processes_the_good_ones(trained, tmp_path):
    from PIL import Image, ImageDraw

    img = Image.new("L", (90, 120), 255)
    ImageDraw.Draw(img).ellipse((20, 15, 70, 105), outline=0, width=9)
    img.save(tmp_path / "mine.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (tmp_path / "readme.txt").write_text("not a picture")
    folder = copy_run(trained, tmp_path)
    code, out, err = run_cli(["reconstruct", tmp_path / "broken.png", tmp_path / "mine.png", tmp_path / "readme.txt",
                              "--checkpoint", folder / "best.pt", "--data-dir", MNIST_DIR, "--image-dir", tmp_path / "img",
                              "--samples", "1", "--method", "elbo"], cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 2 and "broken.png" in err and "readme.txt" in err
    assert "mine.png: elbo score" in out and "percentile" in out and (tmp_path / "img" / "reconstructed_mine.png").is_file()
