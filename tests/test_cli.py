"""A user's mistakes, run as a user runs them (`python main.py ...` in a subprocess, so a traceback would show):
each ends with one line on stderr and exit status 2, before long work, with nothing already saved damaged.
docs/errors.md lists them with the test that checks each."""
from __future__ import annotations

import gzip
import os
import resource
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import idx_helpers
from helpers import MNIST_DIR, assert_one_line_error, copy_run, needs_mnist, resave, run_cli, start_cli, train_args


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
    import checkpoint
    import train
    from model import VAE

    model = VAE()
    config = train.TRAIN_DEFAULTS | {"precision": "fp32"} | checkpoint.config_dict(model.config)
    resave({"format": checkpoint.FORMAT, "config": config, "model": model.state_dict()}, tmp_path / "mine.pt")
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
    resave(ckpt, folder / "last.pt")
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
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [".lock"]  # no temporary file left behind


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


# ----------------------------------------------------------------------------- hostile inputs: sizes, locks, interrupts


def wait_for_line(proc, text: str) -> str:
    """Read the process's stdout until a line holds `text` (the process keeps running); return what was read.
    Fail if the process ends first."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.wait()
    raise AssertionError(f"{text!r} never printed; exit {proc.returncode}\n{''.join(seen)}{proc.stderr.read()}")


def unreadable_data(folder: Path) -> Path:
    """A --data-dir whose four MNIST files are empty: reading them, or downloading, would be a data error instead."""
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize("argv,words", [
    (["evaluate", "--iwae-k", "100000000"], ["--iwae-k", "1 to 10,000"]),
    (["sample", "--n", "1000000000"], ["--n", "1 to 1,024"]),
    (["score", "--samples", "100000"], ["--samples", "1 to 1,000"]),
    (["--batch-size", "100000"], ["--batch-size", "1 to 4,096"]),
    (["--latent-dim", "5000"], ["--latent-dim", "1 to 1,024", "5000"]),
    (["--hidden-dim", "16384", "--fc-layers", "16"], ["8,106,621,409 weights", "50,000,000", "--hidden-dim", "--fc-layers"]),
])
def test_sizes_too_large_are_refused_before_the_data_is_read(tmp_path, argv, words):
    """Sizes that would take gigabytes or hours: one line naming the setting, before the (here unreadable) data is read."""
    data_dir = unreadable_data(tmp_path / "data")
    code, out, err = run_cli(argv + ["--data-dir", data_dir, "--checkpoint-dir" if argv[0].startswith("--") else "--image-dir",
                                     tmp_path / "out"], cwd=tmp_path)
    assert_one_line_error(code, err, *words)
    assert "train-images" not in err and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@needs_mnist
@pytest.mark.parametrize("argv,words", [
    (["--val-size", "1"], ["train on 59999 images and validate on 1", "at least 100", "--val-size"]),
    (["--subset", "5"], ["train on 5 images", "at least 100", "--subset"]),
    (["--exclude-digit", "3", "--val-size", "100"], ["train on 53779 images and validate on 90", "at least 100", "--exclude-digit"]),
])
def test_too_few_training_or_validation_images_is_one_line_exit_2(tmp_path, argv, words):
    code, out, err = run_cli(argv + ["--data-dir", MNIST_DIR, "--checkpoint-dir", tmp_path / "ckpt", "--image-dir", tmp_path / "img"],
                             cwd=tmp_path)
    assert_one_line_error(code, err, *words)
    assert "training on" not in out and not (tmp_path / "ckpt").exists() and not (tmp_path / "img").exists()


@pytest.mark.parametrize("argv", [["evaluate", "--checkpoint"], ["--resume"]])
def test_checkpoint_that_is_a_folder_is_called_a_folder(tmp_path, argv):
    (tmp_path / "models").mkdir()
    code, out, err = run_cli(argv + [tmp_path / "models", "--data-dir", tmp_path / "no-data"], cwd=tmp_path)
    assert_one_line_error(code, err, f"{tmp_path / 'models'} is a folder", argv[-1], "best.pt or last.pt")
    assert "no such checkpoint" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # the lock --resume took around it is gone again


def edit(ckpt: dict, what: str) -> None:
    """Change one value of a checkpoint, checking first that it holds what the edit expects."""
    if what == "lr fast":
        assert isinstance(ckpt["config"]["lr"], float)
        ckpt["config"]["lr"] = "fast"
    elif what == "latent_dim 32.0":
        assert ckpt["config"]["latent_dim"] == 32
        ckpt["config"]["latent_dim"] = 32.0
    elif what == "epoch -3":
        assert ckpt["epoch"] == 2
        ckpt["epoch"] = -3
    else:  # one weight changed
        ckpt["model"]["encoder.0.weight"][0, 0, 0, 0] += 1.0


USE_ARGS = {"evaluate": ["--data-dir", MNIST_DIR, "--iwae-k", "1"], "sample": [], "score": ["--data-dir", MNIST_DIR],
            "--resume": ["--data-dir", MNIST_DIR, "--iwae-k", "1", "--no-progress"]}


@needs_mnist
@pytest.mark.parametrize("command,name,what,renew,words", [
    ("evaluate", "best.pt", "lr fast", True, ["config lr = 'fast' is not a valid value"]),
    ("sample", "best.pt", "latent_dim 32.0", True, ["stored model config is invalid", "latent_dim", "32.0"]),
    ("score", "best.pt", "epoch -3", True, ["epoch -3 is out of range"]),
    ("--resume", "last.pt", "epoch -3", True, ["epoch -3 is out of range"]),
    ("evaluate", "best.pt", "a weight", False, ["do not match its checksum", "damaged or edited"]),
    ("--resume", "last.pt", "a weight", False, ["do not match its checksum"]),
])
def test_checkpoint_with_bad_values_or_altered_tensors_is_one_line_exit_2(trained, tmp_path, command, name, what, renew, words):
    """Values that fail their check (written with a renewed checksum, so that the value check is what is tested), and a
    weight changed without renewing the checksum: each command refuses the file in one line and writes nothing."""
    folder = copy_run(trained, tmp_path)
    ckpt = torch.load(folder / name, weights_only=True)
    edit(ckpt, what)
    if renew:
        resave(ckpt, folder / name)
    else:
        torch.save(ckpt, folder / name)
    files = lambda: {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".lock"}  # --resume rewrites .lock's pid
    before = files()
    which = [command, folder / name] if command == "--resume" else [command, "--checkpoint", folder / name]
    code, out, err = run_cli(which + USE_ARGS[command] + ["--image-dir", tmp_path / "img"], cwd=tmp_path)
    assert_one_line_error(code, err, str(folder / name), *words)
    assert files() == before and not (tmp_path / "img").exists()


@needs_mnist
def test_best_pt_that_is_a_folder_is_one_line_saying_so(tmp_path):
    """A folder named best.pt where the run saves: one line saying it is a folder (not 'free some disk space'),
    and what the folder holds, and the other files, are left as they were."""
    ckpt_dir = tmp_path / "ckpt"
    (ckpt_dir / "best.pt").mkdir(parents=True)
    (ckpt_dir / "best.pt" / "inside.txt").write_text("mine")
    (ckpt_dir / "notes.txt").write_text("also mine")
    code, out, err = run_cli(train_args(tmp_path, epochs=1, subset=640) + ["--iwae-k", "1"], cwd=tmp_path)
    assert_one_line_error(code, err, f"{ckpt_dir / 'best.pt'} is a folder, not a file", "move it away")
    assert "disk space" not in err and "training on" not in out  # found before the first step, not when saving
    assert not (ckpt_dir / ".lock").exists()  # a run that could not start leaves no lock file behind
    assert (ckpt_dir / "best.pt" / "inside.txt").read_text() == "mine" and (ckpt_dir / "notes.txt").read_text() == "also mine"
    assert sorted(p.name for p in ckpt_dir.iterdir() if not p.name.startswith(".")) == ["best.pt", "notes.txt"]
    assert [p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")] == []


def digit_picture(path: Path, size=(90, 120)) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("L", size, 255)
    ImageDraw.Draw(img).ellipse((size[0] // 5, size[1] // 8, 4 * size[0] // 5, 7 * size[1] // 8), outline=0, width=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@needs_mnist
def test_reconstruct_gives_inputs_of_the_same_or_a_very_long_name_their_own_outputs(trained, tmp_path):
    from PIL import Image

    same_a, same_b = digit_picture(tmp_path / "a" / "x.png"), digit_picture(tmp_path / "b" / "x.png", (60, 90))
    long = digit_picture(tmp_path / ("d" * 196 + ".png"))  # a 200-character name: reconstructed_<it>.png would be too long
    folder = copy_run(trained, tmp_path)
    use = ["--checkpoint", folder / "best.pt", "--data-dir", MNIST_DIR, "--image-dir", tmp_path / "img"]
    code, out, err = run_cli(["reconstruct", same_a, same_b, long] + use, cwd=tmp_path)
    assert code == 0 and err == "", err
    written = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert len(written) == 3 and written[1:] == ["reconstructed_x.png", "reconstructed_x_2.png"], written
    assert written[0].startswith("reconstructed_" + "d" * 80 + "-") and len(written[0]) < 120, written
    assert out.count("wrote") == 3 and f"{same_b}: " in out and f"wrote {tmp_path / 'img' / 'reconstructed_x_2.png'}" in out
    assert (tmp_path / "img" / "reconstructed_x.png").read_bytes() != (tmp_path / "img" / "reconstructed_x_2.png").read_bytes()

    Image.new("L", (40, 1), 255).save(tmp_path / "thin.png")  # one pixel high
    shutil.rmtree(tmp_path / "img")
    code, out, err = run_cli(["reconstruct", same_a, tmp_path / "thin.png", same_b] + use, cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    assert err == f"error: {tmp_path / 'thin.png'}: too small: 40 x 1 pixels; give a picture at least 8 pixels on each side\n"
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["reconstructed_x.png", "reconstructed_x_2.png"]


@needs_mnist
@pytest.mark.parametrize("when", ["while it saves", "while it shuts down"])
def test_second_ctrl_c_while_stopping_prints_no_traceback(tmp_path, when):
    """Ctrl-C after the first epoch, then Ctrl-C again: 0.2 s later, while the first is still saving (it then aborts
    the save), or once the run has printed how to resume and the interpreter is shutting down. Either way: exit 130,
    no traceback, and last.pt, if there is one, whole."""
    import checkpoint

    proc = start_cli(train_args(tmp_path, epochs=10, subset=640) + ["--iwae-k", "1"], cwd=tmp_path)
    try:
        wait_for_line(proc, "epoch   1/10")  # inside the training loop, where Ctrl-C means "stop and save"
        proc.send_signal(signal.SIGINT)
        if when == "while it saves":
            time.sleep(0.2)
        else:
            wait_for_line(proc, "python main.py --resume")  # the last line it prints: main() is returning
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the second Ctrl-C; the test proved nothing"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err  # not -2 either: killed by the signal while the interpreter shut down
    assert "Traceback" not in err and "Exception ignored" not in err, err
    last = tmp_path / "ckpt" / "last.pt"
    assert last.exists() or when == "while it saves"
    if last.exists():
        assert checkpoint.load(last, flag="--resume")["epoch"] >= 1
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")] == []


@needs_mnist
def test_resume_without_best_pt_cleans_up_holds_the_folder_and_writes_a_new_best(trained, tmp_path):
    """One run, three guarantees (they share its cost: a resumed run ends with the full evaluation).
    A copy of the shared run without best.pt, holding a temporary file left by a killed save (its writer's pid has
    exited), one whose writer is alive (this process) and a user's file, is resumed to 3 epochs:
    - it deletes only the dead writer's temporary, before training;
    - while it runs, a second training run into the same folder is refused in one line naming the folder and the
      first run's pid, and changes nothing;
    - it says best.pt is missing, then writes best.pt and evaluates it, exit 0, its files whole."""
    import subprocess
    import sys

    import checkpoint

    folder = copy_run(trained, tmp_path)
    (folder / "best.pt").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = folder / f".last.pt.{int(dead.stdout)}.k3j_9xq2.tmp"
    live = folder / f".best.pt.{os.getpid()}.a1b2c3d4.tmp"
    users = folder / ".notes.tmp"
    for p in (stale, live, users):
        p.write_bytes(b"half a checkpoint")
    first = start_cli(["--resume", folder / "last.pt", "--epochs", "3", "--data-dir", MNIST_DIR, "--iwae-k", "1", "--no-progress",
                       "--image-dir", tmp_path / "img"], cwd=tmp_path)
    try:
        head = wait_for_line(first, "training on")
        assert not stale.exists() and live.exists() and users.exists()
        code, out, err = run_cli(train_args(tmp_path, epochs=1, subset=640) + ["--iwae-k", "1"], cwd=tmp_path)  # into folder too
        assert_one_line_error(code, err, f"{folder} is in use by another training run (pid {first.pid})", "another --checkpoint-dir")
        assert first.poll() is None, "the first run ended before the second was refused; the test proved nothing"
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    out = head + out
    assert first.returncode == 0 and "Traceback" not in err, err
    assert f"note: {folder / 'best.pt'} is missing, so the next epoch's weights will become best.pt" in out
    assert "epoch   3/3" in out.split("saved best.pt")[0] and f"evaluating {folder / 'best.pt'}" in out
    best, last = checkpoint.load(folder / "best.pt"), checkpoint.load(folder / "last.pt", flag="--resume")
    assert best["epoch"] == last["epoch"] == 3 and "anomaly_reference" in best and (folder / "metrics.json").is_file()
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == sorted([live.name, users.name])
