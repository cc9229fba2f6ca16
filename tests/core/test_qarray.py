"""The uniform affine quantizer and the QArray pytree: error bounds, transforms, storage, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant.core import compute_scale_zero


def _numpy_minmax_qdq(w: np.ndarray, bits: int, gs: int, sym: bool) -> np.ndarray:
    """Independent float64 reference of the documented min-max quantizer (one [K, N] matrix)."""
    k, n = w.shape
    gs = k if gs == -1 else gs
    out = np.empty_like(w, dtype=np.float64)
    maxq = 2**bits - 1
    for g in range(k // gs):
        blk = w[g * gs : (g + 1) * gs].astype(np.float64)
        lo = np.minimum(blk.min(0), 0)
        hi = np.maximum(blk.max(0), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        empty = hi == lo
        lo, hi = np.where(empty, -1, lo), np.where(empty, 1, hi)
        if sym:
            s = 2 * hi / maxq
            z = np.full_like(s, 2 ** (bits - 1))
        else:
            s = (hi - lo) / maxq
            z = np.clip(np.round(-lo / s), 0, maxq)
        q = np.clip(np.round(blk / s) + z, 0, maxq)
        out[g * gs : (g + 1) * gs] = s * (q - z)
    return out


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    groups=st.integers(1, 4),
    gs=st.sampled_from([8, 32, 64]),
    n=st.integers(1, 6),
    sym=st.booleans(),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_at_most_half_step(bits, groups, gs, n, sym, per_channel, seed):
    k = groups * gs
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    spec = jq.QuantSpec(bits=bits, group_size=-1 if per_channel else gs, symmetric=sym)
    qa = jq.quantize(jnp.asarray(w), spec)
    w_hat = np.asarray(jq.dequantize(qa))
    step = np.repeat(np.asarray(qa.scale, np.float32), spec.group_len(k), axis=0)
    assert np.all(np.abs(w_hat - w) <= 0.5 * step * (1 + 1e-5) + 1e-7)
    # and it is the documented quantizer, not just any quantizer within bounds
    ref = _numpy_minmax_qdq(w, bits, spec.group_size, sym)
    same = np.abs(w_hat - ref) <= 1e-5 * step + 1e-6
    # float32 vs float64 may break an exact rounding tie differently: both then sit half a step off
    tie = (np.abs(np.abs(w - w_hat) - 0.5 * step) <= 1e-4 * step) & (
        np.abs(np.abs(w - ref) - 0.5 * step) <= 1e-4 * step
    )
    assert np.all(same | tie)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("value", [0.0, 3.5, -2.0, 1e-30])
def test_constant_and_zero_groups_are_finite(sym, value):
    w = jnp.full((64, 4), value, jnp.float32)
    spec = jq.QuantSpec(bits=3, group_size=32, symmetric=sym)
    qa = jq.quantize(w, spec)
    assert np.all(np.isfinite(np.asarray(qa.scale))) and np.all(np.asarray(qa.scale) > 0)
    w_hat = np.asarray(jq.dequantize(qa))
    assert np.all(np.isfinite(w_hat))
    np.testing.assert_allclose(w_hat, np.asarray(w), rtol=0.5 / 3.5, atol=1e-30)
    if value == 0.0:
        assert np.all(w_hat == 0.0)


def test_mse_scale_search_without_a_range_is_refused():
    with pytest.raises(ValueError, match="clip_ratio < 1"):
        jq.QuantSpec(bits=3, group_size=64, scale_method="mse")


def test_mse_scale_search_never_worse_than_minmax():
    rng = np.random.default_rng(0)
    w = rng.standard_t(df=3, size=(256, 32)).astype(np.float32)  # heavy tails: clipping helps
    base = jq.QuantSpec(bits=3, group_size=64)
    mse = base.replace(scale_method="mse", clip_ratio=0.5, mse_grid=50, mse_norm=2.0)

    def group_err(spec):
        e = (np.asarray(jq.dequantize(jq.quantize(jnp.asarray(w), spec))) - w) ** 2
        return e.reshape(4, 64, 32).sum(1)

    e_mm, e_mse = group_err(base), group_err(mse)
    assert np.all(e_mse <= e_mm * (1 + 1e-6))
    assert e_mse.sum() < 0.95 * e_mm.sum()


def test_scale_dtype_and_per_tensor():
    w = jax.random.normal(jax.random.key(0), (64, 16), jnp.float32)
    qa = jq.quantize(w, jq.QuantSpec(bits=8, group_size=32, scale_dtype="bfloat16"))
    assert qa.scale.dtype == jnp.bfloat16 and qa.scale.shape == (2, 16)
    np.testing.assert_allclose(np.asarray(jq.dequantize(qa)), np.asarray(w), atol=0.05)
    pt = jq.quantize(w, jq.QuantSpec(bits=8, per_tensor=True, symmetric=True))
    assert pt.scale.shape == (1, 1) and pt.zero is None
    step = float(pt.scale[0, 0])
    assert np.max(np.abs(np.asarray(jq.dequantize(pt)) - np.asarray(w))) <= 0.5 * step * 1.0001


def test_jit_vmap_and_stacked_batch_axes():
    spec = jq.QuantSpec(bits=4, group_size=32)
    w = jax.random.normal(jax.random.key(1), (3, 64, 8), jnp.float32)
    eager = jq.quantize(w, spec)
    jitted = jax.jit(jq.quantize, static_argnames="spec")(w, spec=spec)
    vmapped = jax.vmap(lambda x: jq.quantize(x, spec, validate=False))(w)
    for other in (jitted, vmapped):
        np.testing.assert_array_equal(np.asarray(other.packed), np.asarray(eager.packed))
        np.testing.assert_array_equal(np.asarray(other.scale), np.asarray(eager.scale))
    assert eager.shape == (3, 64, 8)
    deq_v = jax.vmap(jq.dequantize)(eager)
    np.testing.assert_array_equal(np.asarray(deq_v), np.asarray(jq.dequantize(eager)))
    # scan over the stacked axis, as the stacked decoder does
    _, per_layer = jax.lax.scan(lambda c, qa: (c, jq.dequantize(qa)), 0, eager)
    np.testing.assert_array_equal(np.asarray(per_layer), np.asarray(deq_v))
    # tree_map sees exactly the array leaves
    leaves = jax.tree.leaves(eager)
    assert len(leaves) == 3
    doubled = jax.tree.map(lambda x: x, eager)
    assert doubled.spec == spec and doubled.in_features == 64


def test_grad_through_fake_quant_is_straight_through():
    spec = jq.QuantSpec(bits=2, group_size=32)
    w = jax.random.normal(jax.random.key(2), (64, 4), jnp.float32)
    x = jax.random.normal(jax.random.key(3), (5, 64), jnp.float32)

    def loss(w):
        return jnp.sum((x @ jq.fake_quant(w, spec)) ** 2)

    g = jax.jit(jax.grad(loss))(w)
    y = x @ jq.fake_quant(w, spec)
    expected = x.T @ (2 * y)  # d/dW of sum((x Ŵ)^2) with dŴ/dW = I
    np.testing.assert_allclose(np.asarray(g), np.asarray(expected), rtol=1e-5, atol=1e-4)
    # the forward really is quantized
    np.testing.assert_allclose(
        np.asarray(jq.fake_quant(w, spec)), np.asarray(jq.dequantize(jq.quantize(w, spec))),
        rtol=0, atol=0,
    )
    gv = jax.vmap(jax.grad(lambda w: jnp.sum(jq.fake_quant(w, spec))))(jnp.stack([w, w]))
    np.testing.assert_array_equal(np.asarray(gv), np.ones((2, 64, 4), np.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_storage_is_bits_over_8_bytes_per_weight(bits):
    k, n, gs = 1024, 96, 64
    spec = jq.QuantSpec(bits=bits, group_size=gs, scale_dtype="float16")
    qa = jq.quantize(jax.random.normal(jax.random.key(0), (k, n), jnp.float32), spec)
    assert qa.packed.nbytes == k * n * bits // 8
    scales = (k // gs) * n * 2 + (k // gs) * n * 1  # fp16 scales + uint8 zero points
    assert qa.nbytes == k * n * bits // 8 + scales


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"clip_ratio": 0.0}, "clip_ratio"),
        ({"scale_dtype": "int8"}, "scale_dtype"),
        ({"scale_method": "percentile"}, "scale_method"),
    ],
)
def test_bad_spec_names_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jq.QuantSpec(**kwargs)


def test_bad_inputs_raise_clear_errors():
    spec = jq.QuantSpec(bits=4, group_size=128)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide the input dimension 576"):
        jq.quantize(jnp.zeros((576, 8), jnp.float32), spec)
    with pytest.raises(ValueError, match="rank >= 2"):
        jq.quantize(jnp.zeros((128,), jnp.float32), spec)
    w = np.ones((128, 4), np.float32)
    w[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        jq.quantize(jnp.asarray(w), spec)
    w[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        jq.quantize(jnp.asarray(w), spec)
    with pytest.raises(ValueError, match="QuantSpec"):
        jq.quantize(jnp.ones((128, 4), jnp.float32), {"bits": 4})


def test_compute_scale_zero_shapes():
    spec = jq.QuantSpec(bits=4, group_size=16)
    s, z = compute_scale_zero(jnp.ones((2, 64, 8), jnp.float32), spec)
    assert s.shape == (2, 4, 8) and z.shape == (2, 4, 8)
