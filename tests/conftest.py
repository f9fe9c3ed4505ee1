"""Keep in-process torch on one thread (tiny tensors run fastest so) and share one small trained
run among the tests that need one. (pytest.ini puts the project root and tests/ on the path.)"""

from types import SimpleNamespace

import pytest
import torch
from helpers import MNIST_DIR, run_main, snapshot, train_args

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """2 epochs of a small VAE on 2,000 real training images: its folders and printed output, read
    only (a test that writes there works on helpers.copy_run's copy); skipped without MNIST."""
    if not MNIST_DIR:
        pytest.skip("set MNIST_DIR to run real-data tests")
    folder = tmp_path_factory.mktemp("trained")
    code, out, err = run_main(train_args(folder, epochs=2))
    assert code == 0, err
    before = snapshot(folder / "ckpt")
    yield SimpleNamespace(ckpt_dir=folder / "ckpt", image_dir=folder / "img", output=out)
    assert snapshot(folder / "ckpt") == before, "a test wrote into the shared run; use copy_run"
