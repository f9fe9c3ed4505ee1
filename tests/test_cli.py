"""A user's mistake is one line on stderr, exit 2, before long work, nothing saved changed: each way
once as `python main.py` in its own process (run_cli), variants in process. See docs/errors.md."""

import os
import re
import subprocess
import warnings
from pathlib import Path

import helpers
import pytest
import torch
from helpers import assert_one_line_error, copy_run, needs_mnist, run_cli, run_main, train_args
from helpers import unreadable_data as nodata
from PIL import Image

import checkpoint
import evaluate


def cli(user: bool, argv: list, cwd: Path, **kw) -> tuple[int, str, str]:
    """`python main.py argv` as a user runs it (user) or main.main(argv) in this process."""
    return run_cli(argv, cwd, **kw) if user else run_main(argv, cwd)


# user (a subprocess) or in process | flags | what the line must hold, each after a |
BAD_FLAGS = """\
user | --batch-size x | --batch-size | got x
user | evalute | unknown command 'evalute' | evaluate, sample
proc | --no-progress sample | unrecognized arguments: sample | python main.py sample
proc | --epoch 1 | unrecognized arguments: --epoch 1
proc | --resume --replace | --replace | --resume | only one of them
user | --hidden-dim 16384 --fc-layers 16 | weights | 50,000,000 | --hidden-dim | --fc-layers
proc | --lr nan | --lr | got nan
proc | sample --seed 18446744073709551616 | --seed | 18446744073709551616
proc | score --method magic | --method | magic
proc | evaluate --iwae-k 100000000 | --iwae-k | 1 to 10,000
proc | --latent-dim 5000 | --latent-dim | 1 to 1,024 | 5000
proc | --device cuda | --device cuda | no CUDA GPU"""


@pytest.mark.parametrize("case", BAD_FLAGS.splitlines())
def test_bad_flag_is_one_line_before_the_data_is_read_and_creates_nothing(tmp_path, case):
    user, argv, *words = case.split(" | ")
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    argv = argv.split() + ["--data-dir", nodata(tmp_path / "data")]
    code, out, err = cli(user == "user", argv, tmp_path)
    assert_one_line_error(code, err, *words)
    assert err.count("choose") <= 1, err  # one piece of advice, not the same twice in other words
    assert "train-images" not in err and os.listdir(tmp_path) == ["data"]


# each path flag in a command line that uses it; paths the OS refuses, and what the line must say
PATH_FLAGS = {
    "--image-dir": "sample --image-dir PATH".split(),
    "--checkpoint": "sample --checkpoint PATH".split(),
    "--checkpoint-dir": "--checkpoint-dir PATH --data-dir data".split(),
    "--data-dir": "--data-dir PATH --checkpoint-dir ckpt".split(),
    "--resume": "--resume PATH --data-dir data".split(),
    "--output-dir": "evaluate --output-dir PATH --data-dir data".split(),
}
REFUSED = {
    "long": ("x" * 300, ["is 300 bytes long", "more than the 255"]),
    "loop": ("loop/sub", ["a symbolic link in it loops"]),
    "file": ("taken/sub", ["taken is a file, not a folder"]),
    "denied": ("locked/sub", ["permission denied: you may not enter", "locked"]),
    "dangling": ("dangling/sub", ["dangling is a symbolic link to nowhere, which does not exist"]),
}
MADE = ["dangling", "data", "locked", "loop", "taken"]


def refused_paths(folder: Path) -> None:
    """REFUSED's paths in folder (links to itself and to nothing, a file, mode 000), and no data."""
    (folder / "loop").symlink_to("loop")
    (folder / "dangling").symlink_to("nowhere")
    (folder / "taken").write_text("a file")
    (folder / "locked").mkdir(mode=0)
    nodata(folder / "data")


def path_argv(flag: str, reason: str, folder: Path) -> list[str]:
    return [str(folder / REFUSED[reason][0]) if a == "PATH" else a for a in PATH_FLAGS[flag]]


@pytest.mark.parametrize("reason", ["long", "loop", "file", "dangling"])
@pytest.mark.parametrize("flag", PATH_FLAGS)
def test_a_path_the_os_refuses_is_one_line_naming_it_before_any_work(tmp_path, flag, reason):
    refused_paths(tmp_path)
    user = (flag, reason) in {("--image-dir", "long"), ("--checkpoint-dir", "file")}
    code, out, err = cli(user, path_argv(flag, reason, tmp_path), tmp_path)
    assert_one_line_error(code, err, flag, str(tmp_path / REFUSED[reason][0]), *REFUSED[reason][1])
    assert sorted(os.listdir(tmp_path)) == MADE and (tmp_path / "taken").read_text() == "a file"
    assert "using" not in out


def test_a_folder_the_user_may_not_enter_is_named_for_every_path_flag(tmp_path):
    refused_paths(tmp_path)
    argvs = [path_argv(flag, "denied", tmp_path) for flag in PATH_FLAGS]
    denied = f"{tmp_path / 'locked' / 'sub'}: permission denied: you may not enter"
    for flag, (code, out, err) in zip(PATH_FLAGS, helpers.as_a_plain_user(argvs, tmp_path)):
        assert_one_line_error(code, err, flag, denied, f"{tmp_path / 'locked'}; pass a")
    assert sorted(os.listdir(tmp_path)) == MADE


def bad_checkpoint(kind: str, folder: Path, request) -> Path:
    """A checkpoint path in folder that is of this kind."""
    path, weights = folder / "bad.pt", torch.nn.Linear(2, 2)
    if kind == "folder":
        path = folder / "models"
        path.mkdir()
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "jit":
        with warnings.catch_warnings():  # torch.jit is deprecated, and still what people have
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(weights), path)
    elif kind in ("legacy", "state dict"):
        torch.save(weights.state_dict(), path, _use_new_zipfile_serialization=kind == "state dict")
    elif kind != "missing":
        path = copy_run(request.getfixturevalue("trained"), folder) / "last.pt"
        ckpt = torch.load(path, weights_only=True)
        if kind == "bad value":  # checksum renewed: the range check must catch it
            helpers.resave(ckpt | {"config": ckpt["config"] | {"lr": -1.0}}, path)
        else:  # the checksum left as it was
            ckpt["model"]["encoder.0.weight"].view(-1)[0] += 1.0
            torch.save(ckpt, path)
    return path


# user or in process | command | kind of checkpoint | what the line must hold, besides its path
CHECKPOINT_CASES = """\
user | evaluate | changed weight | do not match its checksum
proc | evaluate | missing | no such checkpoint | --checkpoint
proc | sample | bad value | config lr must be a number | got -1.0
user | score | text | not a checkpoint
proc | reconstruct | folder | is a folder | best.pt or last.pt | --checkpoint
proc | demo | missing | no such checkpoint | --checkpoint
user | --resume | bad value | config lr must be a number | got -1.0
proc | --resume | folder | is a folder | best.pt or last.pt | --resume
user | sample | jit | a TorchScript model (torch.jit.save) | best.pt or last.pt | --checkpoint
proc | evaluate | legacy | torch.save's legacy (non-zip) format
proc | --resume | state dict | state_dict"""


@pytest.mark.parametrize("case", CHECKPOINT_CASES.splitlines())
def test_unusable_checkpoint_is_one_line_naming_it_and_nothing_is_written(tmp_path, request, case):
    user, command, kind, *words = case.split(" | ")
    path, img = bad_checkpoint(kind, tmp_path, request), tmp_path / "img"
    picture, data = helpers.digit(tmp_path / "pics" / "0.png"), nodata(tmp_path / "data")
    needs = {"demo": ["--port", 0], "sample": [], "reconstruct": [picture]}  # else: the data
    flag = "--resume" if command == "--resume" else "--checkpoint"
    argv = ([] if flag == "--resume" else [command]) + [flag, path]
    argv += needs.get(command, ["--data-dir", data]) + ["--image-dir", img] * (command != "demo")
    before = helpers.snapshot(tmp_path)
    code, out, err = cli(user == "user", argv, tmp_path)
    assert_one_line_error(code, err, str(path), *words)
    assert helpers.snapshot(tmp_path) == before and not img.exists()


@pytest.mark.parametrize("held", ["best.pt and last.pt", "best.pt"])
def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_unread(trained, tmp_path, held):
    """Only best.pt (a kill in the first save of last.pt): it, and --resume, name its --resume."""
    folder = copy_run(trained, tmp_path)
    if held == "best.pt":
        (folder / "last.pt").unlink()
    before, data = helpers.snapshot(folder), ["--data-dir", nodata(tmp_path / "data")]
    code, out, err = run_main(train_args(tmp_path) + data, tmp_path)
    resume = "--resume" if held != "best.pt" else f"--resume {folder / 'best.pt'}"
    words = [f"{folder} already holds a run ({held}); continue it with {resume},", "--replace"]
    assert_one_line_error(code, err, *words, "another --checkpoint-dir")
    if held == "best.pt":
        code, out, err = run_cli(["--resume", "--checkpoint-dir", folder, *data], tmp_path)
        assert_one_line_error(code, err, f"{folder / 'last.pt'}: no such checkpoint", resume)
    assert helpers.snapshot(folder) == before and not (tmp_path / "img").exists()


# flags | training images | validation images
TOO_FEW = """\
--subset 5 | 5 | 5000
--val-size 1 | 59999 | 1
--exclude-digit 3 --val-size 100 | 53779 | 90"""


@needs_mnist
@pytest.mark.parametrize("case", TOO_FEW.splitlines())
def test_too_few_training_or_validation_images_are_named_before_any_folder_is_made(tmp_path, case):
    flags, train, val = case.split(" | ")
    code, out, err = run_main(train_args(tmp_path)[4:] + flags.split(), tmp_path)  # no --subset
    words = [f"train on {train} images and validate on {val}", "at least 100", flags.split()[0]]
    assert_one_line_error(code, err, *words)
    assert "training on" not in out and os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["best.pt", "anomaly_scores.csv"])  # first saved, last deleted
def test_a_folder_named_best_pt_is_named_as_a_folder(tmp_path, name):
    (tmp_path / "ckpt" / name).mkdir(parents=True)
    (tmp_path / "ckpt" / name / "mine.txt").write_text("mine")
    argv = train_args(tmp_path) + ["--replace", "--data-dir", nodata(tmp_path / "data")]
    code, out, err = run_main(argv, tmp_path)
    assert_one_line_error(code, err, f"{tmp_path / 'ckpt' / name} is a folder, not a file")
    assert helpers.snapshot(tmp_path / "ckpt") == {f"{name}/mine.txt": b"mine"}


@pytest.mark.parametrize("kind", ["symbolic link", "dangling symbolic link", "hard link", "fifo"])
def test_a_lock_file_that_is_not_a_plain_file_of_its_own_is_refused(tmp_path, kind):
    """Even if a later check refuses the run (--subset 5); nothing written through it; no wait."""
    target, lock = tmp_path / "precious.txt", tmp_path / "ckpt" / ".lock"
    lock.parent.mkdir()
    precious = kind in ("symbolic link", "hard link")  # the lock is a link to a user's file
    if precious:
        target.write_text("precious\n")
        os.utime(target, (1_000_000, 1_000_000))
    if kind == "fifo":
        os.mkfifo(lock)
    else:
        (lock.hardlink_to if kind == "hard link" else lock.symlink_to)(target)
    argv = train_args(tmp_path) + ["--subset", "5", "--data-dir", nodata(tmp_path / "data")]
    code, out, err = cli(kind == "fifo", argv, tmp_path, timeout=60)
    words = {"hard link": "a hard link", "fifo": "not a plain file"}.get(kind, "is a symbolic link")
    assert_one_line_error(code, err, str(lock), words)
    assert os.listdir(lock.parent) == [".lock"] and lock.is_symlink() == ("symbolic" in kind)
    state = (target.read_text(), target.stat().st_mtime) if target.exists() else None
    assert state == (("precious\n", 1_000_000) if precious else None)  # none made through a link


FULL = "note: stdout cannot be written (No space left on device); going on without it\n"


@pytest.mark.parametrize("fd,target", [(1, "/dev/full"), (1, None), (2, None), (2, "pipe")])
def test_a_full_or_closed_stream_loses_no_work_nor_exit_status(tmp_path, fd, target):
    """sample >/dev/full, >&-: a whole picture, exit 0; reconstruct 2>&-: the good one, exit 2."""
    (tmp_path / "notes.txt").write_text("not a picture")
    argv = ["sample", "--n", "4"] if fd == 1 else ["reconstruct", tmp_path / "notes.txt"]
    argv += [helpers.digit(tmp_path / "zero.png")] if fd == 2 else []
    closes = {} if target == "pipe" else {"preexec_fn": helpers.redirected(fd, target)}
    proc = helpers.start_cli(argv + ["--image-dir", tmp_path / "img"], tmp_path, **closes)
    if target == "pipe":
        proc.stderr.close()
    code, out, err = helpers.finish(proc)
    assert code == (0 if fd == 1 else 2) and "Traceback" not in out + (err or ""), out
    if fd == 1:
        assert out == "" and err == (FULL if target else ""), err
        Image.open(tmp_path / "img" / "samples.png").verify()
    else:
        assert f"{tmp_path / 'zero.png'}: combined score" in out, out
        assert (tmp_path / "img" / "reconstructed_zero.png").is_file()


@needs_mnist
def test_latent_dim_1_trains_resumes_samples_to_closed_stdout_git_clean(tmp_path):
    """In the default folders, > /dev/full goes on; --resume, sample | head -1; git ignores all."""
    use = ["--data-dir", helpers.MNIST_DIR, "--iwae-k", "1"]
    argv = ["--epochs", "1", "--subset", "200", *use, *helpers.SMALL_FLAGS, "--latent-dim", "1"]
    argv += ["--val-size", "500"]
    code, out, err = run_cli(argv, tmp_path, preexec_fn=helpers.redirected(1, "/dev/full"))
    assert code == 0 and err == FULL, err  # stderr is no terminal: no progress bars
    models = tmp_path / "models_mnist"
    space = evaluate.latent_map_of(checkpoint.load(models / "best.pt"))
    assert space["axes"].shape == (1, 2) and space["points"][:, 0].std() > 0.5
    assert not space["axes"][:, 1].any()
    (models / "metrics.json").unlink()
    results = []
    for argv in (["--resume", "--epochs", "2", *use], ["sample", "--n", "4"]):
        proc = helpers.start_cli(argv, cwd=tmp_path)
        first = proc.stdout.readline()
        proc.stdout.close()
        results.append((*helpers.finish(proc)[::2], first))
    (code, err, first), (sample_code, sample_err, sample_first) = results
    assert code == 0 and first == "resuming from epoch 1\n" and "Traceback" not in err, first + err
    assert "Exception ignored" not in err and "BrokenPipe" not in err and "\r" not in err, err
    assert checkpoint.load(models / "last.pt", resume=True)["epoch"] == 2  # every epoch saved
    assert (models / "metrics.json").is_file()  # the final evaluation ran
    assert sample_code == 0 and sample_err == "", sample_err  # and sample names the model here
    assert sample_first.startswith("using models_mnist/best.pt: a model trained here, epoch ")
    written = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    git = ["git", "-C", helpers.ROOT, "check-ignore", "--no-index", "--stdin"]
    ignored = subprocess.run(git, input="\n".join(written), capture_output=True, text=True).stdout
    assert sorted(ignored.split()) == sorted(written) and "images/samples.png" in written


@pytest.mark.parametrize("command", ["evaluate", "score"])
def test_a_read_only_checkpoint_folder_needs_output_dir(trained, tmp_path, monkeypatch, command):
    """Mode 555 (binding in a child): refused before the data; --output-dir writes there instead."""
    name = {"evaluate": "metrics.json", "score": "anomaly_scores.csv"}[command]
    folder = copy_run(trained, tmp_path)
    folder.chmod(0o555)
    before = helpers.snapshot(folder)
    use = [command, "--checkpoint", folder / "best.pt", "--image-dir", tmp_path / "img"]
    use += ["--iwae-k", "1"] if command == "evaluate" else "--method elbo --samples 1".split()
    data, elsewhere = ["--data-dir", nodata(tmp_path / "data")], ["--output-dir", tmp_path / "out"]
    refused, passed = helpers.as_a_plain_user([use + data, use + data + elsewhere], tmp_path)
    words = [str(folder), "cannot write", f"--output-dir FOLDER for {name}"]
    assert_one_line_error(*refused[::2], *words)
    # both read only the test files (score reads the training files only to fit a missing reference)
    assert_one_line_error(*passed[::2], str(tmp_path / "data" / "t10k-images-idx3-ubyte"))
    helpers.first_test_images(monkeypatch)
    code, out, err = run_main(use + ["--data-dir", helpers.MNIST_DIR, *elsewhere], tmp_path)
    assert code == 0 and (tmp_path / "out" / name).stat().st_size > 0, err
    assert helpers.snapshot(folder) == before


def test_evaluate_reads_test_files_only_no_metrics_for_a_replaced_ckpt(trained, tmp_path):
    folder, data = copy_run(trained, tmp_path), tmp_path / "data"
    (folder / "metrics.json").unlink()
    data.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data / name).symlink_to(Path(helpers.MNIST_DIR) / name)
    argv = ["evaluate", "--checkpoint", folder / "best.pt", "--data-dir", data, "--iwae-k", "1"]
    proc = helpers.start_cli(argv + ["--image-dir", tmp_path / "img"], cwd=tmp_path)
    helpers.read_until(proc, "using ")
    os.replace(copy_run(trained, tmp_path / "new") / "last.pt", folder / "best.pt")
    code, out, err = helpers.finish(proc)
    words = [f"{folder / 'best.pt'} was replaced while it was read", "metrics.json was not written"]
    assert_one_line_error(code, err, *words)
    assert "active units" in out and sorted(os.listdir(folder)) == ["best.pt", "last.pt"]


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_data_file_that_is_not_a_regular_file_is_named_and_nothing_is_downloaded(tmp_path, kind):
    bad = nodata(tmp_path / "data") / "train-images-idx3-ubyte"
    bad.unlink()
    make = {"fifo": os.mkfifo, "folder": os.mkdir, "device": lambda p: p.symlink_to("/dev/zero")}
    make[kind](bad)
    argv = ["--data-dir", tmp_path / "data", "--checkpoint-dir", "ckpt", "--image-dir", "img"]
    code, out, err = cli(kind == "fifo", argv, tmp_path, timeout=60)
    word = {"fifo": "a pipe (FIFO)", "folder": "a folder", "device": "a device"}[kind]
    assert_one_line_error(code, err, f"{bad} is {word}, not a regular file; remove", "--data-dir")
    assert "download" not in out and os.listdir(tmp_path) == ["data"]


def test_reconstruct_gives_each_bad_file_its_own_line_and_writes_the_good_ones(trained, tmp_path):
    """A FIFO unopened; names kept apart, cut, safe; a GIF's first frame; no input written over."""
    digit, img = helpers.digit, tmp_path / "img"
    (tmp_path / "notes.txt").write_text("not a picture")
    Image.new("L", (40, 1), 255).save(tmp_path / "thin.png")
    Image.new("L", (50, 50), 200).save(tmp_path / "flat.png")
    noise = torch.randint(0, 256, (60, 60), generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.to(torch.uint8).numpy()).save(tmp_path / "noise.png")
    os.mkfifo(tmp_path / "pipe.png")
    odd = digit(Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))))  # not UTF-8
    names = ["a.png", "reconstructed_a.png", "reconstructed_b.png", "b.png"]
    mine = [digit(img / name, size=(70, 90)) for name in names]
    before = {p: p.read_bytes() for p in mine}
    files = [tmp_path / "notes.txt", digit(tmp_path / "a" / "x.png"), tmp_path / "pipe.png"]
    files += [tmp_path / "thin.png", odd, digit(tmp_path / "b" / "x.png", size=(60, 90))]
    files += [digit(tmp_path / ("d" * 196 + ".png")), digit(tmp_path / "moving.gif", frames=3)]
    files += [tmp_path / "flat.png", tmp_path / "noise.png", *mine]
    use = ["--checkpoint", trained.ckpt_dir / "best.pt", "--image-dir", img]
    code, out, err = run_cli(["reconstruct", *files, *use], tmp_path, timeout=90)
    errors = [f"error: {files[0]}: not an image file", f"error: {files[2]}: not a regular file"]
    errors += [f"error: {files[3]}", f"error: {files[8]}: the image is empty"]
    assert code == 2 and err.count("\n") == 4, err
    assert [e[: len(start)] for e, start in zip(err.splitlines(), errors)] == errors, err
    written, safe = set(os.listdir(img)) - set(names), re.compile(r"reconstructed_[\w.-]+\.png")
    assert len(written) == 10 and all(map(safe.fullmatch, written)), written
    assert {"reconstructed_x.png", "reconstructed_x_2.png", "reconstructed_caf_.png"} <= written
    assert [len(n) < 120 for n in written if n.startswith("reconstructed_ddd")] == [True], written
    scored = ["caf\\udce9.png", files[7], files[9]]
    assert [name for name in scored if f"{name}: combined score" not in out] == [], out
    given = "is one of the pictures given, so it is not written over"
    notes = [f"note: {img / name} {given}" for name in names[1:3]]
    notes.append(f"note: {files[7]} holds 3 frames; only the first frame is used")
    assert [line for line in out.splitlines() if line.startswith("note:")] == notes, out
    assert {p: p.read_bytes() for p in mine} == before, "an input was written over"
    assert f"wrote {img / 'reconstructed_a_2.png'}" in out, out
    # noise is scored; the shipped model, trained longer, calls it very unusual
    code, out, err = run_main(["reconstruct", files[9], "--image-dir", tmp_path / "new"], tmp_path)
    assert code == 0 and "of test digits: very unusual; wrote" in out, out + err
