"""Make the project root and tests/ importable, and share one small trained run among the tests that need one.

The shared run is read-only for the tests: a test that writes beside a checkpoint (metrics.json, anomaly_scores.csv)
works on its own copy (helpers.copy_run), and the fixture checks at the end that its files were not changed.
"""
import hashlib
import pathlib
import sys
from types import SimpleNamespace

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))

import pytest  # noqa: E402

from helpers import MNIST_DIR, run_main, train_args  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: fastest, and immune to spin-wait slowdowns when other jobs load
    the CPUs (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digest(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """2 epochs on 2,000 real training images (about 10 s): checkpoint folder, image folder and the printed output."""
    if not MNIST_DIR:
        pytest.skip("set MNIST_DIR to run real-data tests")
    folder = tmp_path_factory.mktemp("trained")
    code, out, err = run_main(train_args(folder, epochs=2))
    assert code == 0, err
    before = digest(folder / "ckpt")
    yield SimpleNamespace(ckpt_dir=folder / "ckpt", image_dir=folder / "img", output=out, folder=folder)
    assert digest(folder / "ckpt") == before, "a test wrote into the shared trained run; use helpers.copy_run"
