"""The command line as a user meets it. A user's mistake is one line on stderr and exit status 2,
found before long work, with nothing already saved changed. Each distinct way to fail runs at least
once as a user runs it, `python main.py ...` in its own process (helpers.run_cli), so that a
traceback, a hang or a wrong exit status would show; further variants of the same way run in process
(helpers.run_main). docs/errors.md lists each case."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import helpers
import pytest
import torch
from helpers import (
    assert_one_line_error,
    copy_run,
    needs_mnist,
    run_cli,
    run_main,
    train_args,
    unreadable_data,
)
from PIL import Image

import checkpoint

CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.mark.parametrize(
    "user,argv,words",
    # user: run as a user runs it (argparse's check, and a check of the flags together), else in
    # process
    [
        (True, "--batch-size x", ["--batch-size", "got x"]),
        (True, "evalute", ["unknown command 'evalute'", "evaluate, sample"]),
        (
            False,
            "--no-progress sample",
            ["unrecognized arguments: sample", "python main.py sample"],
        ),
        (False, "--epoch 1", ["unrecognized arguments: --epoch 1"]),  # not taken for --epochs
        (False, "--resume --replace", ["--replace", "--resume", "only one of them"]),
        (
            True,
            "--hidden-dim 16384 --fc-layers 16",
            ["weights", "50,000,000", "--hidden-dim", "--fc-layers"],
        ),
        (False, "--lr nan", ["--lr", "got nan"]),
        (False, f"sample --seed {2**64}", ["--seed", str(2**64)]),
        (False, "score --method magic", ["--method", "magic"]),
        (False, "evaluate --iwae-k 100000000", ["--iwae-k", "1 to 10,000"]),
        (False, "sample --n 1000000000", ["--n", "1 to 1,024"]),
        (False, "score --samples 100000", ["--samples", "1 to 1,000"]),
        (False, "--batch-size 100000", ["--batch-size", "1 to 4,096"]),
        (False, "--latent-dim 5000", ["--latent-dim", "1 to 1,024", "5000"]),
        pytest.param(False, "--device cuda", ["--device cuda", "no CUDA GPU"], marks=CUDA),
    ],
)
def test_bad_flag_is_one_line_before_the_data_is_read_and_creates_nothing(
    tmp_path, user, argv, words
):
    nodata = unreadable_data(tmp_path / "data")
    code, out, err = (run_cli if user else run_main)(
        argv.split() + ["--data-dir", nodata], tmp_path
    )
    assert_one_line_error(code, err, *words)
    assert err.count("choose") <= 1, err  # one piece of advice, not the same twice in other words
    assert "train-images" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize(
    "command,flag,under",
    [([], "--checkpoint-dir", False), ([], "--image-dir", True)]
    + [
        (["evaluate"], "--image-dir", False),
        (["sample"], "--image-dir", True),
        (["score"], "--image-dir", False),
    ],
)
def test_output_folder_that_is_a_file_is_named_before_anything_is_loaded(
    tmp_path, command, flag, under
):
    """Named before the data is read (train) or the checkpoint loaded (evaluate, sample, score: it
    does not exist); the default folders that could be made are not made. The first case runs as a
    user runs it."""
    (tmp_path / "taken").write_text("a file")
    target = tmp_path / "taken" / "sub" if under else tmp_path / "taken"
    folder = unreadable_data(tmp_path / "data")
    argv = (
        command
        + [flag, target, "--data-dir", folder]
        + (["--checkpoint", tmp_path / "no.pt"] if command else [])
    )
    code, out, err = (run_main if command or under else run_cli)(argv, tmp_path)
    assert_one_line_error(
        code, err, f"{flag} {target}", f"{tmp_path / 'taken'} is a file, not a folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "taken"]
    assert (tmp_path / "taken").read_text() == "a file"


def bad_checkpoint(kind: str, tmp_path: Path, request) -> tuple[Path, list[str]]:
    """A checkpoint path of the given kind and what its refusal must say; the last two edit a copy
    of the shared run."""
    if kind == "missing":
        return tmp_path / "nope.pt", ["no such checkpoint"]
    if kind == "folder":
        (tmp_path / "models").mkdir()
        return tmp_path / "models", ["is a folder", "best.pt or last.pt"]
    if kind == "text":
        (tmp_path / "notes.pt").write_text("not a checkpoint\n")
        return tmp_path / "notes.pt", ["not a checkpoint"]
    path = copy_run(request.getfixturevalue("trained"), tmp_path) / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    if kind == "bad value":  # checksum renewed: the range check must catch it
        ckpt["config"]["lr"] = -1.0
        helpers.resave(ckpt, path)
        return path, ["config lr must be a number", "got -1.0"]
    # one weight changed, the checksum left as it was
    ckpt["model"]["encoder.0.weight"].view(-1)[0] += 1.0
    torch.save(ckpt, path)
    return path, ["do not match its checksum"]


# the others in process
AS_A_USER = {("evaluate", "changed weight"), ("score", "text"), ("--resume", "bad value")}


@pytest.mark.parametrize(
    "command,kind",
    [
        ("evaluate", "changed weight"),
        ("evaluate", "missing"),
        ("sample", "bad value"),
        ("score", "text"),
    ]
    + [
        ("reconstruct", "folder"),
        ("demo", "missing"),
        ("--resume", "bad value"),
        ("--resume", "folder"),
    ],
)
def test_unusable_checkpoint_is_one_line_naming_it_and_nothing_is_written(
    tmp_path, request, command, kind
):
    path, words = bad_checkpoint(kind, tmp_path, request)
    nodata, picture = (
        unreadable_data(tmp_path / "data"),
        helpers.digit(tmp_path / "pics" / "zero.png"),
    )
    argv = {
        "--resume": ["--resume", path, "--data-dir", nodata, "--image-dir", tmp_path / "img"],
        "demo": ["demo", "--checkpoint", path, "--port", "0"],
        "reconstruct": [
            "reconstruct",
            picture,
            "--checkpoint",
            path,
            "--image-dir",
            tmp_path / "img",
        ],
    }.get(
        command,
        [command, "--checkpoint", path, "--data-dir", nodata, "--image-dir", tmp_path / "img"],
    )
    before = helpers.snapshot(tmp_path)
    code, out, err = (run_cli if (command, kind) in AS_A_USER else run_main)(argv, tmp_path)
    flag = "--resume" if command == "--resume" else "--checkpoint"
    assert_one_line_error(code, err, str(path), *words)
    assert kind not in ("missing", "folder") or flag in err
    assert helpers.snapshot(tmp_path) == before and not (tmp_path / "img").exists()


@needs_mnist
def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_before_anything_is_read(
    trained, tmp_path
):
    folder = copy_run(trained, tmp_path)
    before = helpers.snapshot(folder)
    code, out, err = run_main(
        train_args(tmp_path) + ["--data-dir", unreadable_data(tmp_path / "data")], tmp_path
    )
    words = [
        f"{folder} already holds a run (best.pt and last.pt)",
        "--resume",
        "another --checkpoint-dir",
        "--replace",
    ]
    assert_one_line_error(code, err, *words)
    assert helpers.snapshot(folder) == before and sorted(
        p.name for p in folder.iterdir()
    ) == sorted(before)
    assert not (tmp_path / "img").exists()


@needs_mnist
@pytest.mark.parametrize(
    "flags,train,val",
    [
        ("--subset 5", 5, 5000),
        ("--val-size 1", 59999, 1),
        ("--exclude-digit 3 --val-size 100", 53779, 90),
    ],
)
def test_too_few_training_or_validation_images_are_named_before_any_folder_is_made(
    tmp_path, flags, train, val
):
    # without train_args' --subset
    code, out, err = run_main(train_args(tmp_path)[4:] + flags.split(), tmp_path)
    assert_one_line_error(
        code,
        err,
        f"train on {train} images and validate on {val}",
        "at least 100",
        flags.split()[0],
    )
    assert (
        "training on" not in out
        and not (tmp_path / "ckpt").exists()
        and not (tmp_path / "img").exists()
    )


# the first file a run saves, the last it deletes
@pytest.mark.parametrize("name", ["best.pt", "anomaly_scores.csv"])
def test_a_folder_named_best_pt_is_named_as_a_folder(tmp_path, name):
    (tmp_path / "ckpt" / name).mkdir(parents=True)
    (tmp_path / "ckpt" / name / "mine.txt").write_text("mine")
    argv = train_args(tmp_path) + ["--replace", "--data-dir", unreadable_data(tmp_path / "data")]
    code, out, err = run_main(argv, tmp_path)
    assert_one_line_error(code, err, f"{tmp_path / 'ckpt' / name} is a folder, not a file")
    assert helpers.snapshot(tmp_path / "ckpt") == {f"{name}/mine.txt": b"mine"}


@needs_mnist
def test_replace_deletes_the_earlier_run_and_sighup_stops_the_new_one_like_ctrl_c(
    trained, tmp_path
):
    """A copy of the shared run, then a new run into its folder with --replace and another
    --latent-dim, sent SIGHUP (a closed terminal) once its first epoch is saved."""
    folder = copy_run(trained, tmp_path)
    proc = helpers.start_cli(
        train_args(tmp_path, epochs=10) + ["--replace", "--latent-dim", "6"], cwd=tmp_path
    )
    helpers.read_until(proc, "epoch   1/10")
    proc.send_signal(signal.SIGHUP)
    code, out, err = helpers.finish(proc, timeout=120)
    last = checkpoint.load(folder / "last.pt", resume=True)  # whole, and resumable
    assert last["config"]["latent_dim"] == 6 and last["config"]["epochs"] == 10
    assert [h["epoch"] for h in last["history"]] == list(range(1, last["epoch"] + 1))
    assert checkpoint.load(folder / "best.pt")["config"]["latent_dim"] == 6
    assert not (folder / "metrics.json").exists()  # the earlier run's evaluation went with it
    assert code == 128 + signal.SIGHUP and "Traceback" not in err, err
    assert "SIGHUP" in err and f"python main.py --resume {folder / 'last.pt'}" in err, err
    assert (
        last["epoch"] >= 1
        and f"stopped in epoch {last['epoch'] + 1}; {folder / 'last.pt'} holds" in err
    ), err


@pytest.mark.parametrize("kind", ["symbolic link", "dangling symbolic link", "hard link", "fifo"])
def test_a_lock_file_that_is_not_a_plain_file_of_its_own_is_refused(tmp_path, kind):
    """Even a run that a later check would refuse (--subset 5: too few images) stops at the lock,
    writing nothing through it, not even its time; a FIFO does not make it wait (that case runs as a
    user runs it)."""
    target, lock = tmp_path / "precious.txt", tmp_path / "ckpt" / ".lock"
    lock.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(lock)
    else:
        if kind != "dangling symbolic link":
            target.write_text("precious\n")
            os.utime(target, (1_000_000, 1_000_000))
        (lock.hardlink_to if kind == "hard link" else lock.symlink_to)(target)
    argv = train_args(tmp_path) + [
        "--subset",
        "5",
        "--data-dir",
        unreadable_data(tmp_path / "data"),
    ]
    code, out, err = (
        run_cli(argv, tmp_path, timeout=60) if kind == "fifo" else run_main(argv, tmp_path)
    )
    words = {"hard link": "a hard link", "fifo": "not a plain file"}.get(kind, "is a symbolic link")
    assert_one_line_error(code, err, str(lock), words)
    assert sorted(p.name for p in lock.parent.iterdir()) == [".lock"] and lock.is_symlink() == (
        "symbolic" in kind
    )
    if kind in ("symbolic link", "hard link"):
        assert target.read_text() == "precious\n" and target.stat().st_mtime == 1_000_000
    else:
        assert not target.exists()  # nothing was created through a dangling link


@needs_mnist
def test_training_and_sample_go_on_when_stdout_is_closed_and_leave_git_status_clean(
    trained, tmp_path
):
    """A clone of the repository with the working tree's changes to tracked files committed in it.
    In it, with the default folders: the shared run (copied into models_mnist) is continued by one
    epoch, its stdout closed after the first line as `| head -1` does, then `sample` likewise. Its
    best_val_loss is set below any loss, so that the epoch leaves best.pt (with its stored anomaly
    reference) as it is and the final evaluation stays short."""
    root, repo = helpers.ROOT, tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(root), str(repo)], check=True)
    diff = subprocess.run(
        ["git", "-C", root, "diff", "HEAD", "--binary"], check=True, capture_output=True
    ).stdout
    if diff:
        git = ["git", "-C", repo, "-c", "user.name=test", "-c", "user.email=test@example.com"]
        subprocess.run(git + ["apply", "--index", "-"], input=diff, check=True)
        subprocess.run(git + ["commit", "-qm", "the working tree"], check=True)
    for name in ("best.pt", "last.pt", "metrics.json"):
        shutil.copy(trained.ckpt_dir / name, repo / "models_mnist" / name)
    last = torch.load(repo / "models_mnist" / "last.pt", weights_only=True)
    helpers.resave(last | {"best_val_loss": 1e-9}, repo / "models_mnist" / "last.pt")
    results, resume = (
        [],
        ["--resume", "--epochs", "3", "--data-dir", helpers.MNIST_DIR, "--iwae-k", "1"],
    )
    for argv in (resume, ["sample", "--n", "4"]):
        proc = helpers.start_cli(argv, cwd=repo)
        first = proc.stdout.readline()
        proc.stdout.close()
        code, _, err = helpers.finish(proc)
        results.append((code, first, err))
    (code, first, err), (sample_code, sample_first, sample_err) = results
    assert code == 0 and first == "resuming from epoch 2\n" and "Traceback" not in err, first + err
    assert "Exception ignored" not in err and "BrokenPipe" not in err, err
    # every epoch saved
    assert checkpoint.load(repo / "models_mnist" / "last.pt", resume=True)["epoch"] == 3
    # and the final evaluation ran to its end
    assert (repo / "images" / "loss_curves.png").is_file()
    # and sample names the model trained here
    assert sample_code == 0 and sample_err == "", sample_err
    assert sample_first.startswith(
        "using models_mnist/best.pt: a model trained here, epoch 2 of 2 on the first 2,000 "
    )
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
    )
    assert status.stdout == "", status.stdout


@needs_mnist
def test_an_error_line_to_a_closed_stderr_does_not_stop_the_other_files(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    picture = helpers.digit(tmp_path / "zero.png")
    argv = [
        "reconstruct",
        tmp_path / "notes.txt",
        picture,
        "--checkpoint",
        trained.ckpt_dir / "best.pt",
    ]
    proc = helpers.start_cli(argv + ["--image-dir", tmp_path / "img"], cwd=tmp_path)
    proc.stderr.close()
    code, out, _ = helpers.finish(proc)
    # not 1 or 120: a traceback nobody can read
    assert code == 2 and f"{picture}: combined score" in out, out
    assert (tmp_path / "img" / "reconstructed_zero.png").is_file()


def without_root_override() -> None:
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the child's bounding
    set, so that python starts without them and a folder's mode bits bind it as they bind any user.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@needs_mnist
@pytest.mark.parametrize(
    "command,name", [("evaluate", "metrics.json"), ("score", "anomaly_scores.csv")]
)
def test_a_read_only_checkpoint_folder_needs_output_dir(
    trained, tmp_path, monkeypatch, command, name
):
    """The checkpoint folder is made read-only (mode 555) for a child that cannot override it (a
    real user, or root without its override capability): refused before the data is read; with
    --output-dir the folder is not in the way (the unreadable data is the next thing named). The
    whole command with --output-dir then runs in process, on the first 500 test images: its file is
    written there, and nothing beside the checkpoint."""
    folder = copy_run(trained, tmp_path)
    folder.chmod(0o555)
    before = helpers.snapshot(folder)
    kw = {"preexec_fn": without_root_override} if os.geteuid() == 0 else {}
    use = [
        command,
        "--checkpoint",
        folder / "best.pt",
        "--image-dir",
        tmp_path / "img",
        "--no-progress",
    ]
    use += ["--iwae-k", "1"] if command == "evaluate" else ["--method", "elbo", "--samples", "1"]
    nodata, elsewhere = unreadable_data(tmp_path / "data"), ["--output-dir", tmp_path / "out"]
    try:
        code, out, err = run_cli(use + ["--data-dir", nodata], tmp_path, **kw)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's override capability here ({exc})")
    assert_one_line_error(code, err, str(folder), "cannot write", f"--output-dir FOLDER for {name}")
    code, out, err = run_cli(use + ["--data-dir", nodata, *elsewhere], tmp_path, **kw)
    assert_one_line_error(code, err, str(nodata / "train-images-idx3-ubyte"))
    helpers.first_test_images(monkeypatch)
    code, out, err = run_main(use + ["--data-dir", helpers.MNIST_DIR, *elsewhere], tmp_path)
    assert code == 0, err
    assert (tmp_path / "out" / name).stat().st_size > 0 and helpers.snapshot(folder) == before


@needs_mnist
def test_reconstruct_gives_each_bad_file_its_own_line_and_writes_the_good_ones(trained, tmp_path):
    """One `reconstruct` of good and bad files, as a user runs it: each bad file gets its own error
    line (a FIFO at once and unopened: a run that waited on it would hang and fail), and the files
    after it are still processed. Inputs of the same name stay apart, a long name is shortened, a
    name that is not UTF-8 gets a safe one, and of an animation only the first frame is used, with a
    note saying so."""
    digit = helpers.digit
    (tmp_path / "notes.txt").write_text("not a picture")
    Image.new("L", (40, 1), 255).save(tmp_path / "thin.png")
    os.mkfifo(tmp_path / "pipe.png")
    # not valid UTF-8
    odd = digit(Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))))
    files = [
        tmp_path / "notes.txt",
        digit(tmp_path / "a" / "x.png"),
        tmp_path / "pipe.png",
        tmp_path / "thin.png",
        odd,
    ]
    files += [
        digit(tmp_path / "b" / "x.png", size=(60, 90)),
        digit(tmp_path / ("d" * 196 + ".png")),
    ]
    files += [digit(tmp_path / "moving.gif", frames=3)]
    use = ["--checkpoint", trained.ckpt_dir / "best.pt", "--image-dir", tmp_path / "img"]
    code, out, err = run_cli(["reconstruct", *files, *use], tmp_path, timeout=60)
    errors = err.splitlines()
    # no traceback
    assert code == 2 and len(errors) == 3 and all(line.startswith("error: ") for line in errors), (
        err
    )
    assert (
        errors[0].startswith(f"error: {files[0]}: not an image file") and str(files[3]) in errors[2]
    ), errors
    assert errors[1].startswith(f"error: {files[2]}: not a regular file"), errors
    written = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert len(written) == 5 and all(
        re.fullmatch(r"reconstructed_[A-Za-z0-9._-]+\.png", name) for name in written
    )
    assert {"reconstructed_x.png", "reconstructed_x_2.png", "reconstructed_caf_.png"} <= set(
        written
    ), written
    assert [len(name) < 120 for name in written if name.startswith("reconstructed_ddd")] == [
        True
    ], written
    assert "caf\\udce9.png: combined score" in out and f"{files[-1]}: combined score" in out, out
    notes = [line for line in out.splitlines() if line.startswith("note:") and "moving.gif" in line]
    assert len(notes) == 1 and "first frame" in notes[0], out
