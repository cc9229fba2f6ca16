"""Calibration and evaluation data (WikiText-2 by the protocol in docs/protocol.md)."""

from jaxquant.data.images import fashion_mnist, read_idx
from jaxquant.data.wikitext import (
    calib_windows,
    data_dir,
    eval_windows,
    heldout_windows,
    wikitext2_text,
    wikitext2_tokens,
    windows_from_tokens,
)

__all__ = [
    "calib_windows",
    "data_dir",
    "eval_windows",
    "fashion_mnist",
    "heldout_windows",
    "read_idx",
    "wikitext2_text",
    "wikitext2_tokens",
    "windows_from_tokens",
]
