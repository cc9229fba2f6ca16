"""Grouped attention against a float64 numpy oracle, with and without causal block skipping."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.models.common.layers import attention_mask, grouped_attention


def _np_attention(q, k, v, mask):
    """Per-head softmax attention in float64; ``mask`` ``[B, T, S]``."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    out = np.zeros((b, t, h, hd))
    for i in range(b):
        for j in range(h):
            kj = j // (h // kv)
            sc = q[i, :, j].astype(np.float64) @ k[i, :, kj].astype(np.float64).T / np.sqrt(hd)
            sc = np.where(mask[i], sc, -np.inf)
            with np.errstate(invalid="ignore"):  # rows with no visible key: NaN, not compared
                p = np.exp(sc - sc.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
            out[i, :, j] = p @ v[i, :, kj]
    return out.reshape(b, t, h * hd)


@pytest.mark.parametrize("t", [64, 66])  # 66: not a multiple of the blocks -> one block
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("blocks", [1, 4])
def test_grouped_attention_matches_numpy(t, heads, blocks):
    h, kv = heads
    rng = np.random.default_rng(t + 10 * h + kv)
    q = rng.standard_normal((2, t, h, 16)).astype(np.float32)
    k = rng.standard_normal((2, t, kv, 16)).astype(np.float32)
    v = rng.standard_normal((2, t, kv, 16)).astype(np.float32)
    valid = np.ones((2, t), bool)
    valid[1, :5] = False  # left padding of the second row: keys masked inside every block
    idx = jnp.broadcast_to(jnp.arange(t), (2, t))
    mask = attention_mask(idx, idx, jnp.asarray(valid), causal=True)
    got = grouped_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, kv,
                            causal_blocks=blocks)
    want = _np_attention(q, k, v, np.asarray(mask)[:, 0, 0])
    rows = np.ones(t, bool)
    rows[:5] = False  # padded query rows of row 1 see no key at all: skip them there
    np.testing.assert_allclose(np.asarray(got)[0], want[0], atol=2e-5)
    np.testing.assert_allclose(np.asarray(got)[1][rows], want[1][rows], atol=2e-5)
