"""data.py: IDX decoding and its checks, finding the files, the run's split, batches, to_float, and
torchvision's download served offline from a local mirror (and one that cannot be reached)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
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
from files import UserError

# IDX, the MNIST container: a big-endian 4-byte magic number (2051 for 3-d uint8 images, 2049 for
# 1-d uint8 labels), a big-endian 4-byte size per dimension, then the uint8 values in C order
IMAGES, LABELS = (2051, (60000, 28, 28)), (2049, (60000,))
FILE_NAMES = tuple(mnist_files.MNIST_FILES)


def idx_bytes(array: np.ndarray, magic: int | None = None, dims: tuple | None = None) -> bytes:
    """The IDX encoding of a uint8 array; magic and dims may be overridden to build broken files."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = magic or (IMAGES if array.ndim == 3 else LABELS)[0]
    sizes = b"".join(int(d).to_bytes(4, "big") for d in dims or array.shape)
    return int(magic).to_bytes(4, "big") + sizes + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool | None = None, **kwargs) -> None:
    """Write `array` as an IDX file, gzipped when gz (by default, when the name ends in .gz)."""
    raw = idx_bytes(array, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if (path.suffix == ".gz" if gz is None else gz) else raw)


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size), dtype=np.uint8)


def tiny_mnist(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Write the four files, gzipped, valid but not MNIST's content: name -> (path, array)."""
    labels = np.random.default_rng(2).integers(0, 10, size=10, dtype=np.uint8)
    arrays = (random_images(6, 1), labels[:6], random_images(4, 3), labels[6:])
    written = {name: (folder / f"{name}.gz", array) for name, array in zip(FILE_NAMES, arrays)}
    for path, array in written.values():
        write_idx(path, array)
    return written


def refused(path: Path, spec=IMAGES, md5=None) -> str:
    """read_idx's DataError for `path`: one line naming the file and how to supply MNIST."""
    with pytest.raises(mnist_files.DataError) as err:
        mnist_files.read_idx(path, *spec, md5)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and message.endswith(mnist_files.HOW_TO_FIX), message
    assert "\n" not in message and "--" not in message, message  # no flag: this is the library
    return message


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_checks_the_md5_of_the_uncompressed_content(tmp_path, gz):
    images = random_images(3, seed=13)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    write_idx(path, images, gz=gz)
    content_md5 = hashlib.md5(idx_bytes(images)).hexdigest()  # computed here, from the encoding
    assert np.array_equal(mnist_files.read_idx(path, *IMAGES, md5=content_md5), images)
    assert "md5 mismatch" in refused(path, md5=hashlib.md5(idx_bytes(images) + b"x").hexdigest())
    if gz:  # the md5 of the .gz bytes is not the content's
        assert "md5 mismatch" in refused(path, md5=hashlib.md5(path.read_bytes()).hexdigest())


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
@pytest.mark.parametrize("case", BROKEN)
def test_read_idx_refuses_a_file_that_is_not_an_mnist_file_of_its_kind(tmp_path, gz, case):
    body, expected = BROKEN[case]
    path = tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(body) if gz else body)
    assert expected in refused(path)


def test_read_idx_refuses_corrupt_and_cut_gzip_and_a_missing_file(tmp_path):
    noise = np.random.default_rng(5).integers(0, 256, 500, dtype=np.uint8).tobytes()
    (tmp_path / "noise.gz").write_bytes(noise)
    packed = gzip.compress(idx_bytes(random_images(3)))
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])  # a download stopped half way
    for name in ("noise.gz", "cut.gz", "absent"):
        assert "cannot read it" in refused(tmp_path / name)


def test_read_idx_stops_a_gzip_bomb_and_a_huge_raw_file_at_the_canonical_size(tmp_path):
    """100 MB of zeros in a 100 kB .gz, and a sparse 200 MB raw file: refused, with a small peak."""
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
    write_idx(tmp_path / "exact.gz", labels)
    assert np.array_equal(mnist_files.read_idx(tmp_path / "exact.gz", *LABELS, md5=None), labels)


def test_find_mnist_files_in_the_folder_and_in_torchvisions_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    places = [tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels.idx1-ubyte"]
    places += [raw / "t10k-images.idx3-ubyte.gz", raw / "t10k-labels-idx1-ubyte"]
    assert mnist_files.find_mnist_files(tmp_path) == dict.fromkeys(FILE_NAMES)
    for path in places:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert mnist_files.find_mnist_files(tmp_path) == dict(zip(FILE_NAMES, places))


@pytest.mark.parametrize("absent", [FILE_NAMES, FILE_NAMES[3:], FILE_NAMES[::2]])
def test_load_mnist_names_exactly_the_missing_files_and_no_flag(tmp_path, absent):
    written = tiny_mnist(tmp_path)
    for name in absent:
        written[name][0].unlink()
    with pytest.raises(ValueError) as err:  # a DataError is a ValueError for a notebook
        data.load_mnist(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path}: missing ") and "\n" not in message
    assert [name for name in FILE_NAMES if name in message] == list(absent)
    assert "download=True" in message and "--" not in message


def test_run_split_is_a_seeded_partition_without_the_held_out_digit_cut_to_the_subset():
    labels = torch.arange(2000) % 10
    train, val = data.run_split(labels, val_size=200, seed=3)
    assert len(val) == 200 and sorted(train.tolist() + val.tolist()) == list(range(2000))
    same, other = data.run_split(labels, 200, seed=3)[1], data.run_split(labels, 200, seed=4)[1]
    assert torch.equal(same, val) and not torch.equal(other, val)
    # drawn at random
    assert not torch.equal(val, torch.arange(200)) and not torch.equal(
        val, torch.arange(1800, 2000)
    )
    train7, val7 = data.run_split(labels, 200, seed=3, exclude_digit=7, subset=150)
    assert set(val7.tolist()) == {i for i in val.tolist() if i % 10 != 7}  # the same split, no 7
    assert train7.tolist() == [i for i in train.tolist() if i % 10 != 7][:150]  # the first 150 left
    with pytest.raises(ValueError, match="train on 99 images and validate on 200; each needs"):
        data.run_split(labels, 200, seed=3, subset=99)


def test_to_float_scales_a_copy_and_refuses_what_is_not_uint8_images():
    images = torch.from_numpy(random_images(3, seed=8))
    before = images.clone()
    x = data.to_float(images)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 28, 28) and torch.equal(images, before)
    assert torch.equal((x[:, 0] * 255).round(), images.float()) and 0 <= x.min() <= x.max() <= 1
    assert torch.equal(data.to_float(images), x)  # the same again: nothing was changed
    for wrong in (x[:, 0], images[None], images[0]):  # float images, (1, B, 28, 28), one image
        with pytest.raises(ValueError, match=r"to_float takes uint8 images \(B, 28, 28\), got "):
            data.to_float(wrong)


def test_batches_in_order_without_a_generator_and_a_seeded_permutation_with_one():
    images = torch.from_numpy(random_images(37, seed=21))
    images[:, 0, 0] = torch.arange(37, dtype=torch.uint8)  # pixel [0, 0] holds the image's index
    out = list(data.batches(images, 8))
    assert [tuple(b.shape) for b in out] == [(8, 1, 28, 28)] * 4 + [(5, 1, 28, 28)]
    assert torch.equal(torch.cat(out)[:, 0], images.float() / 255)  # in order

    def shuffled(seed: int) -> torch.Tensor:
        return torch.cat(list(data.batches(images, 8, torch.Generator().manual_seed(seed))))

    a = shuffled(0)
    order = (a[:, 0, 0, 0] * 255).round().long()
    assert sorted(order.tolist()) == list(range(37)) and order.tolist() != list(range(37))
    assert torch.equal(a[:, 0], images[order].float() / 255)  # each image whole, as its index says
    assert torch.equal(shuffled(0), a) and not torch.equal(shuffled(1), a)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local MNIST mirror serving tiny gzipped IDX files; torchvision's MNIST set to it, to their
    md5s, and data.py to their content's md5s, so that what it downloads also loads."""
    written = tiny_mnist(tmp_path / "mirror")
    quiet = type(
        "Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *args: None}
    )
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


def test_load_mnist_downloads_missing_files_where_it_finds_them_and_loads_them(tmp_path, mirror):
    folder = tmp_path / "data"
    loaded = data.load_mnist(folder, download=True)
    assert set(mnist_files.find_mnist_files(folder).values()) <= set(
        (folder / "MNIST" / "raw").iterdir()
    )
    for key, name in zip(loaded, FILE_NAMES):
        assert torch.equal(loaded[key], torch.from_numpy(mirror[name][1]).to(loaded[key].dtype))
    assert loaded["test_labels"].dtype == torch.int64
    for path in (folder / "MNIST" / "raw").glob("train-*"):
        path.unlink()
    test_set = data.load_mnist(folder, sets=("test",))  # needs only the test files
    assert list(test_set) == ["test_images", "test_labels"]
    assert torch.equal(test_set["test_images"], loaded["test_images"])


@pytest.mark.parametrize("how", ["absent", "garbled"])
def test_a_download_that_fails_half_way_names_the_files_still_missing(tmp_path, mirror, how):
    for name in FILE_NAMES[2:]:  # the mirror answers 404, or a proxy's error page
        served = mirror[name][0]
        served.unlink() if how == "absent" else served.write_bytes(b"<html>502 Bad Gateway</html>")
    with pytest.raises(mnist_files.DataError) as err:
        data.load_mnist(tmp_path / "data", download=True)
    assert [name for name in FILE_NAMES if name in str(err.value)] == list(FILE_NAMES[2:])
    assert str(err.value).endswith("or pass a folder that holds all four files"), err.value
    found = mnist_files.find_mnist_files(tmp_path / "data")
    assert {found[name].parent for name in FILE_NAMES[:2]} == {tmp_path / "data" / "MNIST" / "raw"}
    # nothing rejected is kept as if it were MNIST
    assert mnist_files.missing_files(tmp_path / "data") == list(FILE_NAMES[2:])


def test_an_unreachable_mirror_is_one_line_that_names_the_files_and_leaves_no_folders(
    tmp_path, monkeypatch
):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{port}/"])
    (tmp_path / "mine").mkdir()
    with pytest.raises(mnist_files.DataError) as err:
        data.load_mnist(tmp_path / "mine", download=True)
    message = str(err.value)
    assert message.startswith(f"MNIST is not in {tmp_path / 'mine'}, and the download failed (")
    assert "Connection refused" in message and all(name in message for name in FILE_NAMES)
    assert message.endswith("into a folder and pass that folder") and "\n" not in message
    with pytest.raises(UserError) as err:  # the command line adds the flag that names the folder
        commands.load_data(str(tmp_path / "new" / "data"))
    assert str(err.value) == message.replace("mine", "new/data") + " as --data-dir"
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []  # kept as was


@needs_mnist
def test_the_real_data_set_loads_checked():
    mnist = data.load_mnist(MNIST_DIR)
    assert list(mnist) == ["train_images", "train_labels", "test_images", "test_labels"]
    shapes = [
        (60000, 28, 28),
        (60000,),
        (mnist_files.TEST_IMAGES, 28, 28),
        (mnist_files.TEST_IMAGES,),
    ]
    assert [tuple(v.shape) for v in mnist.values()] == shapes
    assert mnist["train_labels"].bincount().tolist()[:2] == [5923, 6742]  # published class counts
    assert mnist["train_images"].double().mean().item() / 255 == pytest.approx(0.1307, abs=1e-4)
