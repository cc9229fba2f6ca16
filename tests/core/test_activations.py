"""Dynamic per-token activation quantization (int4 / int8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import dequantize_per_token, fake_quant_per_token, quantize_per_token


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_per_token_error_and_range(bits):
    x = jax.random.normal(jax.random.key(0), (2, 7, 64), jnp.float32) * jnp.arange(
        1, 8, dtype=jnp.float32
    ).reshape(1, 7, 1)
    q, s = quantize_per_token(x, bits=bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == jnp.int8 and s.shape == (2, 7, 1)
    assert int(jnp.max(jnp.abs(q))) == qmax  # each token's abs-max lands on the top code
    xh = dequantize_per_token(q, s)
    assert bool(jnp.all(jnp.abs(xh - x) <= 0.5 * s * (1 + 1e-6)))
    # numpy oracle
    xn = np.asarray(x)
    sn = np.abs(xn).max(-1, keepdims=True) / qmax
    np.testing.assert_allclose(np.asarray(xh), np.clip(np.round(xn / sn), -qmax, qmax) * sn,
                               rtol=1e-6, atol=1e-6)


def test_zero_token_and_ste():
    x = jnp.zeros((3, 16), jnp.float32).at[1].set(jnp.linspace(-1, 1, 16, dtype=jnp.float32))
    q, s = quantize_per_token(x, bits=4)
    assert bool(jnp.all(jnp.isfinite(s)))
    assert bool(jnp.all(q[0] == 0))
    g = jax.grad(lambda x: jnp.sum(fake_quant_per_token(x, 4) * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(g), np.full((3, 16), 3.0, np.float32))
    out = jax.jit(fake_quant_per_token, static_argnums=(1,))(x, 8)
    assert out.shape == x.shape


def test_bad_activation_bits():
    with pytest.raises(ValueError, match="activation bits"):
        quantize_per_token(jnp.ones((2, 4), jnp.float32), bits=1)
