"""Fashion-MNIST from the four original IDX gzip files.

Files (as distributed by Zalando and Debian's ``dataset-fashion-mnist``) in one directory, by
default ``$JAXQUANT_DATA/fashion-mnist``:

* ``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz``: 60,000 examples
* ``t10k-images-idx3-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz``: 10,000 examples

IDX format: a big-endian header, two zero bytes, a type byte (``0x08`` is unsigned byte), the
number of dimensions, then one uint32 size per dimension, then the data in C order. Image files
are 3-d ``[N, 28, 28]`` (magic ``0x00000803``), label files 1-d ``[N]`` (magic ``0x00000801``).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_UBYTE = 0x08


def fashion_mnist_dir(root: str | None = None) -> str:
    """The Fashion-MNIST directory: ``root``, else ``$JAXQUANT_DATA/fashion-mnist``."""
    if root is not None:
        return root
    base = os.environ.get("JAXQUANT_DATA")
    if not base:
        raise FileNotFoundError("Fashion-MNIST: pass root= or set $JAXQUANT_DATA to a directory "
                                "holding fashion-mnist/")
    return os.path.join(base, "fashion-mnist")


def read_idx(path: str, *, ndim: int | None = None) -> np.ndarray:
    """An unsigned-byte IDX file (gzip if the name ends in ``.gz``) as a uint8 array.

    Checks the magic number (two zero bytes, type ``0x08``, ``ndim`` dimensions when given) and
    that the data length is the product of the header's sizes; errors name the file.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as e:  # bad gzip stream
        raise ValueError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, nd = struct.unpack(">HBB", raw[:4])
    magic = int.from_bytes(raw[:4], "big")
    if zero != 0 or dtype_code != _UBYTE or nd == 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x000008NN: "
                         "unsigned bytes, NN dimensions)")
    if ndim is not None and nd != ndim:
        raise ValueError(f"{path}: IDX magic 0x{magic:08x} says {nd} dimensions, expected {ndim} "
                         f"(magic 0x{0x800 + ndim:08x})")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = struct.unpack(f">{nd}I", raw[4:header])
    want = int(np.prod(shape, dtype=np.int64))
    got = len(raw) - header
    if got != want:
        raise ValueError(f"{path}: IDX header says shape {shape} ({want} bytes of data), the file "
                         f"has {got}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def fashion_mnist(split: str = "train", *, root: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int32 [N])`` of the ``"train"`` (60,000) or
    ``"test"`` (10,000) split, from the IDX files in ``root`` (default
    ``$JAXQUANT_DATA/fashion-mnist``)."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    d = fashion_mnist_dir(root)
    img_path, lab_path = (os.path.join(d, f) for f in _FILES[split])
    images = read_idx(img_path, ndim=3)
    labels = read_idx(lab_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, "
                         "expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} has {images.shape[0]} images but {lab_path} has "
                         f"{labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{lab_path}: label {int(labels.max())} is not a class index "
                         f"0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels.astype(np.int32)
