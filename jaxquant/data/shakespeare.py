"""Shakespeare text for the masked-diffusion LM (docs/protocol.md, diffusion LLM protocol).

``$JAXQUANT_DATA/shakespeare`` (or ``root``) holds 42 plays and poems as ASCII ``*_gut.txt``.
``hamlet_gut.txt`` and ``tempest_gut.txt`` are held out for evaluation; the rest is training text.

The tokenizer is byte-level: token id = byte value (0..255), then ``<|eos|>`` = 256 and
``<|mdm_mask|>`` = 257 ([MASK]). :func:`write_byte_tokenizer` saves it as a Hugging Face
``tokenizer.json`` (a byte-level BPE with no merges, so ``AutoTokenizer`` loads it and maps each
byte to its own value); training and evaluation read the bytes directly.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

HELDOUT = ("hamlet_gut.txt", "tempest_gut.txt")
EOS_ID = 256
MASK_ID = 257
VOCAB_SIZE = 258


def shakespeare_dir(root: str | os.PathLike | None = None) -> str:
    """The Shakespeare directory: ``root``, else ``$JAXQUANT_DATA/shakespeare``."""
    if root is None:
        base = os.environ.get("JAXQUANT_DATA")
        if not base:
            raise FileNotFoundError("Shakespeare: pass root= or set $JAXQUANT_DATA to a directory "
                                    "holding shakespeare/*_gut.txt")
        root = os.path.join(base, "shakespeare")
    root = os.fspath(root)
    if not glob.glob(os.path.join(root, "*_gut.txt")):
        raise FileNotFoundError(f"{root}: no *_gut.txt plays (expected the Shakespeare texts)")
    return root


def plays(split: str, root: str | os.PathLike | None = None) -> dict[str, str]:
    """``{file name: text}`` of the ``"train"`` plays (all but :data:`HELDOUT`) or the
    ``"heldout"`` ones, in sorted file order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    root = shakespeare_dir(root)
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "*_gut.txt")))
    missing = [h for h in HELDOUT if h not in names]
    if missing:
        raise FileNotFoundError(f"{root}: held-out plays {missing} are missing")
    keep = [n for n in names if (n in HELDOUT) == (split == "heldout")]
    out = {}
    for n in keep:
        with open(os.path.join(root, n), "rb") as f:
            out[n] = f.read().decode("ascii", errors="replace")
    return out


def encode(text: str) -> np.ndarray:
    """Byte ids ``[N]`` int32 of ``text`` (UTF-8)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids) -> str:
    """Text of byte ids; ``<|eos|>`` ends it, [MASK] shows as ``_``, other ids are dropped."""
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
        if i == EOS_ID:
            break
        if i == MASK_ID:
            out += b"_"
        elif 0 <= i < 256:
            out.append(i)
    return out.decode("utf-8", errors="replace")


def corpus(split: str, root: str | os.PathLike | None = None) -> np.ndarray:
    """The split's plays as one int32 id stream, each play followed by ``<|eos|>``."""
    parts = []
    for text in plays(split, root).values():
        parts += [encode(text), np.array([EOS_ID], np.int32)]
    return np.concatenate(parts)


def heldout_windows(seq_len: int, n: int, root=None, *, seed: int = 0) -> np.ndarray:
    """``[n, seq_len]`` windows of the held-out stream at evenly spaced starts (``seed`` shifts
    the grid), for the held-out NLL and the decoding prompts."""
    ids = corpus("heldout", root)
    span = len(ids) - seq_len
    if n <= 0 or span < n:
        raise ValueError(f"n={n} windows of seq_len={seq_len} do not fit the held-out text "
                         f"({len(ids)} bytes)")
    shift = np.random.default_rng(seed).integers(0, span // n)
    starts = shift + np.arange(n) * (span // n)
    return np.stack([ids[s:s + seq_len] for s in starts])


def _byte_stand_ins() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE uses for it: printable Latin-1 bytes stand
    for themselves, the other 68 map to ``chr(256 + k)`` in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, k = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + k)
            k += 1
    return out


def write_byte_tokenizer(path: str | os.PathLike) -> None:
    """Save the byte tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` in ``path``
    (``transformers.AutoTokenizer.from_pretrained(path)`` loads it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    b2u = _byte_stand_ins()
    if sorted(b2u.values()) != sorted(alphabet):
        raise RuntimeError("byte-level alphabet mismatch between tokenizers and transformers")
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<|eos|>", special=True),
                            AddedToken("<|mdm_mask|>", special=True)])
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>",
                   "pad_token": "<|eos|>", "mask_token": "<|mdm_mask|>",
                   "model_max_length": 1 << 20, "add_bos_token": False}, f, indent=1)


__all__ = ["EOS_ID", "HELDOUT", "MASK_ID", "VOCAB_SIZE", "corpus", "decode", "encode",
           "heldout_windows", "plays", "shakespeare_dir", "write_byte_tokenizer"]
