"""The protocol's token files (docs/protocol.md), for the benchmark scripts in this folder."""

from __future__ import annotations

import os

import numpy as np

CALIB = "smollm2_wikitext2_valid_calib_32x512.npy"
TEST = "smollm2_wikitext2_test_eval_64x512.npy"


def load(name: str) -> np.ndarray:
    """``name`` from ``$JAXQUANT_DATA`` (exits with the reason when it is not set)."""
    from jaxquant import data as jdata

    d = jdata.data_dir()
    if d is None:
        raise SystemExit("set $JAXQUANT_DATA to the protocol data directory")
    return np.load(os.path.join(d, name), allow_pickle=False)
