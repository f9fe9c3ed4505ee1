"""What the benchmark scripts share: a parser whose errors are one line, the --data-dir flag, the
device sync that timing needs, and the exit that turns a user's mistake into one line on stderr and
status 2, as main.py does.

Each script puts the repository root on sys.path before it imports this module (as
`benchmarks.common`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import torch

import main
from files import UserError


def parser(doc: str) -> argparse.ArgumentParser:
    """main.py's parser class (a bad flag is one line, exit 2), showing the script's docstring for
    --help."""
    return main.Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=os.environ.get("MNIST_DIR", "data"),
        help="folder with the four MNIST files (default: $MNIST_DIR or data)",
    )


def positive_int(high: int = 10**9):
    """An argparse type: a whole number from 1 to `high`, else a one-line error naming the range."""
    return main.number(int, 1, high)


def main_py(args: argparse.Namespace, *flags: str) -> list[str]:
    """The command line of a real `python main.py` run on the script's --data-dir and --device."""
    main_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main.py")
    return [sys.executable, main_file, *flags, "--data-dir", args.data_dir, "--device", args.device]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer stopped next measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(entry: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Exit with the status of entry(argv), a script's main; a UserError (bad data, checkpoint,
    folder or setting) becomes one `error:` line on stderr and status 2."""
    try:
        code = entry(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)
