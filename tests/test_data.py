"""IDX files and their checks, finding and downloading them, the run's split, to_float, batches."""

import functools
import gzip
import hashlib
import http.server
import socket
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import MNIST_DIR, needs_mnist

import commands
import data
import mnist_files

# IDX: a big-endian int32 magic (2051: uint8 images, 2049: labels), an int32 per dimension, bytes
IMAGES, LABELS = (2051, (60000, 28, 28)), (2049, (60000,))
FILE_NAMES = tuple(mnist_files.MNIST_FILES)


def idx_bytes(array: np.ndarray, magic: int | None = None, dims: tuple | None = None) -> bytes:
    """The IDX encoding of a uint8 array; magic and dims may be overridden to build broken files."""
    magic = magic or (IMAGES if array.ndim == 3 else LABELS)[0]
    sizes = b"".join(int(d).to_bytes(4, "big") for d in dims or array.shape)
    return int(magic).to_bytes(4, "big") + sizes + array.tobytes()


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size), dtype=np.uint8)


def tiny_mnist(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Write the four files, gzipped, valid but not MNIST's content: name -> (path, array)."""
    labels = np.random.default_rng(2).integers(0, 10, size=10, dtype=np.uint8)
    arrays = (random_images(6, 1), labels[:6], random_images(4, 3), labels[6:])
    written = {name: (folder / f"{name}.gz", array) for name, array in zip(FILE_NAMES, arrays)}
    folder.mkdir(parents=True, exist_ok=True)
    for path, array in written.values():
        path.write_bytes(gzip.compress(idx_bytes(array)))
    return written


def refused(path: Path, spec=IMAGES, md5=None) -> str:
    """read_idx's DataError for `path`: one line naming the file and how to supply MNIST."""
    with pytest.raises(mnist_files.DataError) as err:
        mnist_files.read_idx(path, *spec, md5)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and message.endswith(mnist_files.HOW_TO_FIX), message
    assert "\n" not in message and "--" not in message, message  # no flag: this is the library
    return message


FULL = idx_bytes(random_images(4))
BROKEN = {  # the bytes of a file, and what read_idx says of them
    "magic": (idx_bytes(random_images(2), magic=2049), "magic number 2049, expected 2051"),
    "27x28": (idx_bytes(random_images(3, size=(27, 28))), "dimensions (3, 27, 28), expected (N, "),
    "28x32": (idx_bytes(random_images(3, size=(28, 32))), "dimensions (3, 28, 32), expected (N, "),
    "truncated": (FULL[:-100], "truncated or padded"),
    "padded": (FULL + b"\0", "truncated or padded"),
    "header only": (FULL[:16], "truncated or padded"),
    "short": (FULL[:11], "shorter than its header"),
}


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_checks_the_md5_of_the_content_and_refuses_what_is_no_mnist_file(tmp_path, gz):
    images, path = random_images(3, seed=13), tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(idx_bytes(images)) if gz else idx_bytes(images))
    content_md5 = hashlib.md5(idx_bytes(images)).hexdigest()  # computed here, from the encoding
    assert np.array_equal(mnist_files.read_idx(path, *IMAGES, md5=content_md5), images)
    assert "md5 mismatch" in refused(path, md5=hashlib.md5(idx_bytes(images) + b"x").hexdigest())
    if gz:  # the md5 of the .gz bytes is not the content's
        assert "md5 mismatch" in refused(path, md5=hashlib.md5(path.read_bytes()).hexdigest())
    for body, expected in BROKEN.values():
        path.write_bytes(gzip.compress(body) if gz else body)
        assert expected in refused(path)


def test_read_idx_refuses_unreadable_files_and_stops_a_bomb_at_the_canonical_size(tmp_path):
    """Noise, a cut .gz, no file; a 100 kB .gz of 100 MB and a sparse 200 MB file: a small peak."""
    packed = gzip.compress(idx_bytes(random_images(3)))
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "noise.gz").write_bytes(np.random.default_rng(5).bytes(500))
    assert all("cannot read it" in refused(tmp_path / n) for n in ("noise.gz", "cut.gz", "absent"))
    member = gzip.compress(bytes(1 << 20))  # a gzip file may hold several members, read in turn
    header = gzip.compress(idx_bytes(np.zeros(0, np.uint8), dims=(10**8,)))
    (tmp_path / "bomb.gz").write_bytes(header + member * 100)
    with open(tmp_path / "huge", "wb") as f:
        f.write(idx_bytes(np.zeros(0, np.uint8), dims=(200_000_000,)))
        f.truncate(8 + 200_000_000)
    for name in ("bomb.gz", "huge"):
        tracemalloc.start()
        message, peak = refused(tmp_path / name, LABELS), tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert "larger than the 60,008 bytes" in message and peak < 2_000_000, (message, peak)
    labels = np.random.default_rng(3).integers(0, 10, 60000, np.uint8)  # the canonical size is fine
    (tmp_path / "exact.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    assert np.array_equal(mnist_files.read_idx(tmp_path / "exact.gz", *LABELS, md5=None), labels)


def test_files_are_found_in_the_folder_or_torchvisions_layout_and_missing_ones_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    places = [tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels.idx1-ubyte"]
    places += [raw / "t10k-images.idx3-ubyte.gz", raw / "t10k-labels-idx1-ubyte"]
    assert mnist_files.find_mnist_files(tmp_path) == dict.fromkeys(FILE_NAMES)
    raw.mkdir(parents=True)
    for path in places:
        path.write_bytes(b"x")
    assert mnist_files.find_mnist_files(tmp_path) == dict(zip(FILE_NAMES, places))
    for absent in (FILE_NAMES, FILE_NAMES[3:], FILE_NAMES[::2]):
        for name, path in zip(FILE_NAMES, places):
            path.unlink(missing_ok=True) if name in absent else path.write_bytes(b"x")
        with pytest.raises(ValueError) as err:  # a DataError is a ValueError for a notebook
            data.load_mnist(tmp_path)
        message = str(err.value)
        assert message.startswith(f"{tmp_path}: missing ") and "\n" not in message
        assert [name for name in FILE_NAMES if name in message] == list(absent)
        assert "download=True" in message and "--" not in message


def test_a_seeded_split_to_float_and_batches_in_order_or_in_a_seeded_permutation():
    """The split: a partition without the held-out digit, cut to the subset; to_float: a copy."""
    labels = torch.arange(2000) % 10
    train, val = data.run_split(labels, val_size=200, seed=3)
    assert len(val) == 200 and sorted(train.tolist() + val.tolist()) == list(range(2000))
    same, other = data.run_split(labels, 200, seed=3)[1], data.run_split(labels, 200, seed=4)[1]
    assert torch.equal(same, val) and not torch.equal(other, val)
    ends = (torch.arange(200), torch.arange(1800, 2000))
    assert not any(torch.equal(val, end) for end in ends)  # drawn at random
    train7, val7 = data.run_split(labels, 200, seed=3, exclude_digit=7, subset=150)
    assert set(val7.tolist()) == {i for i in val.tolist() if i % 10 != 7}  # the same split, no 7
    assert train7.tolist() == [i for i in train.tolist() if i % 10 != 7][:150]  # the first 150 left
    images = torch.from_numpy(random_images(37, seed=21))
    images[:, 0, 0] = torch.arange(37, dtype=torch.uint8)  # pixel [0, 0] holds the image's index
    before, x = images.clone(), data.to_float(images)
    assert x.dtype == torch.float32 and x.shape == (37, 1, 28, 28) and torch.equal(images, before)
    assert torch.equal((x[:, 0] * 255).round(), images.float()) and 0 <= x.min() <= x.max() <= 1
    for wrong in (x[:, 0], images[None], images[0]):  # float images, (1, B, 28, 28), one image
        with pytest.raises(ValueError, match=r"to_float takes uint8 images \(B, 28, 28\), got "):
            data.to_float(wrong)
    out = list(data.batches(images, 8))
    assert [tuple(b.shape) for b in out] == [(8, 1, 28, 28)] * 4 + [(5, 1, 28, 28)]
    assert torch.equal(torch.cat(out)[:, 0], images.float() / 255)  # in order
    generators = (torch.Generator().manual_seed(seed) for seed in (0, 0, 1))
    a, again, b = (torch.cat(list(data.batches(images, 8, gen))) for gen in generators)
    order = (a[:, 0, 0, 0] * 255).round().long()
    assert sorted(order.tolist()) == list(range(37)) and order.tolist() != list(range(37))
    assert torch.equal(a[:, 0], images[order].float() / 255)  # each image whole, as its index says
    assert torch.equal(again, a) and not torch.equal(b, a)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local MNIST mirror of tiny files; torchvision's MNIST and data.py set to their md5s."""
    written = tiny_mnist(tmp_path / "mirror")
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    handler = functools.partial(quiet, directory=tmp_path / "mirror")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    resources = [(p.name, hashlib.md5(p.read_bytes()).hexdigest()) for p, _ in written.values()]
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # straight to the mirror, whatever the proxy
    url = f"http://127.0.0.1:{server.server_port}/"
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    for name, (magic, shape, _) in mnist_files.MNIST_FILES.items():
        content_md5 = hashlib.md5(idx_bytes(written[name][1])).hexdigest()
        monkeypatch.setitem(mnist_files.MNIST_FILES, name, (magic, shape, content_md5))
    yield written
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("how", ["absent", "garbled"])
def test_a_download_failing_half_way_names_what_is_missing_and_retries(tmp_path, mirror, how):
    """The files downloaded go where load_mnist finds them, only what did arrive whole is kept."""
    folder, raw = tmp_path / "data", tmp_path / "data" / "MNIST" / "raw"
    for name in FILE_NAMES[2:]:  # the mirror answers 404, or a proxy's error page
        served = mirror[name][0]
        served.unlink() if how == "absent" else served.write_bytes(b"<html>502 Bad Gateway</html>")
    with pytest.raises(mnist_files.DataError) as err:
        data.load_mnist(folder, download=True)
    assert [name for name in FILE_NAMES if name in str(err.value)] == list(FILE_NAMES[2:])
    assert str(err.value).endswith("or pass a folder that holds all four files"), err.value
    assert {mnist_files.find_mnist_files(folder)[name].parent for name in FILE_NAMES[:2]} == {raw}
    assert mnist_files.missing_files(folder) == list(FILE_NAMES[2:])  # nothing rejected is kept
    tiny_mnist(tmp_path / "mirror")  # the mirror mended
    loaded = data.load_mnist(folder, download=True)
    assert set(mnist_files.find_mnist_files(folder).values()) <= set(raw.iterdir())
    for key, name in zip(loaded, FILE_NAMES):
        assert torch.equal(loaded[key], torch.from_numpy(mirror[name][1]).to(loaded[key].dtype))
    assert loaded["test_labels"].dtype == torch.int64
    for path in raw.glob("train-*"):
        path.unlink()
    test_set = data.load_mnist(folder, sets=("test",))  # needs only the test files
    assert list(test_set) == ["test_images", "test_labels"]
    assert torch.equal(test_set["test_images"], loaded["test_images"])


def test_an_unreachable_mirror_is_one_line_naming_the_files_and_no_folder(tmp_path, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as closed:  # a port nobody listens on, once closed
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    (tmp_path / "mine").mkdir()
    with pytest.raises(mnist_files.DataError) as err:
        data.load_mnist(tmp_path / "mine", download=True)
    message = str(err.value)
    assert message.startswith(f"MNIST is not in {tmp_path / 'mine'}, and the download failed (")
    assert "Connection refused" in message and all(name in message for name in FILE_NAMES)
    assert message.endswith("into a folder and pass that folder") and "\n" not in message
    with pytest.raises(commands.UserError) as err:  # the command line adds the folder's flag
        commands.load_data(str(tmp_path / "new" / "data"))
    assert str(err.value) == message.replace("mine", "new/data") + " as --data-dir"
    assert [p.name for p in tmp_path.rglob("*")] == ["mine"]  # kept as it was


@needs_mnist
def test_the_real_data_set_loads_checked():
    mnist = data.load_mnist(MNIST_DIR)
    assert list(mnist) == ["train_images", "train_labels", "test_images", "test_labels"]
    test = mnist_files.TEST_IMAGES
    assert [v.shape for v in mnist.values()] == [(60000, 28, 28), (60000,), (test, 28, 28), (test,)]
    assert mnist["train_labels"].bincount().tolist()[:2] == [5923, 6742]  # published class counts
    assert mnist["train_images"].double().mean().item() / 255 == pytest.approx(0.1307, abs=1e-4)
