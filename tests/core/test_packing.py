"""Packing round trips and layout, against an independent numpy bit-stream reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxquant.core import packing


def _numpy_reference_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack one column [K] (K % 32 == 0) by writing every bit of every code into a bit stream."""
    k = q.shape[0]
    stream = np.zeros(k * bits, dtype=np.uint8)
    for i, v in enumerate(q):
        for b in range(bits):
            stream[i * bits + b] = (int(v) >> b) & 1
    words = stream.reshape(-1, 32)
    return (words.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(1).astype(np.uint32)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    k=st.integers(1, 130),
    n=st.integers(1, 5),
    batch=st.sampled_from([(), (2,), (2, 3)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, k, n, batch, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << bits, size=(*batch, k, n)).astype(np.uint8)
    packed = packing.pack(jnp.asarray(q), bits)
    assert packed.dtype == jnp.uint32
    assert packed.shape == (*batch, packing.packed_rows(k, bits), n)
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, k)), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_layout_matches_bitstream_reference(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(64, 3)).astype(np.uint8)
    packed = np.asarray(packing.pack(jnp.asarray(q), bits))
    for col in range(3):
        np.testing.assert_array_equal(packed[:, col], _numpy_reference_pack(q[:, col], bits))


def test_gptq_4bit_word_layout():
    # GPTQ: qweight[j] = sum_k q[8j + k] << 4k (low bits first, along the input dimension)
    q = np.arange(16, dtype=np.uint8).reshape(16, 1) % 16
    packed = np.asarray(packing.pack(jnp.asarray(q), 4))
    expected0 = sum(int(q[k, 0]) << (4 * k) for k in range(8))
    assert packed[0, 0] == np.uint32(expected0)


def test_3bit_straddles_words():
    q = np.zeros((32, 1), np.uint8)
    q[10, 0] = 0b111  # bits 30..32 of the stream: straddles word 0 and word 1
    packed = np.asarray(packing.pack(jnp.asarray(q), 3))
    assert packed.shape == (3, 1)
    assert packed[0, 0] == np.uint32(0b11 << 30)
    assert packed[1, 0] == np.uint32(1)
    assert packed[2, 0] == 0


def test_unpack_rejects_wrong_rows():
    with pytest.raises(ValueError, match="rows"):
        packing.unpack(jnp.zeros((5, 2), jnp.uint32), 4, 64)
