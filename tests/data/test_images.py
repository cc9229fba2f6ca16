"""Fashion-MNIST IDX reader: hand-written IDX gzip files, bad headers, and the real files."""

import gzip
import os
import struct

import numpy as np
import pytest

from jaxquant.data import fashion_mnist, read_idx


def write_idx(path, arr, magic=None, dims=None, extra=b""):
    arr = np.asarray(arr, np.uint8)
    nd = arr.ndim
    head = struct.pack(">HBB", 0, 0x08, nd) if magic is None else struct.pack(">I", magic)
    head += struct.pack(f">{nd}I", *(arr.shape if dims is None else dims))
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes() + extra)


def make_split(d, n, prefix="train", seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labs = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    write_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte.gz"), imgs)
    write_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz"), labs)
    return imgs, labs


def test_roundtrip_hand_written_idx(tmp_path):
    imgs, labs = make_split(tmp_path, 5)
    make_split(tmp_path, 3, prefix="t10k", seed=1)
    x, y = fashion_mnist("train", root=str(tmp_path))
    assert x.dtype == np.uint8 and x.shape == (5, 28, 28)
    assert y.dtype == np.int32 and y.shape == (5,)
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, labs.astype(np.int32))
    assert fashion_mnist("test", root=str(tmp_path))[0].shape == (3, 28, 28)
    # $JAXQUANT_DATA/fashion-mnist is the default directory
    os.makedirs(tmp_path / "env" / "fashion-mnist")
    make_split(tmp_path / "env" / "fashion-mnist", 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXQUANT_DATA", str(tmp_path / "env"))
        assert fashion_mnist()[0].shape == (2, 28, 28)
    # a raw (not gzip) IDX file reads too
    raw = tmp_path / "raw-idx1"
    raw.write_bytes(struct.pack(">HBBI", 0, 8, 1, 3) + bytes([1, 2, 3]))
    np.testing.assert_array_equal(read_idx(str(raw)), [1, 2, 3])


def test_bad_magic_and_sizes_name_the_file(tmp_path):
    p = str(tmp_path / "train-images-idx3-ubyte.gz")
    write_idx(p, np.zeros((2, 28, 28)), magic=0x00000903)  # type 0x09 is int8
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: bad IDX magic"):
        read_idx(p)
    write_idx(p, np.zeros((2, 28, 28)), magic=0x08030000)
    with pytest.raises(ValueError, match="bad IDX magic number 0x08030000"):
        read_idx(p)
    write_idx(p, np.zeros((2, 28, 28)), dims=(3, 28, 28))  # header claims more images
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: IDX header says shape"):
        read_idx(p)
    write_idx(p, np.zeros((2, 28, 28)), extra=b"\x00")
    with pytest.raises(ValueError, match="the file has 1569"):
        read_idx(p)
    write_idx(p, np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="expected 1 "):
        read_idx(p, ndim=1)
    # labels that do not match the images
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros((3,)))
    with pytest.raises(ValueError, match="has 2 images but .*train-labels-idx1-ubyte.gz has 3"):
        fashion_mnist("train", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        fashion_mnist("test", root=str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("valid", root=str(tmp_path))


DATA = os.environ.get("JAXQUANT_DATA")
REAL = os.path.join(DATA, "fashion-mnist") if DATA else None


@pytest.mark.skipif(REAL is None or not os.path.isdir(REAL),
                    reason="set $JAXQUANT_DATA to the data directory with fashion-mnist/")
def test_real_fashion_mnist_counts():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = fashion_mnist(split)
        assert x.shape == (n, 28, 28) and x.dtype == np.uint8
        assert y.shape == (n,)
        np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, n // 10))
