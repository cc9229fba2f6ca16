"""Hadamard matrices of the orders models need, and the orthogonal rotations built from them.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``; ``H / √n`` is orthogonal.
They exist only for ``n = 1, 2`` and multiples of 4. Constructions used here:

* **Sylvester**: ``H_{2m} = [[H_m, H_m], [H_m, −H_m]]`` (every power of two);
* **Paley I**: for a prime ``q ≡ 3 (mod 4)``, order ``q + 1``: ``I + S`` with the skew matrix
  ``S = [[0, 1ᵀ], [−1, Q]]`` and ``Q`` the Jacobsthal matrix ``Q_ij = χ(j − i)`` (χ the quadratic
  character mod ``q``);
* **Paley II**: for a prime ``q ≡ 1 (mod 4)``, order ``2(q + 1)``: with the symmetric conference
  matrix ``C = [[0, 1ᵀ], [1, Q]]``, ``H = C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]]``;
* **Kronecker products** of the above: ``H_a ⊗ H_b`` has order ``ab`` (576 = 4·12·12,
  1536 = 128·12, 896 = 32·28, 18944 = 128·148).

:func:`hadamard` finds a factorisation of ``n`` into these (memoised, integer entries, built in
numpy: these are constants folded into weights offline). :func:`random_hadamard` and
:func:`block_hadamard` are the orthogonal rotations QuaRot-style methods use: ``H D / √n`` with a
random ±1 diagonal ``D``, or a block-diagonal one whose blocks are such rotations of the group size.
"""

from __future__ import annotations

import functools

import numpy as np


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q_ij = χ(j − i)`` for the prime ``q`` (χ(0) = 0, +1 on quadratic residues, −1 else)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)], np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def sylvester(n: int) -> np.ndarray:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    H = np.ones((1, 1), np.int64)
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


def paley1(q: int) -> np.ndarray:
    """Order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, got {q}")
    S = np.zeros((q + 1, q + 1), np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + S


def paley2(q: int) -> np.ndarray:
    """Order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)``."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 mod 4, got {q}")
    C = np.zeros((q + 1, q + 1), np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    return (np.kron(C, np.array([[1, -1], [-1, -1]]))
            + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, 1], [1, -1]])))


@functools.lru_cache(maxsize=64)
def _paley_orders(limit: int) -> dict[int, tuple[str, int]]:
    """Non-power-of-two orders up to ``limit`` that one Paley construction gives directly."""
    out: dict[int, tuple[str, int]] = {}
    for q in range(3, limit + 1):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and q + 1 <= limit and (q + 1) & q:
            out.setdefault(q + 1, ("paley1", q))
        if q % 4 == 1 and 2 * (q + 1) <= limit and (2 * (q + 1)) & (2 * q + 1):
            out.setdefault(2 * (q + 1), ("paley2", q))
    return out


@functools.lru_cache(maxsize=64)
def _recipe(n: int) -> tuple[tuple[str, int], ...] | None:
    """A factorisation of ``n`` into Sylvester and Paley factors, or None."""
    if n >= 1 and not n & (n - 1):
        return (("sylvester", n),)
    for order, how in sorted(_paley_orders(n).items(), reverse=True):
        if n % order == 0:
            rest = _recipe(n // order)
            if rest is not None:
                return (how, *rest)
    return None


@functools.lru_cache(maxsize=32)
def _hadamard_cached(n: int) -> np.ndarray:
    rec = _recipe(n)
    if rec is None:
        raise ValueError(
            f"no Hadamard matrix of order {n} from Sylvester, Paley I/II and Kronecker products "
            "(orders must be 1, 2 or a multiple of 4, e.g. 2^a times q+1 or 2(q+1) for a prime q)")
    H = np.ones((1, 1), np.int64)
    for kind, p in rec:
        H = np.kron(H, {"sylvester": sylvester, "paley1": paley1, "paley2": paley2}[kind](p))
    H.setflags(write=False)
    return H


def hadamard(n: int) -> np.ndarray:
    """An ``n x n`` Hadamard matrix (entries ±1, ``H Hᵀ = n I``), int64, read-only."""
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n!r}")
    return _hadamard_cached(int(n))


def hadamard_orders_supported(n: int) -> bool:
    return n >= 1 and _recipe(int(n)) is not None


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """The orthogonal ``H D / √n`` (``D`` a random ±1 diagonal from ``seed``), float64
    ``[n, n]``."""
    d = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    return hadamard(n) * d[None, :] / np.sqrt(n)


def block_hadamard(n: int, block: int, seed: int = 0) -> np.ndarray:
    """Block-diagonal orthogonal ``[n, n]`` whose ``n / block`` blocks are randomized Hadamard
    rotations of order ``block`` (each with its own signs): a rotation that stays inside every
    quantization group of ``block`` consecutive channels."""
    if block < 1 or n % block:
        raise ValueError(f"block_hadamard: the block {block} must divide the order {n}")
    H = hadamard(block) / np.sqrt(block)
    rng = np.random.default_rng(seed)
    out = np.zeros((n, n))
    for i in range(0, n, block):
        out[i:i + block, i:i + block] = H * rng.choice([-1.0, 1.0], size=block)[None, :]
    return out
