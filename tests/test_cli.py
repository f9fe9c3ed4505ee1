"""The command line as a user meets it: `python main.py ...` in its own process (helpers.start_cli), so that a
traceback, a hang or a wrong exit status would show. A user's mistake is one line on stderr and exit status 2,
found before long work, with nothing already saved changed. docs/errors.md lists each case with its test."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import MNIST_DIR, ROOT, assert_one_line_error, copy_run, needs_mnist, resave, start_cli, train_args
from PIL import Image, ImageDraw

import checkpoint
import data

SHIPPED_NAME = "pretrained/vae-mnist.pt: the shipped model, epoch 20 of 20 on 55,000 training images"


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a started process; one still running after `timeout` (a hang) fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s, killed\nstdout: {out}\nstderr: {err}")
    return proc.returncode, out, err


def run(argv: list, cwd: Path, timeout: float = 180, **kw) -> tuple[int, str, str]:
    return finish(start_cli(argv, cwd, **kw), timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unreadable_data(folder: Path) -> Path:
    """A --data-dir holding the four MNIST names as empty files: reading them is an error, and nothing is
    downloaded. A check that passes only before the data is read shows its own message instead."""
    folder.mkdir(parents=True)
    for name in data.MNIST_FILES:
        (folder / name).write_bytes(b"")
    return folder


def digit(path: Path, size=(90, 120), frames: int = 1) -> Path:
    """A picture of a zero (several frames of an animated GIF when frames > 1)."""
    images = []
    for i in range(frames):
        img = Image.new("L", size, 255)
        box = (size[0] // 5 + 3 * i, size[1] // 8, 4 * size[0] // 5, 7 * size[1] // 8)
        ImageDraw.Draw(img).ellipse(box, outline=0, width=9)
        images.append(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=frames > 1, append_images=images[1:])
    return path


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--batch-size", "x"], ["--batch-size", "got x"]),
        (["--lr", "nan"], ["--lr", "got nan"]),
        (["sample", "--seed", str(2**64)], ["--seed", str(2**64)]),
        (["score", "--method", "magic"], ["--method", "magic"]),
        (["evaluate", "--iwae-k", "100000000"], ["--iwae-k", "1 to 10,000"]),
        (["sample", "--n", "1000000000"], ["--n", "1 to 1,024"]),
        (["score", "--samples", "100000"], ["--samples", "1 to 1,000"]),
        (["--batch-size", "100000"], ["--batch-size", "1 to 4,096"]),
        (["--latent-dim", "5000"], ["--latent-dim", "1 to 1,024", "5000"]),
        (["--hidden-dim", "16384", "--fc-layers", "16"], ["weights", "50,000,000", "--hidden-dim", "--fc-layers"]),
        pytest.param(
            ["--device", "cuda"],
            ["--device cuda", "no CUDA GPU"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU"),
        ),
    ],
)
def test_bad_flag_is_one_line_before_the_data_is_read_and_creates_nothing(tmp_path, argv, words):
    nodata = unreadable_data(tmp_path / "data")
    code, out, err = run(argv + ["--data-dir", nodata], cwd=tmp_path)
    assert_one_line_error(code, err, *words)
    assert err.count("choose") <= 1, err  # one piece of advice, not the same twice in other words
    assert "train-images" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# ----------------------------------------------------------------------------- output folders


@pytest.mark.parametrize(
    "command,flag,under",
    [
        ([], "--checkpoint-dir", False),
        ([], "--image-dir", True),
        (["evaluate"], "--image-dir", False),
        (["sample"], "--image-dir", True),
        (["score"], "--image-dir", False),
    ],
)
def test_output_folder_that_is_a_file_is_named_before_anything_is_loaded(tmp_path, command, flag, under):
    """Named before the data is read (train) or the checkpoint loaded (evaluate, sample, score: it does not exist)."""
    (tmp_path / "taken").write_text("a file")
    target = tmp_path / "taken" / "sub" if under else tmp_path / "taken"
    folder = unreadable_data(tmp_path / "data")
    argv = command + [flag, target, "--data-dir", folder] + (["--checkpoint", tmp_path / "no.pt"] if command else [])
    code, out, err = run(argv, cwd=tmp_path)
    assert_one_line_error(code, err, f"{flag} {target}", f"{tmp_path / 'taken'} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "taken"]
    assert (tmp_path / "taken").read_text() == "a file"


# ----------------------------------------------------------------------------- checkpoints


def bad_checkpoint(kind: str, tmp_path: Path, request) -> Path:
    """A checkpoint path of the given kind; the last two are edits of a copy of the shared run."""
    if kind == "missing":
        return tmp_path / "nope.pt"
    if kind == "folder":
        (tmp_path / "models").mkdir()
        return tmp_path / "models"
    if kind == "text":
        (tmp_path / "notes.pt").write_text("not a checkpoint\n")
        return tmp_path / "notes.pt"
    path = copy_run(request.getfixturevalue("trained"), tmp_path) / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    if kind == "bad value":  # checksum renewed: the range check must catch it
        ckpt["config"]["lr"] = -1.0
        resave(ckpt, path)
    else:  # one weight changed, the checksum left as it was
        ckpt["model"]["encoder.0.weight"].view(-1)[0] += 1.0
        torch.save(ckpt, path)
    return path


CHECKPOINT_WORDS = {
    "missing": ["no such checkpoint"],
    "folder": ["is a folder", "best.pt or last.pt"],
    "text": ["not a checkpoint"],
    "bad value": ["config lr must be a number", "got -1.0"],
    "changed weight": ["do not match its checksum"],
}


@pytest.mark.parametrize(
    "command,kind",
    [
        ("evaluate", "changed weight"),
        ("evaluate", "missing"),
        ("sample", "bad value"),
        ("score", "text"),
        ("reconstruct", "folder"),
        ("demo", "missing"),
        ("--resume", "bad value"),
        ("--resume", "folder"),
    ],
)
def test_unusable_checkpoint_is_one_line_naming_it_and_nothing_is_written(tmp_path, request, command, kind):
    path = bad_checkpoint(kind, tmp_path, request)
    nodata, picture = unreadable_data(tmp_path / "data"), digit(tmp_path / "pics" / "zero.png")
    argv = {
        "--resume": ["--resume", path, "--data-dir", nodata, "--image-dir", tmp_path / "img"],
        "demo": ["demo", "--checkpoint", path, "--port", "0"],
        "reconstruct": ["reconstruct", picture, "--checkpoint", path, "--image-dir", tmp_path / "img"],
    }.get(command, [command, "--checkpoint", path, "--data-dir", nodata, "--image-dir", tmp_path / "img"])
    before = snapshot(tmp_path)
    code, out, err = run(argv, cwd=tmp_path, timeout=120)
    flag = "--resume" if command == "--resume" else "--checkpoint"
    assert_one_line_error(code, err, str(path), *CHECKPOINT_WORDS[kind])
    assert kind not in ("missing", "folder") or flag in err
    assert snapshot(tmp_path) == before and not (tmp_path / "img").exists()


# ----------------------------------------------------------------------------- an earlier run is never lost


@needs_mnist
def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_before_anything_is_read(trained, tmp_path):
    folder = copy_run(trained, tmp_path)
    before = snapshot(folder)
    argv = train_args(tmp_path) + ["--data-dir", unreadable_data(tmp_path / "data")]
    code, out, err = run(argv, cwd=tmp_path)
    words = [f"{folder} already holds a run (best.pt and last.pt)", "--resume", "another --checkpoint-dir", "--replace"]
    assert_one_line_error(code, err, *words)
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)
    assert not (tmp_path / "img").exists()


def test_a_folder_named_best_pt_is_named_as_a_folder(tmp_path):
    (tmp_path / "ckpt" / "best.pt").mkdir(parents=True)
    (tmp_path / "ckpt" / "best.pt" / "mine.txt").write_text("mine")
    argv = train_args(tmp_path) + ["--data-dir", unreadable_data(tmp_path / "data")]
    code, out, err = run(argv, cwd=tmp_path)
    assert_one_line_error(code, err, f"{tmp_path / 'ckpt' / 'best.pt'} is a folder, not a file")
    assert snapshot(tmp_path / "ckpt") == {"best.pt/mine.txt": b"mine"}


def read_until(proc: subprocess.Popen, text: str) -> str:
    """Read stdout until a line holds text; fail if the process ends first."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    pytest.fail(f"{text!r} never printed\n{''.join(seen)}{proc.stderr.read()}")


@pytest.fixture(scope="module")
def replaced_then_hung_up(trained, tmp_path_factory):
    """A copy of the shared run, then a new run into its folder with --replace and another --latent-dim, sent SIGHUP
    (a closed terminal) once its first epoch is saved: (folder, exit status, stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("replace")
    folder = copy_run(trained, tmp)
    proc = start_cli(train_args(tmp, epochs=10) + ["--replace", "--latent-dim", "6"], cwd=tmp)
    head = read_until(proc, "epoch   1/10")
    proc.send_signal(signal.SIGHUP)
    code, out, err = finish(proc, timeout=120)
    return folder, code, head + out, err


@needs_mnist
def test_replace_deletes_the_earlier_run_and_starts_a_new_one(replaced_then_hung_up):
    folder, code, out, err = replaced_then_hung_up
    last = checkpoint.load(folder / "last.pt")
    assert last["config"]["latent_dim"] == 6 and last["config"]["epochs"] == 10
    assert [h["epoch"] for h in last["history"]] == list(range(1, last["epoch"] + 1))
    assert checkpoint.load(folder / "best.pt")["config"]["latent_dim"] == 6
    assert not (folder / "metrics.json").exists()  # the earlier run's evaluation went with it


@needs_mnist
def test_sighup_during_training_stops_like_ctrl_c(replaced_then_hung_up):
    folder, code, out, err = replaced_then_hung_up
    assert code == 128 + signal.SIGHUP and "Traceback" not in err, err
    assert "SIGHUP" in err and f"python main.py --resume {folder / 'last.pt'}" in err, err
    ckpt = checkpoint.load(folder / "last.pt", resume=True)  # whole, and resumable
    assert ckpt["epoch"] >= 1 and f"stopped in epoch {ckpt['epoch'] + 1}; {folder / 'last.pt'} holds" in err, err


# ----------------------------------------------------------------------------- the folder's lock


@pytest.mark.parametrize("kind", ["symbolic link", "hard link", "fifo"])
def test_a_lock_file_that_is_not_a_plain_file_of_its_own_is_refused(tmp_path, kind):
    """Even a run that a later check would refuse (--subset 5: too few images) stops at the lock, writing nothing
    through it; a FIFO does not make it wait."""
    target, lock = tmp_path / "precious.txt", tmp_path / "ckpt" / ".lock"
    target.write_text("precious\n")
    lock.parent.mkdir()
    (lock.symlink_to if kind == "symbolic link" else lock.hardlink_to)(target) if kind != "fifo" else os.mkfifo(lock)
    argv = train_args(tmp_path) + ["--subset", "5", "--data-dir", unreadable_data(tmp_path / "data")]
    code, out, err = run(argv, cwd=tmp_path, timeout=60)
    words = {"symbolic link": "is a symbolic link", "hard link": "a hard link", "fifo": "not a plain file"}[kind]
    assert_one_line_error(code, err, str(lock), words)
    assert target.read_text() == "precious\n" and (lock.is_symlink() or kind != "symbolic link")
    assert sorted(p.name for p in lock.parent.iterdir()) == [".lock"]


@needs_mnist
def test_a_finished_run_leaves_no_lock(trained):
    names = sorted(p.name for p in trained.ckpt_dir.iterdir())
    assert "best.pt" in names and not [name for name in names if name.startswith(".")], names  # no .lock, no .tmp


# ----------------------------------------------------------------------------- closed output, and the clone


@pytest.fixture(scope="module")
def clone(trained, tmp_path_factory):
    """A clone of the repository with the working tree's changes to tracked files committed in it. In it, with the
    default folders: the shared run (copied into models_mnist) is continued by one epoch, its stdout closed after
    the first line as `| head -1` does, then `sample` likewise. Its best_val_loss is set below any loss, so that
    the epoch leaves best.pt (with its stored anomaly reference) as it is and the final evaluation stays short."""
    repo = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    diff = subprocess.run(["git", "-C", ROOT, "diff", "HEAD", "--binary"], check=True, capture_output=True).stdout
    if diff:
        git = ["git", "-C", repo, "-c", "user.name=test", "-c", "user.email=test@example.com"]
        subprocess.run(git + ["apply", "--index", "-"], input=diff, check=True)
        subprocess.run(git + ["commit", "-qm", "the working tree"], check=True)
    for name in ("best.pt", "last.pt", "metrics.json"):
        shutil.copy(trained.ckpt_dir / name, repo / "models_mnist" / name)
    last = torch.load(repo / "models_mnist" / "last.pt", weights_only=True)
    resave(last | {"best_val_loss": 1e-9}, repo / "models_mnist" / "last.pt")
    results = []
    for argv in (["--resume", "--epochs", "3", "--data-dir", MNIST_DIR, "--iwae-k", "1"], ["sample", "--n", "4"]):
        proc = start_cli(argv, cwd=repo)
        first = proc.stdout.readline()
        proc.stdout.close()
        code, _, err = finish(proc)
        results.append((code, first, err))
    return repo, results[0], results[1]


@needs_mnist
def test_training_goes_on_when_stdout_is_closed(clone):
    repo, (code, first, err), _ = clone
    assert code == 0 and first == "resuming from epoch 2\n" and "Traceback" not in err, first + err
    assert "Exception ignored" not in err and "BrokenPipe" not in err, err
    assert checkpoint.load(repo / "models_mnist" / "last.pt", resume=True)["epoch"] == 3  # every epoch saved
    assert (repo / "images" / "loss_curves.png").is_file()  # and the final evaluation ran to its end


@needs_mnist
def test_sample_when_stdout_is_closed_and_names_a_model_trained_here(clone):
    repo, _, (code, first, err) = clone
    assert code == 0 and err == "", err
    assert first.startswith("using models_mnist/best.pt: a model trained here, epoch 2 of 2 on the first 2,000 "), first


@needs_mnist
def test_git_status_stays_clean_after_training_and_sample(clone):
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone[0], capture_output=True, text=True)
    assert status.stdout == "", status.stdout


@needs_mnist
def test_an_error_line_to_a_closed_stderr_does_not_stop_the_other_files(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    picture = digit(tmp_path / "zero.png")
    argv = ["reconstruct", tmp_path / "notes.txt", picture, "--checkpoint", trained.ckpt_dir / "best.pt"]
    proc = start_cli(argv + ["--image-dir", tmp_path / "img"], cwd=tmp_path)
    proc.stderr.close()
    code, out, _ = finish(proc)
    assert code == 2 and f"{picture}: combined score" in out, out  # not 1 or 120: a traceback nobody can read
    assert (tmp_path / "img" / "reconstructed_zero.png").is_file()


# ----------------------------------------------------------------------------- which checkpoint is used


@pytest.mark.parametrize("command", ["sample", "evaluate", "reconstruct", "demo"])
def test_every_command_names_the_shipped_model_when_none_is_trained_here(tmp_path, command):
    """In a folder with no models_mnist/best.pt (score: below); evaluate stops at the unreadable data after it."""
    shipped_folder = snapshot(checkpoint.SHIPPED.parent)
    nodata = unreadable_data(tmp_path / "data")
    argv = {
        "sample": ["sample", "--n", "1"],
        "evaluate": ["evaluate", "--data-dir", nodata],
        "reconstruct": ["reconstruct", digit(tmp_path / "zero.png")],
        "demo": ["demo", "--port", "0"],
    }[command]
    proc = start_cli(argv, cwd=tmp_path)
    first = proc.stdout.readline()
    if command == "demo":  # stopped once it has answered a request
        url = read_until(proc, "demo ready at ").split("demo ready at ")[1].split()[0]
        assert b'"latent_dim": 32' in urllib.request.urlopen(url + "api/map", timeout=60).read()
        proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert first.startswith("using ") and SHIPPED_NAME in first, first + out + err
    assert code == (2 if command == "evaluate" else 0) and "Traceback" not in err, err
    assert snapshot(checkpoint.SHIPPED.parent) == shipped_folder


@needs_mnist
def test_score_with_the_shipped_model_writes_nothing_beside_it(tmp_path):
    before = snapshot(checkpoint.SHIPPED.parent)
    argv = ["score", "--method", "elbo", "--samples", "1", "--data-dir", MNIST_DIR, "--no-progress"]
    code, out, err = run(argv, cwd=tmp_path)
    assert code == 0 and out.startswith(f"using {SHIPPED_NAME}") and "anomaly_scores.csv" not in out, out + err
    assert snapshot(checkpoint.SHIPPED.parent) == before and (tmp_path / "images" / "anomalies.png").is_file()


# ----------------------------------------------------------------------------- a checkpoint folder one cannot write


def without_root_override() -> None:
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the child's bounding set, so that
    python starts without them and a folder's mode bits bind it as they bind any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@needs_mnist
@pytest.mark.parametrize("command,name", [("evaluate", "metrics.json"), ("score", "anomaly_scores.csv")])
def test_a_read_only_checkpoint_folder_needs_output_dir(trained, tmp_path, command, name):
    """The checkpoint folder is made read-only (mode 555) for a child that cannot override it (a real user, or
    root without its override capability): no bind mount or in-process patch is needed."""
    folder = copy_run(trained, tmp_path)
    folder.chmod(0o555)
    before = snapshot(folder)
    kw = {"preexec_fn": without_root_override} if os.geteuid() == 0 else {}
    use = [command, "--checkpoint", folder / "best.pt", "--image-dir", tmp_path / "img", "--no-progress"]
    use += ["--iwae-k", "1"] if command == "evaluate" else ["--method", "elbo", "--samples", "1"]
    try:
        code, out, err = run(use + ["--data-dir", unreadable_data(tmp_path / "data")], cwd=tmp_path, **kw)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's override capability here ({exc})")
    assert_one_line_error(code, err, str(folder), "cannot write", f"--output-dir FOLDER for {name}")
    code, out, err = run(use + ["--data-dir", MNIST_DIR, "--output-dir", tmp_path / "out"], cwd=tmp_path, **kw)
    assert code == 0, err
    assert (tmp_path / "out" / name).stat().st_size > 0 and snapshot(folder) == before


# ----------------------------------------------------------------------------- reconstruct

SAFE_NAME = re.compile(r"reconstructed_[A-Za-z0-9._-]+\.png")


@pytest.fixture(scope="module")
def reconstructed(trained, tmp_path_factory):
    """One `reconstruct` of good and bad files: (inputs by role, exit status, stdout, stderr, files written)."""
    tmp = tmp_path_factory.mktemp("reconstruct")
    (tmp / "notes.txt").write_text("not a picture")
    Image.new("L", (40, 1), 255).save(tmp / "thin.png")
    files = {
        "text": tmp / "notes.txt",
        "a": digit(tmp / "a" / "x.png"),
        "thin": tmp / "thin.png",
        "b": digit(tmp / "b" / "x.png", size=(60, 90)),
        "long": digit(tmp / ("d" * 196 + ".png")),
        "gif": digit(tmp / "moving.gif", frames=3),
    }
    use = ["--checkpoint", trained.ckpt_dir / "best.pt", "--image-dir", tmp / "img"]
    code, out, err = run(["reconstruct", *files.values(), *use], cwd=tmp)
    written = sorted(p.name for p in (tmp / "img").iterdir()) if (tmp / "img").is_dir() else []
    return files, code, out, err, written


@needs_mnist
def test_reconstruct_gives_each_bad_file_its_own_line_and_writes_the_good_ones(reconstructed):
    files, code, out, err, written = reconstructed
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 2, err
    assert f"error: {files['text']}: not an image file" in errors[0] and str(files["thin"]) in errors[1], errors
    assert len(written) == 4 and all(SAFE_NAME.fullmatch(name) for name in written), written


@needs_mnist
def test_reconstruct_of_a_name_that_is_not_utf8_gets_a_safe_output_name_and_goes_on(trained, tmp_path):
    odd = digit(Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))))  # not valid UTF-8
    use = ["--checkpoint", trained.ckpt_dir / "best.pt", "--image-dir", tmp_path / "img"]
    code, out, err = run(["reconstruct", odd, digit(tmp_path / "zero.png"), *use], cwd=tmp_path)
    assert code == 0 and err == "" and "caf\\udce9.png: combined score" in out, out + err
    written = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert len(written) == 2 and all(SAFE_NAME.fullmatch(name) for name in written), written


@needs_mnist
def test_reconstruct_keeps_same_named_inputs_apart_and_shortens_long_names(reconstructed):
    files, code, out, err, written = reconstructed
    assert {"reconstructed_x.png", "reconstructed_x_2.png"} <= set(written), written
    long = [n for n in written if n.startswith("reconstructed_ddd")]
    assert len(long) == 1 and len(long[0]) < 120, long


@needs_mnist
def test_reconstruct_says_only_the_first_frame_of_an_animation_is_used(reconstructed):
    files, code, out, err, written = reconstructed
    notes = [line for line in (out + err).splitlines() if line.startswith("note:") and "moving.gif" in line]
    assert len(notes) == 1 and "first frame" in notes[0], out + err


@needs_mnist
def test_reconstruct_refuses_a_fifo_without_waiting_and_goes_on(trained, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    picture = digit(tmp_path / "zero.png")
    use = ["--checkpoint", trained.ckpt_dir / "best.pt", "--image-dir", tmp_path / "img"]
    code, out, err = run(["reconstruct", tmp_path / "pipe.png", picture, *use], cwd=tmp_path, timeout=30)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'pipe.png'}: "), err
    assert (tmp_path / "img" / "reconstructed_zero.png").is_file()
