"""Make the project root and tests/ importable, keep in-process torch on one thread (tiny tensors
run fastest so), and share one small trained run among the tests that need one."""

import pathlib
import sys
from types import SimpleNamespace

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import MNIST_DIR, run_main, snapshot, train_args  # noqa: E402

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
