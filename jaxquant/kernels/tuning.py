"""Tuned block sizes as data (``block_sizes.json``): per kernel, a list of entries matched in
order; an entry's keys other than the block sizes are conditions (``bits``, ``m_max``,
``k_min``...). The first entry whose conditions hold wins; no match -> ``{}`` (the kernel's
shape-derived defaults). Re-tune with ``benchmarks/kernels.py --tune`` on the target chip."""

from __future__ import annotations

import functools
import json
import os

_FILE = os.path.join(os.path.dirname(__file__), "block_sizes.json")
_SIZES = ("bm", "bn", "bk", "num_warps", "num_stages")


@functools.cache
def table() -> dict:
    with open(_FILE) as f:
        return json.load(f)


def _holds(entry: dict, *, bits: int, m: int, k: int, n: int) -> bool:
    checks = {"bits": lambda v: bits == v, "m_max": lambda v: m <= v, "m_min": lambda v: m >= v,
              "k_min": lambda v: k >= v, "n_min": lambda v: n >= v}
    return all(checks[c](v) for c, v in entry.items() if c not in _SIZES and c != "note")


def lookup(kernel: str, *, bits: int, m: int, k: int, n: int) -> dict:
    for e in table().get(kernel, []):
        if _holds(e, bits=bits, m=m, k=k, n=n):
            return {s: e[s] for s in _SIZES if s in e}
    return {}
