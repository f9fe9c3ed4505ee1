"""Atomic writes under a killed process, and the picture helpers."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

import utils
from helpers import ROOT

SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
import utils
folder = sys.argv[1]
i = 0
while True:
    i += 1
    payload = {{"format": "vae-mnist/1", "step": i, "weights": torch.full((3_000_000,), float(i))}}
    utils.save_atomic(payload, folder + "/best.pt")
    utils.save_atomic(payload, folder + "/last.pt")
    print(i, flush=True)
"""


def test_sigkill_while_saving_leaves_complete_checkpoints(tmp_path):
    """A process SIGKILLed at arbitrary instants while saving 12 MB checkpoints: both files always load whole."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=str(ROOT)))
    killed_mid_write = 0
    for trial, delay in enumerate((0.05, 0.13, 0.21, 0.34, 0.47, 0.6)):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # both files written once
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_mid_write += bool(list(folder.glob(".*.tmp")))
        for name in ("best.pt", "last.pt"):
            ckpt = torch.load(folder / name, weights_only=True)
            assert ckpt["format"] == "vae-mnist/1"
            assert ckpt["weights"].shape == (3_000_000,) and bool((ckpt["weights"] == ckpt["step"]).all())
    assert killed_mid_write >= 1, "no kill landed inside a write; the test proved nothing"


def test_write_text_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "metrics.json"
    utils.write_text_atomic(json.dumps({"a": 1}), path)
    utils.write_text_atomic(json.dumps({"b": 2}), path)
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert path.stat().st_mode & 0o044  # readable by others as a plain write would be (umask permitting)


def test_figure_that_fails_to_render_keeps_the_old_picture(tmp_path, monkeypatch):
    images = torch.rand(4, 1, 28, 28)
    path = utils.plot_grid(images, "ok", tmp_path / "samples.png", nrow=2)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("renderer crashed")

    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    try:
        utils.plot_grid(images, "broken", path, nrow=2)
    except RuntimeError:
        pass
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["samples.png"]


def test_reconstruction_rows_are_drawn_from_the_given_images(tmp_path):
    top = torch.zeros(6, 1, 28, 28)
    bottom = torch.ones(6, 1, 28, 28)
    path = utils.plot_reconstructions(top, bottom, tmp_path / "r.png")
    with Image.open(path) as img:
        gray = np.asarray(img.convert("L"), dtype=np.float32)
    assert gray.std() > 30  # black row and white row, not one flat colour
