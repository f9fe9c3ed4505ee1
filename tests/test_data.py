"""Tests for data.py: IDX decoding and checks, file discovery, offline download failure, split and batching."""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from idx_helpers import (
    FILE_NAMES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    idx_bytes,
    random_images,
    random_labels,
    write_gzip_of_zeros,
    write_idx,
    write_tiny_mnist,
)

IMG_SHAPE = (60000, 28, 28)  # only the trailing dims are checked by read_idx; N comes from the header
LBL_SHAPE = (60000,)


def assert_data_error(excinfo, path) -> str:
    """The DataError message names the file and is a single line; returns the message."""
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- read_idx on valid files


@pytest.mark.parametrize("spelling", ["train-images-idx3-ubyte", "train-images.idx3-ubyte"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_images_roundtrip(tmp_path, spelling, gz):
    images = random_images(5, seed=11)
    path = tmp_path / (spelling + (".gz" if gz else ""))
    write_idx(path, images, gz=gz)
    out = data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=None)
    assert out.dtype == np.uint8
    assert out.shape == (5, 28, 28)
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("spelling", ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_labels_roundtrip(tmp_path, spelling, gz):
    labels = random_labels(17, seed=12)
    path = tmp_path / (spelling + (".gz" if gz else ""))
    write_idx(path, labels, gz=gz)
    out = data.read_idx(path, LABELS_MAGIC, LBL_SHAPE, md5=None)
    assert out.dtype == np.uint8
    assert out.shape == (17,)
    np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_accepts_md5_of_uncompressed_content(tmp_path, gz):
    images = random_images(3, seed=13)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    raw = write_idx(path, images, gz=gz)
    # md5 of the uncompressed IDX bytes, computed here independently of data.py
    digest = hashlib.md5(idx_bytes(images)).hexdigest()
    assert raw == idx_bytes(images)
    out = data.read_idx(path, IMAGES_MAGIC, (10000, 28, 28), md5=digest)
    np.testing.assert_array_equal(out, images)


# ----------------------------------------------------------------------------- read_idx on broken files


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, random_images(2), magic=LABELS_MAGIC)  # label magic on an image file
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=None)
    msg = assert_data_error(excinfo, path)
    assert str(LABELS_MAGIC) in msg


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_truncated_body(tmp_path, gz):
    images = random_images(4)
    full = idx_bytes(images)
    cut = full[: len(full) - 100]  # header promises 4 images, fewer bytes follow
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=None)
    assert_data_error(excinfo, path)


def test_read_idx_padded_body(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(random_labels(5)) + b"\x00")
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, LABELS_MAGIC, LBL_SHAPE, md5=None)
    assert_data_error(excinfo, path)


@pytest.mark.parametrize("nbytes", [0, 3, 11])
def test_read_idx_shorter_than_header(tmp_path, nbytes):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(random_images(1))[:nbytes])
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=None)
    assert_data_error(excinfo, path)


@pytest.mark.parametrize("size", [(27, 28), (28, 27), (32, 32)])
def test_read_idx_wrong_dims(tmp_path, size):
    images = random_images(3, size=size)  # consistent header and body, but not 28x28
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, images)
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=None)
    assert_data_error(excinfo, path)


def test_read_idx_corrupt_gz(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=None)
    assert_data_error(excinfo, path)


def test_read_idx_cut_gz_stream(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    packed = gzip.compress(idx_bytes(random_images(3)))
    path.write_bytes(packed[: len(packed) // 2])  # a download that stopped half way
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=None)
    assert_data_error(excinfo, path)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_wrong_md5(tmp_path, gz):
    images = random_images(2)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    write_idx(path, images, gz=gz)
    wrong = hashlib.md5(idx_bytes(images) + b"x").hexdigest()
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=wrong)
    msg = assert_data_error(excinfo, path)
    assert "md5" in msg


def test_read_idx_md5_of_gz_bytes_is_rejected(tmp_path):
    """The md5 is of the uncompressed content: the md5 of the .gz bytes themselves must not pass."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, random_images(2), gz=True)
    with pytest.raises(data.DataError):
        data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=hashlib.md5(path.read_bytes()).hexdigest())


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, IMAGES_MAGIC, IMG_SHAPE, md5=None)
    assert_data_error(excinfo, path)


def refusal_and_peak_memory(path, magic, shape) -> tuple[str, int]:
    """read_idx's DataError message for `path`, and the bytes allocated at the peak while it ran (numpy and
    zlib buffers included)."""
    tracemalloc.start()
    try:
        with pytest.raises(data.DataError) as excinfo:
            data.read_idx(path, magic, shape, md5=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return assert_data_error(excinfo, path), peak


def test_read_idx_gzip_bomb_stops_at_the_canonical_size(tmp_path):
    """A 100 KB .gz inflating to 100 MB, under a label header that claims 10^8 labels: refused after inflating
    no more than the canonical file's 60,008 bytes (the whole stream would be 100 MB in memory)."""
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_gzip_of_zeros(path, idx_bytes(np.zeros(0, np.uint8), dims=(10**8,)), megabytes=100)
    msg, peak = refusal_and_peak_memory(path, LABELS_MAGIC, LBL_SHAPE)
    assert "larger than the 60,008 bytes" in msg
    assert peak < 5_000_000


def test_read_idx_huge_raw_file_is_not_read_whole(tmp_path):
    """A 200 MB raw file (sparse: it takes no disk) under a label header: refused after reading 60,009 bytes."""
    path = tmp_path / "train-labels-idx1-ubyte"
    with open(path, "wb") as f:
        f.write(idx_bytes(np.zeros(0, np.uint8), dims=(200_000_000,)))
        f.truncate(8 + 200_000_000)
    msg, peak = refusal_and_peak_memory(path, LABELS_MAGIC, LBL_SHAPE)
    assert "larger than the 60,008 bytes" in msg
    assert peak < 5_000_000


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_more_images_than_the_canonical_file(tmp_path, gz):
    """A consistent header and body, one image more than t10k holds: larger than any MNIST file of its kind."""
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    write_idx(path, np.zeros((10001, 28, 28), np.uint8), gz=gz)
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path, IMAGES_MAGIC, (10000, 28, 28), md5=None)
    assert "larger than the 7,840,016 bytes" in assert_data_error(excinfo, path)


def test_read_idx_accepts_the_canonical_size_exactly(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels = random_labels(10000, seed=3)
    write_idx(path, labels)
    np.testing.assert_array_equal(data.read_idx(path, LABELS_MAGIC, (10000,), md5=None), labels)


# ----------------------------------------------------------------------------- find_mnist_files


def test_find_mnist_files_in_folder_both_spellings(tmp_path):
    expected = {
        "train-images-idx3-ubyte": tmp_path / "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte": tmp_path / "train-labels.idx1-ubyte",
        "t10k-images-idx3-ubyte": tmp_path / "t10k-images.idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte": tmp_path / "t10k-labels-idx1-ubyte",
    }
    for path in expected.values():
        path.write_bytes(b"x")
    found = data.find_mnist_files(tmp_path)
    assert set(found) == set(FILE_NAMES)
    for name, path in expected.items():
        assert found[name] is not None and Path(found[name]) == path, name


def test_find_mnist_files_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_tiny_mnist(raw, gz=False)
    found = data.find_mnist_files(tmp_path)
    for name in FILE_NAMES:
        assert found[name] is not None and Path(found[name]) == raw / name


def test_find_mnist_files_missing_are_none(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"x")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"x")
    (tmp_path / "train-labels-idx1-ubyte").mkdir()  # a folder with the right name is not a file
    found = data.find_mnist_files(tmp_path)
    assert Path(found["train-images-idx3-ubyte"]) == tmp_path / "train-images-idx3-ubyte"
    assert Path(found["t10k-labels-idx1-ubyte"]) == tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    assert found["train-labels-idx1-ubyte"] is None
    assert found["t10k-images-idx3-ubyte"] is None


def test_find_mnist_files_empty_and_absent_folder(tmp_path):
    assert data.find_mnist_files(tmp_path) == {name: None for name in FILE_NAMES}
    assert data.find_mnist_files(tmp_path / "absent") == {name: None for name in FILE_NAMES}


# ----------------------------------------------------------------------------- load_mnist


def test_load_mnist_all_missing(tmp_path):
    with pytest.raises(data.DataError) as excinfo:
        data.load_mnist(tmp_path, download=False)
    msg = assert_data_error(excinfo, tmp_path)
    for name in FILE_NAMES:
        assert name in msg


def test_load_mnist_some_missing_names_only_those(tmp_path):
    write_tiny_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError) as excinfo:
        data.load_mnist(tmp_path, download=False)
    msg = assert_data_error(excinfo, tmp_path)
    assert "t10k-labels-idx1-ubyte" in msg
    assert "train-images-idx3-ubyte" not in msg


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, True)])
def test_load_mnist_tiny_files_fail_md5(tmp_path, gz, dotted):
    write_tiny_mnist(tmp_path, gz=gz, dotted=dotted)
    with pytest.raises(data.DataError) as excinfo:
        data.load_mnist(tmp_path, download=False)
    msg = str(excinfo.value)
    assert "md5" in msg and "\n" not in msg
    assert str(tmp_path) in msg


def test_load_mnist_offline_download_fails_cleanly(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    target = tmp_path / "nowhere"
    with pytest.raises(data.DataError) as excinfo:
        data.load_mnist(target)
    msg = str(excinfo.value)
    assert "--data-dir" in msg
    assert "\n" not in msg
    assert str(target) in msg
    assert not target.exists(), sorted(str(p) for p in tmp_path.rglob("*"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("absent", [["t10k-labels-idx1-ubyte"], ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"]])
@pytest.mark.parametrize("download", [True, False], ids=["download_fails", "no_download"])
def test_load_mnist_names_exactly_the_missing_files(tmp_path, monkeypatch, absent, download):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # offline
    write_tiny_mnist(tmp_path)
    for name in absent:
        (tmp_path / (name + ".gz")).unlink()
    with pytest.raises(data.DataError) as excinfo:
        data.load_mnist(tmp_path, download=download)
    msg = assert_data_error(excinfo, tmp_path)
    for name in FILE_NAMES:
        assert (name in msg) == (name in absent), (name, msg)
    assert ("download failed" in msg) == download and "--data-dir" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n + ".gz" for n in FILE_NAMES if n not in absent)


def test_download_keeps_existing_folder(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(data.DataError):
        data.load_mnist(tmp_path)
    assert tmp_path.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # MNIST/raw removed, the user's folder kept


# ----------------------------------------------------------------------------- split_indices


def test_split_indices_partition():
    n, val = 103, 17
    train, valid = data.split_indices(n, val, seed=0)
    assert len(valid) == val and len(train) == n - val
    tr, va = set(train.tolist()), set(valid.tolist())
    assert len(tr) == len(train) and len(va) == len(valid)  # no duplicates
    assert tr.isdisjoint(va)
    assert tr | va == set(range(n))


def test_split_indices_seeded():
    a = data.split_indices(500, 50, seed=3)
    b = data.split_indices(500, 50, seed=3)
    c = data.split_indices(500, 50, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # the validation set is a random subset, not simply the first or last val_size indices
    assert not torch.equal(a[1], torch.arange(50)) and not torch.equal(a[1], torch.arange(450, 500))


@pytest.mark.parametrize("val_size", [0, -1, 10, 11])
def test_split_indices_bad_val_size(val_size):
    with pytest.raises(data.DataError) as excinfo:
        data.split_indices(10, val_size, seed=0)
    assert "\n" not in str(excinfo.value)


# ----------------------------------------------------------------------------- batches


def indexed_images(n: int) -> torch.Tensor:
    """uint8 images whose pixel [0, 0] holds their index, the rest random."""
    imgs = torch.from_numpy(random_images(n, seed=21).copy())
    imgs[:, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return imgs


def index_of(batch: torch.Tensor) -> list[int]:
    return [int(round(v * 255)) for v in batch[:, 0, 0, 0].tolist()]


def test_batches_in_order_without_generator():
    imgs = indexed_images(10)
    out = list(data.batches(imgs, 4))
    assert [b.shape for b in out] == [(4, 1, 28, 28), (4, 1, 28, 28), (2, 1, 28, 28)]
    for b in out:
        assert b.dtype == torch.float32
        assert float(b.min()) >= 0.0 and float(b.max()) <= 1.0
    expected = imgs.numpy().astype(np.float64) / 255.0
    got = torch.cat(out).squeeze(1).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert index_of(torch.cat(out)) == list(range(10))


def test_batches_extremes_map_to_0_and_1():
    imgs = torch.zeros(2, 28, 28, dtype=torch.uint8)
    imgs[1] = 255
    (b,) = list(data.batches(imgs, 8))
    assert float(b[0].max()) == 0.0 and float(b[1].min()) == 1.0


def test_batches_with_generator_is_permutation():
    n = 37
    imgs = indexed_images(n)
    out = list(data.batches(imgs, 8, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in out] == [8, 8, 8, 8, 5]
    order = index_of(torch.cat(out))
    assert sorted(order) == list(range(n))
    assert order != list(range(n))
    # each shuffled batch holds exactly the images its indices name
    for b in out:
        idx = index_of(b)
        np.testing.assert_allclose(b.squeeze(1).numpy(), imgs[idx].numpy() / 255.0, rtol=0, atol=1e-6)


def test_batches_seeded_shuffle_reproducible_and_varies():
    imgs = indexed_images(30)
    a = index_of(torch.cat(list(data.batches(imgs, 7, torch.Generator().manual_seed(1)))))
    b = index_of(torch.cat(list(data.batches(imgs, 7, torch.Generator().manual_seed(1)))))
    c = index_of(torch.cat(list(data.batches(imgs, 7, torch.Generator().manual_seed(2)))))
    assert a == b and a != c


@pytest.mark.parametrize("start", [0, 1, 2, 4, 5])
def test_batches_start_skips_same_permutation(start):
    imgs = indexed_images(29)
    gen = torch.Generator().manual_seed(7)
    torch.randn(3, generator=gen)  # any state, not just a fresh seed
    state = gen.get_state()
    full = list(data.batches(imgs, 6, gen))
    gen.set_state(state)
    resumed = list(data.batches(imgs, 6, gen, start=start))
    assert len(full) == math.ceil(29 / 6)
    assert len(resumed) == len(full) - start
    for a, b in zip(full[start:], resumed):
        assert torch.equal(a, b)


def test_batches_start_without_generator():
    imgs = indexed_images(10)
    out = list(data.batches(imgs, 3, start=2))
    assert index_of(torch.cat(out)) == list(range(6, 10))


# ----------------------------------------------------------------------------- binarize


def test_binarize_values_and_mean():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.1, 0.5, 0.83, 1.0])
    n = 20000
    x = probs.repeat(n, 1)  # (n, 5)
    out = data.binarize(x, generator=gen)
    assert out.shape == x.shape
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    means = out.double().mean(0)
    for p, m in zip(probs.tolist(), means.tolist()):
        tol = 5 * math.sqrt(p * (1 - p) / n) + 1e-12
        assert abs(m - p) <= tol, (p, m, tol)


def test_binarize_image_batch_reproducible():
    imgs = torch.from_numpy(random_images(64, seed=9).copy())
    x = next(data.batches(imgs, 64))
    a = data.binarize(x, torch.Generator().manual_seed(4))
    b = data.binarize(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert set(torch.unique(a).tolist()) <= {0.0, 1.0}
    # overall fraction of ones matches mean intensity (50176 pixels, std ~ 0.0022)
    assert abs(float(a.mean()) - float(x.mean())) < 0.012


# ----------------------------------------------------------------------------- the real data set


@pytest.mark.skipif(not os.environ.get("MNIST_DIR"), reason="set MNIST_DIR to a folder holding the four MNIST files")
def test_real_mnist():
    d = data.load_mnist(os.environ["MNIST_DIR"], download=False)
    assert tuple(d["train_images"].shape) == (60000, 28, 28)
    assert tuple(d["train_labels"].shape) == (60000,)
    assert tuple(d["test_images"].shape) == (10000, 28, 28)
    assert tuple(d["test_labels"].shape) == (10000,)
    assert d["train_images"].dtype == torch.uint8 and d["test_images"].dtype == torch.uint8
    for key in ("train_labels", "test_labels"):
        labels = d[key]
        assert int(labels.min()) == 0 and int(labels.max()) == 9
        assert set(labels.unique().tolist()) == set(range(10))
    mean = d["train_images"].double().mean().item() / 255
    assert mean == pytest.approx(0.1307, abs=1e-3)
