"""data.py and the download: IDX decoding and its checks, finding the files, the run's split,
batches, binarization, and torchvision's download served offline from a local mirror (and one that
cannot be reached)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import math
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

# IDX, the MNIST container: a big-endian 4-byte magic number (2051 for 3-d uint8 images, 2049 for
# 1-d uint8 labels), then one big-endian 4-byte size per dimension, then the uint8 values in C
# order. the magic numbers and the canonical shapes
IMAGES, LABELS = (2051, (60000, 28, 28)), (2049, (60000,))
FILE_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(
    array: np.ndarray, magic: int | None = None, dims: tuple[int, ...] | None = None
) -> bytes:
    """The IDX encoding of a uint8 array; magic and dims may be overridden to build broken files."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = magic or (IMAGES if array.ndim == 3 else LABELS)[0]
    header = int(magic).to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in dims or array.shape
    )
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool | None = None, **kwargs) -> None:
    """Write `array` as an IDX file, gzipped when gz (by default, when the name ends in .gz)."""
    raw = idx_bytes(array, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if (path.suffix == ".gz" if gz is None else gz) else raw)


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size), dtype=np.uint8)


def write_tiny_mnist(
    folder: Path, n_train=6, n_test=4, gz=True, dotted=False
) -> dict[str, np.ndarray]:
    """Write all four files with structurally valid but non-canonical content; returns name -> array
    written."""
    labels = [
        np.random.default_rng(s).integers(0, 10, size=n, dtype=np.uint8)
        for n, s in ((n_train, 2), (n_test, 4))
    ]
    arrays = dict(
        zip(FILE_NAMES, (random_images(n_train, 1), labels[0], random_images(n_test, 3), labels[1]))
    )
    for name, array in arrays.items():
        spelled = name.replace("-idx", ".idx") if dotted else name
        write_idx(folder / (spelled + (".gz" if gz else "")), array, gz=gz)
    return arrays


def refused(path: Path, spec=IMAGES, md5=None) -> str:
    """read_idx's DataError for `path`: one line naming the file and how to fix it."""
    with pytest.raises(data.DataError) as err:
        data.read_idx(path, *spec, md5)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "--data-dir" in message, (
        message
    )
    return message


@pytest.mark.parametrize("dotted", [False, True], ids=["-idx", ".idx"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_round_trips_images_and_labels(tmp_path, gz, dotted):
    written = write_tiny_mnist(tmp_path, n_train=5, n_test=3, gz=gz, dotted=dotted)
    for name, array in written.items():
        path = tmp_path / (
            (name.replace("-idx", ".idx") if dotted else name) + (".gz" if gz else "")
        )
        out = data.read_idx(path, *(IMAGES if array.ndim == 3 else LABELS), md5=None)
        assert out.dtype == np.uint8 and np.array_equal(out, array)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_checks_the_md5_of_the_uncompressed_content(tmp_path, gz):
    images = random_images(3, seed=13)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    write_idx(path, images, gz=gz)
    # computed here, from the encoding itself
    content_md5 = hashlib.md5(idx_bytes(images)).hexdigest()
    assert np.array_equal(data.read_idx(path, *IMAGES, md5=content_md5), images)
    assert "md5 mismatch" in refused(path, md5=hashlib.md5(idx_bytes(images) + b"x").hexdigest())
    if gz:  # the md5 of the .gz bytes is not the content's
        assert "md5 mismatch" in refused(path, md5=hashlib.md5(path.read_bytes()).hexdigest())


def test_read_idx_refuses_a_wrong_magic_number_and_images_that_are_not_28x28(tmp_path):
    write_idx(tmp_path / "f", random_images(2), magic=2049)
    assert "magic number 2049, expected 2051" in refused(tmp_path / "f")
    for size in ((27, 28), (28, 27), (32, 32)):
        write_idx(tmp_path / "f", random_images(3, size=size))  # header and body consistent
        assert f"dimensions (3, {size[0]}, {size[1]}), expected (N, 28, 28)" in refused(
            tmp_path / "f"
        )


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("change", ["truncated", "padded", "header", "short"])
def test_read_idx_refuses_a_body_that_does_not_match_its_header(tmp_path, gz, change):
    full = idx_bytes(random_images(4))
    body = dict(truncated=full[:-100], padded=full + b"\0", header=full[:16], short=full[:11])[
        change
    ]
    path = tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(body) if gz else body)
    assert ("shorter than its header" if change == "short" else "truncated or padded") in refused(
        path
    )


def test_read_idx_refuses_corrupt_and_cut_gzip_and_a_missing_file(tmp_path):
    (tmp_path / "noise.gz").write_bytes(
        np.random.default_rng(5).integers(0, 256, 500, dtype=np.uint8).tobytes()
    )
    packed = gzip.compress(idx_bytes(random_images(3)))
    # a download that stopped half way
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    for name in ("noise.gz", "cut.gz", "absent"):
        assert "cannot read it" in refused(tmp_path / name)


def test_read_idx_stops_a_gzip_bomb_and_a_huge_raw_file_at_the_canonical_size(tmp_path):
    """100 MB of zeros in a 100 kB .gz, and a sparse 200 MB raw file: each refused, with a small
    memory peak."""
    # a gzip file may hold several members, read one after the other
    member = gzip.compress(bytes(1 << 20))
    (tmp_path / "bomb.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(0, np.uint8), dims=(10**8,))) + member * 100
    )
    with open(tmp_path / "huge", "wb") as f:
        f.write(idx_bytes(np.zeros(0, np.uint8), dims=(200_000_000,)))
        f.truncate(8 + 200_000_000)
    for name in ("bomb.gz", "huge"):
        tracemalloc.start()
        message, peak = refused(tmp_path / name, LABELS), tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert "larger than the 60,008 bytes" in message and peak < 2_000_000, (message, peak)
    # the canonical size itself is fine
    labels = np.random.default_rng(3).integers(0, 10, 60000, np.uint8)
    write_idx(tmp_path / "exact.gz", labels)
    assert np.array_equal(data.read_idx(tmp_path / "exact.gz", *LABELS, md5=None), labels)


def test_find_mnist_files_in_the_folder_and_in_torchvisions_layout(tmp_path):
    expected = {
        "train-images-idx3-ubyte": tmp_path / "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte": tmp_path / "train-labels.idx1-ubyte",
        "t10k-images-idx3-ubyte": tmp_path / "MNIST" / "raw" / "t10k-images.idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte": tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte",
    }
    assert data.find_mnist_files(tmp_path) == dict.fromkeys(FILE_NAMES)
    # a folder is not a file
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").mkdir(parents=True)
    for path in expected.values():
        path.write_bytes(b"x")
    assert data.find_mnist_files(tmp_path) == expected


@pytest.mark.parametrize("absent", [FILE_NAMES, ["t10k-labels-idx1-ubyte"], FILE_NAMES[::2]])
def test_load_mnist_names_exactly_the_missing_files(tmp_path, absent):
    write_tiny_mnist(tmp_path)
    for name in absent:
        (tmp_path / (name + ".gz")).unlink()
    with pytest.raises(data.DataError) as err:
        data.load_mnist(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: missing ") and "\n" not in str(err.value)
    assert [name for name in FILE_NAMES if name in str(err.value)] == list(absent)


def test_run_split_is_a_seeded_partition_without_the_held_out_digit_cut_to_the_subset():
    labels = torch.arange(1000) % 10
    train, val = data.run_split(labels, val_size=100, seed=3)
    assert len(val) == 100 and sorted(train.tolist() + val.tolist()) == list(range(1000))
    same, other = data.run_split(labels, 100, seed=3)[1], data.run_split(labels, 100, seed=4)[1]
    assert torch.equal(same, val) and not torch.equal(other, val)
    # drawn at random
    assert not torch.equal(val, torch.arange(100)) and not torch.equal(val, torch.arange(900, 1000))
    train7, val7 = data.run_split(labels, 100, seed=3, exclude_digit=7, subset=50)
    # the same split, digit 7 left out
    assert set(val7.tolist()) == {i for i in val.tolist() if i % 10 != 7}
    # the first 50 of the rest
    assert train7.tolist() == [i for i in train.tolist() if i % 10 != 7][:50]


def indexed_images(n: int) -> torch.Tensor:  # uint8 images whose pixel [0, 0] holds their index
    images = torch.from_numpy(random_images(n, seed=21).copy())
    images[:, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return images


def test_batches_in_order_without_a_generator_and_a_seeded_permutation_with_one():
    images = indexed_images(37)
    out = list(data.batches(images, 8))
    assert [tuple(b.shape) for b in out] == [(8, 1, 28, 28)] * 4 + [(5, 1, 28, 28)]
    x = torch.cat(out)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    # in order
    torch.testing.assert_close(x[:, 0].double(), images.double() / 255, rtol=0, atol=1e-7)
    shuffled = lambda seed: torch.cat(
        list(data.batches(images, 8, torch.Generator().manual_seed(seed)))
    )  # noqa: E731
    a = shuffled(0)
    order = (a[:, 0, 0, 0] * 255).round().long()
    assert sorted(order.tolist()) == list(range(37)) and order.tolist() != list(range(37))
    assert torch.equal(a[:, 0], images[order].float() / 255)  # each image whole, as its index says
    assert torch.equal(shuffled(0), a) and not torch.equal(shuffled(1), a)


def test_binarize_draws_zeros_and_ones_with_the_intensity_as_probability():
    probs = torch.tensor([0.0, 0.1, 0.5, 0.83, 1.0]).repeat(20000, 1)
    out = data.binarize(probs, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    for p, mean in zip(probs[0].tolist(), out.double().mean(0).tolist()):
        assert abs(mean - p) <= 5 * math.sqrt(p * (1 - p) / 20000) + 1e-12, (p, mean)
    assert torch.equal(data.binarize(probs, torch.Generator().manual_seed(0)), out)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local MNIST mirror serving tiny gzipped IDX files, torchvision's MNIST set to it and to
    their md5s."""
    served = tmp_path / "mirror"
    arrays = write_tiny_mnist(served)
    quiet = type(
        "Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *args: None}
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(quiet, directory=served)
    )
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    resources = [
        (name + ".gz", hashlib.md5((served / (name + ".gz")).read_bytes()).hexdigest())
        for name in arrays
    ]
    # straight to the local mirror, whatever proxy is configured
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(
        torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"]
    )
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    yield served, arrays
    server.shutdown()
    server.server_close()


def test_download_puts_the_files_where_find_mnist_files_finds_them(tmp_path, mirror, monkeypatch):
    served, arrays = mirror
    data_dir = tmp_path / "data"
    commands.download_mnist(data_dir)
    found = data.find_mnist_files(data_dir)
    assert all(found[name].parent == data_dir / "MNIST" / "raw" for name in FILE_NAMES), found
    # load_data checks them against their own md5s
    for name, (magic, shape, _) in data.MNIST_FILES.items():
        content_md5 = hashlib.md5(
            gzip.decompress((served / (name + ".gz")).read_bytes())
        ).hexdigest()
        monkeypatch.setitem(data.MNIST_FILES, name, (magic, shape, content_md5))
    loaded = commands.load_data(str(data_dir))
    assert torch.equal(loaded["train_images"], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(
        loaded["test_labels"], torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long()
    )


@pytest.mark.parametrize("how", ["absent", "garbled"])
def test_a_download_that_fails_half_way_names_the_files_still_missing(tmp_path, mirror, how):
    # the mirror answers 404, or a proxy's error page, for the test files
    for name in FILE_NAMES[2:]:
        served = mirror[0] / (name + ".gz")
        served.unlink() if how == "absent" else served.write_bytes(b"<html>502 Bad Gateway</html>")
    with pytest.raises(data.DataError) as err:
        commands.load_data(str(tmp_path / "data"))
    assert [name for name in FILE_NAMES if name in str(err.value)] == list(FILE_NAMES[2:]), (
        err.value
    )
    found = data.find_mnist_files(tmp_path / "data")
    assert [found[name].parent for name in FILE_NAMES[:2]] == [
        tmp_path / "data" / "MNIST" / "raw"
    ] * 2
    # nothing rejected is kept as if it were MNIST
    assert data.missing_files(tmp_path / "data") == list(FILE_NAMES[2:])


def test_an_unreachable_mirror_names_the_missing_files_and_leaves_no_empty_folders(
    tmp_path, monkeypatch
):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{port}/"])
    (tmp_path / "mine").mkdir()
    for data_dir in (tmp_path / "new" / "data", tmp_path / "mine"):
        with pytest.raises(data.DataError) as err:
            commands.load_data(str(data_dir))
        message = str(err.value)
        assert (
            message.startswith(f"MNIST is not in {data_dir}, and the download failed (")
            and "\n" not in message
        )
        assert "Connection refused" in message and all(name in message for name in FILE_NAMES), (
            message
        )
    # the user's folder kept
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []


@needs_mnist
def test_the_real_data_set_loads_checked():
    mnist = data.load_mnist(MNIST_DIR)
    assert list(mnist) == ["train_images", "train_labels", "test_images", "test_labels"]
    assert [tuple(v.shape) for v in mnist.values()] == [
        (60000, 28, 28),
        (60000,),
        (10000, 28, 28),
        (10000,),
    ]
    # MNIST's published class counts
    assert mnist["train_labels"].bincount().tolist()[:2] == [5923, 6742]
    assert mnist["train_images"].double().mean().item() / 255 == pytest.approx(0.1307, abs=1e-4)
