"""A second kind of block for the engine tests: a non-gated MLP block with an adaLN-style
modulation input (as in a DiT block), declared as a spec and an adapter only, with no driver.

    mod = ada(cond)                    [n, 2D]   (cond: a per-sample batch field [n, C])
    h   = LN(x) * (1 + scale) + shift  [n, T, D]
    a   = gelu(fc1(h))                 [n, T, F]
    x'  = x + fc2(a)

Stages: ``mod`` [ada] reads cond; ``fc1`` [fc1] reads h; ``fc2`` [fc2] reads a (no producer to
fold into: a GELU sits between fc1 and fc2)."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models.blockspec import BlockSpec, Stage
from jaxquant.nn.linear import linear

LINEARS = ("ada", "fc1", "fc2")


def _ln(x, eps=1e-6):
    m = jnp.mean(x, -1, keepdims=True)
    v = jnp.mean((x - m) ** 2, -1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(v + eps)


def _lin(p, name, x):
    return linear(x, p[name]["kernel"], p[name].get("bias"))


def _mod_in(p, s, batch):
    return {"x": s["x"], "c": batch["cond"]}


def _fc1_in(p, s, batch):
    shift, scale = jnp.split(_lin(p, "ada", s["c"]), 2, axis=-1)
    h = _ln(s["x"]) * (1.0 + scale[:, None, :]) + shift[:, None, :]
    return {"x": s["x"], "h": h}


def _fc2_in(p, s, batch):
    return {"x": s["x"], "a": jax.nn.gelu(_lin(p, "fc1", s["h"]), approximate=False)}


def _finish(p, s, batch):
    return {"x": s["x"] + _lin(p, "fc2", s["a"])}


SPEC = BlockSpec(
    stages=(Stage("mod", ("ada",), "c", _mod_in), Stage("fc1", ("fc1",), "h", _fc1_in),
            Stage("fc2", ("fc2",), "a", _fc2_in)),
    finish=_finish, linears=LINEARS, batch_fields=("cond",))


def init_params(seed: int, n_blocks=2, D=32, F=64, C=16) -> list[dict]:
    rng = np.random.default_rng(seed)

    def lin(k, n, scale=1.0):
        return {"kernel": (rng.standard_normal((k, n)) * scale / np.sqrt(k)).astype(np.float32),
                "bias": (0.1 * rng.standard_normal(n)).astype(np.float32)}

    return [{"ada": lin(C, 2 * D, 0.5), "fc1": lin(D, F), "fc2": lin(F, D)}
            for _ in range(n_blocks)]


class ToyAdapter:
    """The toy family's model adapter: params in memory, batches ``{"x", "cond"}``."""

    spec = SPEC

    def __init__(self, blocks: list[dict]):
        self.blocks = blocks
        self.num_blocks = len(blocks)
        self.config = None

    def check(self):
        pass

    def read_block(self, b):
        return jax.tree.map(jnp.asarray, self.blocks[b])

    def make_batch(self, calib, *, n_samples, seqlen):
        return {k: np.asarray(v)[:n_samples] for k, v in calib.items()}

    def first_input(self, batch):
        return jnp.asarray(batch["x"])

    def assemble(self, blocks):
        return list(blocks)

    def fingerprint(self):
        h = hashlib.sha256()
        for a in jax.tree.leaves(self.blocks):
            h.update(np.asarray(a).tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- numpy oracle (float64)
def np_ln(x, eps=1e-6):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps)


def np_gelu(x):
    from math import erf, sqrt

    return 0.5 * x * (1.0 + np.vectorize(lambda t: erf(t / sqrt(2.0)))(x))


def np_block_inputs(W: dict, x, cond):
    """Each linear's input and the block output, in float64, with the weights ``W``
    (``{name: (kernel, bias)}``)."""
    x = np.asarray(x, np.float64)
    c = np.asarray(cond, np.float64)
    mod = c @ W["ada"][0] + W["ada"][1]
    D = x.shape[-1]
    shift, scale = mod[:, :D], mod[:, D:]
    h = np_ln(x) * (1 + scale[:, None]) + shift[:, None]
    a = np_gelu(h @ W["fc1"][0] + W["fc1"][1])
    out = x + a @ W["fc2"][0] + W["fc2"][1]
    return {"ada": c, "fc1": h, "fc2": a}, out
