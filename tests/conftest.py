"""Make the project root (data.py, model.py, utils.py) and tests/ (idx_helpers.py, helpers.py) importable, and share
one small trained model among the tests that need one."""
import pathlib
import sys
from types import SimpleNamespace

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))

import pytest  # noqa: E402

from helpers import MNIST_DIR, run_main, train_args  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """2 epochs on 2,000 real training images (about 10 s): checkpoint folder, image folder and the printed output."""
    if not MNIST_DIR:
        pytest.skip("set MNIST_DIR to run real-data tests")
    folder = tmp_path_factory.mktemp("trained")
    code, out, err = run_main(train_args(folder, epochs=2))
    assert code == 0, err
    return SimpleNamespace(ckpt_dir=folder / "ckpt", image_dir=folder / "img", output=out, folder=folder)
