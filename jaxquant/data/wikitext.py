"""WikiText-2 windows, exactly as the evaluation protocol defines them.

* Text: each line of the file is a row, the line with its ``\\n`` if it is not blank and ``""`` for
  a blank line; the text is ``"\\n\\n".join(rows)`` (the HF ``datasets`` convention). Test text is
  ``wikitext-2-raw/wiki.test.raw``; calibration text is ``wikitext-2/valid.txt``.
* Tokens: the model's tokenizer, no special tokens.
* Eval windows: non-overlapping ``seqlen`` windows from the start.
* Calibration windows: ``starts = default_rng(seed).integers(0, N - seqlen, size=n)``.

The data directory comes from ``$JAXQUANT_DATA`` (or the ``data_root`` argument); without local
files the text is taken from the ``datasets`` library (``wikitext``/``wikitext-2-raw-v1``).
"""

from __future__ import annotations

import os

import numpy as np

_FILES = {"test": "wikitext-2-raw/wiki.test.raw", "valid": "wikitext-2/valid.txt"}


def data_dir(data_root: str | None = None) -> str | None:
    """The protocol data directory: ``data_root``, else ``$JAXQUANT_DATA``, else None."""
    d = data_root or os.environ.get("JAXQUANT_DATA")
    return d if d and os.path.isdir(d) else None


def _rows_from_lines(lines) -> list[str]:
    return [line if line.strip() else "" for line in lines]


def wikitext2_text(split: str = "test", *, data_root: str | None = None) -> str:
    """The split's text, joined by the HF convention."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    d = data_dir(data_root)
    if d is not None and os.path.isfile(os.path.join(d, _FILES[split])):
        with open(os.path.join(d, _FILES[split]), encoding="utf-8", newline="\n") as f:
            rows = _rows_from_lines(f.read().splitlines(keepends=True))
        return "\n\n".join(rows)
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"WikiText-2 {split} not found: set $JAXQUANT_DATA to a directory holding "
            f"{_FILES[split]}, or install `datasets` to download it"
        ) from None
    name = {"test": "test", "valid": "validation"}[split]
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=name)
    return "\n\n".join(ds["text"])


def wikitext2_tokens(tokenizer, split: str = "test", *, data_root: str | None = None) -> np.ndarray:
    """All token ids of the split, int32 ``[N]`` (no special tokens)."""
    text = wikitext2_text(split, data_root=data_root)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def windows_from_tokens(tokens: np.ndarray, n_windows: int | None, seqlen: int) -> np.ndarray:
    """Non-overlapping windows ``[n, seqlen]`` from the start (``None`` = all whole windows)."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    total = len(tokens) // seqlen
    n = total if n_windows is None else n_windows
    if n > total:
        raise ValueError(
            f"asked for {n} windows of {seqlen} tokens, but the text has only {total} "
            f"({len(tokens)} tokens)"
        )
    return np.asarray(tokens[: n * seqlen], np.int32).reshape(n, seqlen)


def eval_windows(tokenizer, n_windows: int | None = 64, seqlen: int = 512, *,
                 data_root: str | None = None) -> np.ndarray:
    """The protocol's eval windows ``[n, seqlen]`` of WikiText-2 test."""
    return windows_from_tokens(wikitext2_tokens(tokenizer, "test", data_root=data_root),
                               n_windows, seqlen)


def calib_windows(tokenizer, n: int = 32, seqlen: int = 512, *, seed: int = 0,
                  data_root: str | None = None) -> np.ndarray:
    """The protocol's calibration windows ``[n, seqlen]`` from WikiText-2 validation."""
    tokens = wikitext2_tokens(tokenizer, "valid", data_root=data_root)
    if len(tokens) <= seqlen:
        raise ValueError(f"calibration text has {len(tokens)} tokens, need more than {seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seqlen, size=n)
    return np.stack([tokens[s : s + seqlen] for s in starts]).astype(np.int32)


def heldout_windows(tokenizer, n: int = 16, seqlen: int = 512, *, calib_n: int = 32,
                    calib_seed: int = 0, data_root: str | None = None) -> np.ndarray:
    """Validation windows for choosing a method's settings without touching the test split:
    non-overlapping ``seqlen`` windows of WikiText-2 validation that share no token position with
    the protocol's calibration windows (``calib_n`` windows from ``calib_seed``), first ``n``."""
    tokens = wikitext2_tokens(tokenizer, "valid", data_root=data_root)
    starts = np.random.default_rng(calib_seed).integers(0, len(tokens) - seqlen, size=calib_n)
    used = np.zeros(len(tokens), bool)
    for s in starts:
        used[s : s + seqlen] = True
    out = [tokens[i : i + seqlen] for i in range(0, len(tokens) - seqlen + 1, seqlen)
           if not used[i : i + seqlen].any()]
    if len(out) < n:
        raise ValueError(f"only {len(out)} held-out validation windows of {seqlen} tokens, "
                         f"asked for {n}")
    return np.stack(out[:n]).astype(np.int32)
