"""W8A8 / W4A4 integer matmuls: a numpy int64 oracle for the reference, the XLA int8 path and the
Pallas TPU and GPU kernels (interpret), their lowering for "tpu" and "cuda", and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.kernels.int_matmul import (
    int_matmul_pallas_gpu,
    int_matmul_pallas_tpu,
    int_matmul_reference,
    int_matmul_xla,
)


def _numpy_oracle(x, qa, act_bits, act_clip=1.0):
    x = np.asarray(x, np.float64)
    qmax = 2 ** (act_bits - 1) - 1
    amax = np.float32(act_clip) * np.abs(x).max(-1, keepdims=True).astype(np.float32)
    sx = np.where(amax > 0, np.float32(amax) / np.float32(qmax), 1.0).astype(np.float32)
    xq = np.clip(np.round(x.astype(np.float32) / sx), -qmax, qmax).astype(np.int64)
    wq = np.asarray(qa.codes(), np.int64) - 2 ** (qa.spec.bits - 1)
    k = x.shape[-1]
    gs = k if qa.spec.group_size == -1 else qa.spec.group_size
    s = np.asarray(qa.scale, np.float64)
    y = sum((xq[:, g * gs:(g + 1) * gs] @ wq[g * gs:(g + 1) * gs]) * s[g] for g in range(k // gs))
    return y * sx


@pytest.mark.parametrize(("wbits", "abits"), [(8, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("gs", [-1, 64, 128])
def test_int_matmuls_equal_the_integer_oracle(wbits, abits, gs):
    rng = np.random.default_rng(wbits + abits + gs)
    for m, k, n in ((1, 256, 96), (7, 384, 200), (40, 512, 130)):
        w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
        qa = jq.quantize(w, jq.QuantSpec(bits=wbits, group_size=gs, symmetric=True))
        x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
        ref = _numpy_oracle(x, qa, abits)
        scale = np.abs(ref).max()
        for f in (int_matmul_reference, int_matmul_xla):
            np.testing.assert_allclose(np.asarray(f(x, qa, act_bits=abits)), ref,
                                       atol=1e-5 * scale)
        got = int_matmul_pallas_tpu(x, qa, act_bits=abits, interpret=True)
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * scale)
        gpu = int_matmul_pallas_gpu(x, qa, act_bits=abits, interpret=True)
        np.testing.assert_allclose(np.asarray(gpu), ref, atol=1e-5 * scale)
    # and W8A8 is close to the float matmul it approximates
    if wbits == 8 and abits == 8:
        dense = np.asarray(x) @ np.asarray(w)
        assert np.abs(np.asarray(got) - dense).max() < 0.05 * np.abs(dense).max()


@pytest.mark.parametrize("act_clip", [0.9, 0.6])
def test_int_matmuls_honour_the_activation_clip(act_clip):
    """CLQ's searched activation clip ratio on the integer path: every kernel quantizes tokens on
    the clipped range, as the numpy oracle does (and unlike the unclipped product)."""
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal((256, 96)).astype(np.float32))
    qa = jq.quantize(w, jq.QuantSpec(bits=4, group_size=-1, symmetric=True))
    x = rng.standard_normal((33, 256)).astype(np.float32)
    x[:, 5] *= 15.0  # an outlier channel that the clip saturates
    x = jnp.asarray(x)
    ref = _numpy_oracle(x, qa, 4, act_clip)
    tol = 1e-5 * np.abs(ref).max()
    for f in (int_matmul_reference, int_matmul_xla):
        np.testing.assert_allclose(np.asarray(f(x, qa, act_bits=4, act_clip=act_clip)), ref,
                                   atol=tol)
    for f in (int_matmul_pallas_tpu, int_matmul_pallas_gpu):
        np.testing.assert_allclose(np.asarray(f(x, qa, act_bits=4, act_clip=act_clip,
                                                interpret=True)), ref, atol=tol)
    assert np.abs(ref - _numpy_oracle(x, qa, 4)).max() > 100 * tol


def test_int_kernel_lowers_for_tpu_and_refuses_unsupported():
    spec = jq.QuantSpec(bits=4, group_size=128, symmetric=True)
    qa = jax.eval_shape(lambda w: jq.quantize(w, spec, validate=False),
                        jax.ShapeDtypeStruct((4096, 4096), jnp.float32))
    for m in (1, 256):
        x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
        text = jax.jit(lambda x, q: int_matmul_pallas_tpu(x, q, act_bits=4)).trace(
            x, qa).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text
    for gs, bits in ((128, 4), (64, 4), (-1, 8)):  # plane rows 16 (tl.dot), 8 (reduce), 32
        spec = jq.QuantSpec(bits=bits, group_size=gs, symmetric=True)
        qa = jax.eval_shape(lambda w, spec=spec: jq.quantize(w, spec, validate=False),
                            jax.ShapeDtypeStruct((4096, 4096), jnp.float32))
        text = jax.jit(lambda x, q, b=bits: int_matmul_pallas_gpu(x, q, act_bits=b)).trace(
            jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16), qa).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text or "triton" in text.lower()
    w = jnp.ones((128, 8), jnp.float32)
    with pytest.raises(ValueError, match="symmetric"):
        int_matmul_xla(jnp.ones((1, 128)), jq.quantize(w, jq.QuantSpec(bits=4, group_size=32)))
    q32 = jq.quantize(w, jq.QuantSpec(bits=4, group_size=32, symmetric=True))
    with pytest.raises(ValueError, match="multiple of 8"):
        int_matmul_pallas_tpu(jnp.ones((1, 128)), q32, act_bits=4, interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        int_matmul_pallas_gpu(jnp.ones((1, 128)), q32, act_bits=4, bm=8, interpret=True)
    with pytest.raises(ValueError, match="act_bits"):
        int_matmul_xla(jnp.ones((1, 128)), q32, act_bits=6)


@pytest.mark.parametrize("platform", [pytest.param("gpu", marks=pytest.mark.gpu),
                                      pytest.param("tpu", marks=pytest.mark.tpu)])
@pytest.mark.parametrize(("wbits", "abits"), [(8, 8), (4, 4)])
def test_int_kernel_compiled_on_device(platform, wbits, abits):
    kernel = {"gpu": int_matmul_pallas_gpu, "tpu": int_matmul_pallas_tpu}[platform]
    rng = np.random.default_rng(wbits)
    for gs in (-1, 128):
        w = jnp.asarray(rng.standard_normal((4096, 1000)).astype(np.float32))
        qa = jq.quantize(w, jq.QuantSpec(bits=wbits, group_size=gs, symmetric=True))
        for m in (1, 16, 128):
            x = jnp.asarray(rng.standard_normal((m, 4096)).astype(np.float32))
            ref = _numpy_oracle(x, qa, abits)
            got = np.asarray(kernel(x, qa, act_bits=abits))
            np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
