"""Train, evaluate and use a convolutional VAE on MNIST: the command line. This file reads the
flags; train_command.py does what `python main.py` says, commands.py what the others say.

    python main.py                      train with the defaults (20 epochs), evaluate, draw pictures
    python main.py evaluate             test-set metrics and pictures for a checkpoint
    python main.py sample               a grid of new digits
    python main.py score                anomaly scores of the test digits
    python main.py reconstruct FILE...  score and reconstruct your own digit pictures
    python main.py demo                 a page (http://127.0.0.1:8000) to draw a digit for the VAE

A user's mistake (bad flag, data, checkpoint, folder or image) ends with one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from dataclasses import fields

import anomaly
import checkpoint
import commands
import train_command
from config import MAX_SEED, TrainConfig, VAEConfig, range_text, span_text
from files import UserError

COMMANDS = ("train", "evaluate", "sample", "score", "reconstruct", "demo")
HANDLERS = {"train": train_command.run_train} | commands.HANDLERS  # what each command does


class Parser(argparse.ArgumentParser):
    """argparse that says what is wrong in one line (exit 2) instead of dumping the usage block."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --epoch is a typo, not --epochs

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind: type, low, high, what: str = ""):
    """An argparse type: `kind` (int or float) from low to high, else a one-line error naming the
    range."""
    what = what or range_text(low, high)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}") from None
        if not low <= value <= high:  # a NaN fails too
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def add_settings(group, config_class: type) -> None:
    """One flag per field of TrainConfig or VAEConfig, parsed with the field's range and explained
    with its help (config.py). Every default is None, so that --resume can tell the flags given from
    those left out; --help shows the field's default."""
    for f in fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        text = meta.get("help", "")  # a field without one fails a test, not every command
        if isinstance(f.default, bool):
            group.add_argument(flag, action="store_true", default=None, help=text)
        elif "choices" in meta:
            group.add_argument(flag, choices=meta["choices"], help=f"{text} (default: {f.default})")
        else:
            low, high = meta["range"]
            nargs = len(f.default) if isinstance(f.default, tuple) else None
            group.add_argument(
                flag,
                type=number(type(low), low, high),
                nargs=nargs,
                metavar=meta["metavar"],
                help=f"{text} ({span_text(low, high)}; default: {shown_default(f)})",
            )


def shown_default(f) -> str:
    """A field's default as --help writes it: `32 32` for a pair, the field's word for None."""
    if isinstance(f.default, tuple):
        return " ".join(map(str, f.default))
    if f.default is None:
        return f.metadata["none"]
    return str(f.default)


def add_number(p, flag: str, low: int, high: int, default: int, help: str) -> None:
    """A flag taking a whole number from low to high: its parser and its --help read the same two
    bounds."""
    p.add_argument(
        flag,
        type=number(int, low, high),
        default=default,
        help=f"{help} ({span_text(low, high)}; default: {default})",
    )


def add_common(
    p: argparse.ArgumentParser,
    checkpoint_flag: bool = True,
    data: bool = True,
    images: bool = True,
) -> None:
    """--device; unless data is False, --data-dir and --progress (a command that reads no data has
    no long step to show); unless images is False, --image-dir; unless checkpoint_flag is False,
    --checkpoint."""
    if data:
        p.add_argument(
            "--data-dir",
            default="data",
            help="folder holding the four MNIST IDX files (.gz or not; also "
            "looks in MNIST/raw); downloaded there when absent (default: data)",
        )
    if images:
        p.add_argument(
            "--image-dir", default="images", help="where pictures are written (default: images)"
        )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to compute; auto picks cuda, then mps, then cpu (default: auto)",
    )
    if checkpoint_flag:
        p.add_argument(
            "--checkpoint",
            default=str(checkpoint.DEFAULT),
            help=f"checkpoint to use (default: {checkpoint.DEFAULT}; until training has written "
            "it, the shipped pretrained/vae-mnist.pt)",
        )
    if data:
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            help="progress bars on stderr for long steps; the lines that report results print "
            "either way (default: only when stderr is a terminal, so a log file gets no bars)",
        )


def add_output_dir(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument(
        "--output-dir",
        help=f"folder for {name} (default: the checkpoint's folder; with the shipped "
        "model, none: nothing is written beside it)",
    )


def add_iwae_k(p: argparse.ArgumentParser) -> None:
    # at most 10,000: k x 100 images x latent noise is drawn at once
    add_number(
        p,
        "--iwae-k",
        1,
        10_000,
        default=100,
        help="importance samples per test image for the IWAE bound on -log p(x); fewer is faster "
        "and looser",
    )


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        choices=anomaly.METHODS,
        default=anomaly.DEFAULT_METHOD,
        help="combined: the larger of the ELBO's z-score and the z-scored sum of complexity and "
        "knn, the best at telling a digit the model never saw; complexity: the negative ELBO minus "
        f"{anomaly.LOCAL_WEIGHT:g} times a local pixel model's nats, so simple images do not pass "
        "as typical; knn: mean distance of the image's code to the "
        f"{anomaly.KNN_K} nearest codes of training images; elbo: the plain negative ELBO. All but "
        "elbo use the reference stored in best.pt, or fit one from --data-dir when training was "
        f"stopped before storing it. See docs/anomaly.md (default: {anomaly.DEFAULT_METHOD})",
    )
    add_number(
        p, "--samples", 1, 1000, default=anomaly.SCORE_SAMPLES, help="z samples averaged per image"
    )
    add_seed(p, anomaly.SCORE_SEED, f"seed of the z samples (default: {anomaly.SCORE_SEED})")


DESCRIPTIONS = {
    "train": "Train the convolutional VAE on MNIST, keep the best checkpoint by validation loss, "
    "then evaluate it on the test set and draw pictures.",
    "evaluate": "Test-set metrics (negative ELBO, IWAE bound, active units, KL per dimension) and "
    "pictures for a checkpoint; writes metrics.json.",
    "sample": "Decode z ~ N(0, I) into a grid of new digits (IMAGE_DIR/samples.png).",
    "score": "Anomaly score (higher = stranger) of every test digit; writes anomaly_scores.csv and "
    "IMAGE_DIR/anomalies.png.",
    "reconstruct": "Prepare your own digit pictures as MNIST was made, reconstruct them, and score "
    "them against the test digits.",
    "demo": "Serve a page on which you draw a digit and watch the VAE answer: the digit as the "
    "model sees it, its reconstruction, how unusual it is and its place in the latent space, "
    "sliders that move its code, and random samples. Works offline; Ctrl-C stops it.",
}


def add_seed(p: argparse.ArgumentParser, default: int | None, what: str) -> None:
    p.add_argument("--seed", type=number(int, 0, MAX_SEED), default=default, help=what)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    add_settings(p.add_argument_group("training"), TrainConfig)
    add_settings(p.add_argument_group("model"), VAEConfig)
    g = p.add_argument_group("files and running")
    add_common(g, checkpoint_flag=False)
    g.add_argument(
        "--checkpoint-dir",
        help="where best.pt and last.pt go (default: models_mnist, or the folder of --resume's "
        "file)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="PATH",
        help="continue training from a checkpoint "
        "(default PATH: CHECKPOINT_DIR/last.pt) with its stored settings; only --epochs may change",
    )
    g.add_argument(
        "--replace",
        action="store_true",
        help="start a new run in a --checkpoint-dir that already holds "
        "one: its best.pt, last.pt, metrics.json and anomaly_scores.csv are deleted first",
    )
    add_iwae_k(g)


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    add_common(p, data=False, images=False)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on; anything but a loopback address lets other machines in "
        "(default: 127.0.0.1)",
    )
    port = number(int, 0, 65535, "a port from 0 (any free one) to 65535")
    p.add_argument("--port", type=port, default=8000, help="port to serve on (default: 8000)")


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    epilog = "other commands: " + ", ".join(f"python main.py {c} --help" for c in COMMANDS[1:])
    parsers = {c: Parser(prog=f"main.py {c}", description=DESCRIPTIONS[c]) for c in COMMANDS[1:]}
    parsers["train"] = Parser(prog="main.py", description=DESCRIPTIONS["train"], epilog=epilog)
    add_train_flags(parsers["train"])
    add_common(parsers["evaluate"])
    add_iwae_k(parsers["evaluate"])
    add_output_dir(parsers["evaluate"], "metrics.json")
    add_seed(
        parsers["evaluate"],
        None,
        "seed of the evaluation's z samples (default: the checkpoint's training seed)",
    )
    add_common(parsers["sample"], data=False)
    # accepted, so that scripts passing them keep working, but not listed: sample reads no data and
    # shows no progress
    parsers["sample"].add_argument("--data-dir", help=argparse.SUPPRESS)
    parsers["sample"].add_argument(
        "--progress", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS
    )
    add_number(parsers["sample"], "--n", 1, 1024, default=64, help="number of digits")
    add_seed(parsers["sample"], 0, "seed of the z draws (default: 0)")
    parsers["reconstruct"].add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="PNG/JPEG/... pictures of single digits, any size, dark-on-light or light-on-dark, "
        "drawings or photos",
    )
    for name in ("score", "reconstruct"):
        add_common(parsers[name])
        add_scoring_flags(parsers[name])
    add_output_dir(parsers["score"], "anomaly_scores.csv")
    add_demo_flags(parsers["demo"])
    return parsers


# ----------------------------------------------------------------------------- running a command


class ClosedPipeSafe:
    """stdout or stderr that never stops the work or prints a traceback: once writing to it fails
    (its reader has gone, `| head`; its disk is full, `> /dev/full`; it was closed, `>&-`), it
    writes to /dev/null instead, and `failed` says so. A failure the user did not ask for (not a
    reader that went, not a closed stream) is told once on the stream `other`, if given."""

    def __init__(self, stream, fd: int, name: str) -> None:
        self.fd, self.name, self.other = fd, name, None
        self.failed = stream is None  # Python found the descriptor closed at startup
        self.stream = self.devnull() if stream is None else stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError) as err:  # ValueError: the stream was closed
            self.gone(err)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError) as err:
            self.gone(err)

    def gone(self, err: Exception) -> None:
        self.failed, self.stream = True, self.devnull()
        # not a reader that went (EPIPE) or a closed descriptor (EBADF): a disk full, say
        if getattr(err, "errno", None) not in (None, errno.EPIPE, errno.EBADF) and self.other:
            reason = f"{self.name} cannot be written ({err.strerror or err})"
            self.other.write(f"note: {reason}; going on without it\n")

    def devnull(self):
        """A stream on this descriptor, pointed at /dev/null: the interpreter's last flush of the
        old stream finds a reader, and no file opened later takes the number of a closed one (and
        with it the program's output)."""
        to_devnull(self.fd)
        return open(self.fd, "w", closefd=False, errors="backslashreplace")

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def hold_closed_descriptors() -> None:
    """Point a closed stdin, stdout or stderr (`<&-`, `>&-`, `2>&-`) at /dev/null before anything
    opens a file: a checkpoint opened later would take the free number, and whatever writes to it
    (a warning from torch's C++ code on descriptor 2) would write into the checkpoint."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            to_devnull(fd)


def to_devnull(fd: int) -> None:
    """Point descriptor `fd` at /dev/null (open or closed before)."""
    null = os.open(os.devnull, os.O_RDWR)  # fd itself, when it is the lowest closed number
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def interrupted(signum: int, frame) -> None:
    """SIGTERM and SIGHUP outside training end the command as Ctrl-C does."""
    raise train_command.Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)  # for the command that starts a stopped run again
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    parser = build_parsers()[command]
    if command == "train" and argv and not argv[0].startswith("-"):
        parser.error(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)}")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        misplaced = [word for word in unknown if word in COMMANDS]
        hint = (
            f"; the command comes first: python main.py {misplaced[0]} [flags]" if misplaced else ""
        )
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    args.argv = given
    if getattr(args, "progress", False) is None:  # the one place the default is resolved
        args.progress = sys.stderr.isatty()
    try:
        return HANDLERS[command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Ctrl-C, or a SIGTERM or SIGHUP, where training is not there to stop
    except KeyboardInterrupt as stop:
        for s in train_command.STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # stopping: a further signal would only break the exit
        print("\ninterrupted", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)


if __name__ == "__main__":
    hold_closed_descriptors()
    sys.stdout = ClosedPipeSafe(sys.stdout, fd=1, name="stdout")
    sys.stderr = ClosedPipeSafe(sys.stderr, fd=2, name="stderr")
    sys.stdout.other = sys.stderr  # a stderr that fails is not told on stdout, which may be data
    # a file name that is not valid UTF-8 prints, escaped
    sys.stdout.reconfigure(errors="backslashreplace")
    for s in train_command.STOP_SIGNALS[1:]:
        signal.signal(s, interrupted)
    sys.exit(main())
