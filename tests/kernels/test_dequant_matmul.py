"""Packed dequant-matmul kernels against an independent float64 numpy oracle: every Pallas
kernel (interpret mode), the XLA path and the jnp reference equal ``x @ W`` where ``W`` is built in
numpy from the integer codes, scales and zeros the test itself drew, for every width, group size,
M in {1, 7, 16, 128}, and K / N that are not multiples of the blocks; the packed words decode, by
the documented bit-stream rule, to those codes; each kernel lowers for its real target ("tpu"
Mosaic, "cuda" Triton) from this CPU; the dispatcher falls back to XLA with a reason; jax-triton
skips without a GPU jaxlib."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.core.qarray import from_codes
from jaxquant.kernels import (
    dequant_matmul_pallas_gpu,
    dequant_matmul_pallas_tpu,
    dequant_matmul_reference,
    dequant_matmul_xla,
)
from jaxquant.kernels.dispatch import can_use_pallas_gpu, can_use_pallas_tpu, kernel_mode

KERNELS = {"tpu": dequant_matmul_pallas_tpu, "gpu": dequant_matmul_pallas_gpu}


def _np_unpack(packed, bits, k):
    """Codes ``[K, N]`` from packed words ``[K/32 · bits, N]`` by the documented rule: each run of
    32 input channels is ``bits`` consecutive words forming one little-endian bit stream (word
    ``w`` = stream bits ``[32w, 32w + 32)``, low bit first), code ``c`` at stream bits
    ``[c · bits, (c + 1) · bits)``. Decoded through bytes and ``np.unpackbits``."""
    packed = np.asarray(packed)
    assert packed.dtype == np.uint32
    rows, n = packed.shape
    chunks = rows // bits
    words = np.ascontiguousarray(packed.reshape(chunks, bits, n).transpose(0, 2, 1), "<u4")
    stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")  # [C, N, 32·bits]
    codes = stream.reshape(chunks, n, 32, bits).astype(np.int64) @ (1 << np.arange(bits))
    return codes.transpose(0, 2, 1).reshape(chunks * 32, n)[:k]


def _case(bits, gs, m, k, n, dtype=jnp.float32, seed=0, symmetric=False):
    """Random integer codes, scales and zeros drawn here, assembled into a QArray; returns
    ``(x, qa, W)`` with ``W = S (Q − Z)`` the dense float64 weight built in numpy."""
    rng = np.random.default_rng(seed)
    spec = jq.QuantSpec(bits=bits, group_size=gs, symmetric=symmetric)
    g = spec.num_groups(k)
    q = rng.integers(0, 2**bits, size=(k, n))
    S = np.exp(rng.uniform(-4.0, -1.0, size=(g, n))).astype(np.float32)
    Z = (np.full((g, n), 2 ** (bits - 1)) if symmetric
         else rng.integers(0, 2**bits, size=(g, n)))
    qa = from_codes(jnp.asarray(q, jnp.int32), jnp.asarray(S), jnp.asarray(Z, jnp.float32), spec)
    # the stored words decode, by the documented layout, to exactly the codes drawn
    np.testing.assert_array_equal(_np_unpack(qa.packed, bits, k), q)
    rep = k // g
    W = np.repeat(S.astype(np.float64), rep, axis=0) * (q - np.repeat(Z, rep, axis=0))
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(dtype)
    return x, qa, W


def _case_binary(bits, gs, m, k, n, dtype=jnp.float32, seed=0):
    """A binary-coded (D²Quant DSQ) QArray from random sign codes and plane scales drawn here;
    ``W[k, n] = Σ_p r_p[g(k), n] · (2·bit_p(code) − 1)`` built in float64 numpy."""
    rng = np.random.default_rng(seed)
    spec = jq.QuantSpec(bits=bits, group_size=gs, codebook="binary")
    g = spec.num_groups(k)
    q = rng.integers(0, 2**bits, size=(k, n))
    r = np.exp(rng.uniform(-4.0, -1.0, size=(g, n, bits))).astype(np.float32)
    qa = from_codes(jnp.asarray(q, jnp.int32), jnp.asarray(r), None, spec)
    np.testing.assert_array_equal(_np_unpack(qa.packed, bits, k), q)  # signs stored as code bits
    signs = 2.0 * ((q[..., None] >> np.arange(bits)) & 1) - 1.0  # [K, N, bits]
    W = np.sum(signs * np.repeat(r.astype(np.float64), k // g, axis=0), axis=-1)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(dtype)
    return x, qa, W


def _oracle(x, W):
    """``x @ W`` in float64 (``x`` as given, i.e. already rounded to its dtype)."""
    return np.asarray(x.astype(jnp.float32), np.float64) @ W


def _rel_err(got, ref):
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    return np.max(np.abs(got - ref)) / np.max(np.abs(ref))


def _tol(dtype):
    # float32: accumulation order only; bfloat16: the dequantized tile is rounded to bf16 and
    # so is the output (8 mantissa bits)
    return 2e-5 if dtype == jnp.float32 else 2e-2


# every (bits, group size) pair once per platform; M in {1, 7, 16, 128} rotates so that each group
# size meets every M and each width three of them (one interpret-mode run per case keeps the file
# fast); M = 7 uses a symmetric spec
_WIDTH_GROUP = [(b, gs) for b in (2, 3, 4, 8) for gs in (32, 64, 128)]
_WIDTH_GROUP_M = [(b, gs, (1, 7, 16, 128)[i % 4]) for i, (b, gs) in enumerate(_WIDTH_GROUP)]


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize(("bits", "gs", "m"), _WIDTH_GROUP_M)
def test_kernel_equals_numpy_oracle(platform, bits, gs, m):
    # K = 384 and N = 200 are multiples of no block (the kernels pad and slice)
    x, qa, W = _case(bits, gs, m, 384, 200, seed=m, symmetric=(m == 7))
    got = KERNELS[platform](x, qa, interpret=True)
    assert got.shape == (m, 200) and got.dtype == jnp.float32
    err = _rel_err(got, _oracle(x, W))
    assert err < _tol(jnp.float32), err


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("bits", [3, 4])
def test_bf16_activations_and_per_channel_and_batch_dims(platform, bits):
    x, qa, W = _case(bits, -1, 7, 320, 136, dtype=jnp.bfloat16)
    got = KERNELS[platform](x, qa, interpret=True)
    assert got.dtype == jnp.bfloat16
    err = _rel_err(got, _oracle(x, W))
    assert err < _tol(jnp.bfloat16), err
    x3 = x.reshape(1, 7, 320)
    np.testing.assert_array_equal(np.asarray(KERNELS[platform](x3, qa, interpret=True)[0]),
                                  np.asarray(got))


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize(("bits", "gs", "m"), [(2, 32, 1), (2, 64, 16), (2, 128, 7),
                                               (3, 32, 128), (3, 64, 1), (3, 128, 16)])
def test_binary_coded_kernel_equals_numpy_oracle(platform, bits, gs, m):
    """The DSQ format (sign planes as code bits + per-(group, channel) plane scales) through the
    kernels, the XLA path and the reference equals the numpy bit-plane sum."""
    x, qa, W = _case_binary(bits, gs, m, 384, 200, seed=m + bits)
    ref = _oracle(x, W)
    assert _rel_err(KERNELS[platform](x, qa, interpret=True), ref) < _tol(jnp.float32)
    assert _rel_err(dequant_matmul_xla(x, qa), ref) < 1e-5
    assert _rel_err(dequant_matmul_reference(x, qa), ref) < 1e-5
    xb = x.astype(jnp.bfloat16)
    got = KERNELS[platform](xb, qa, interpret=True)
    assert got.dtype == jnp.bfloat16 and _rel_err(got, _oracle(xb, W)) < _tol(jnp.bfloat16)


def test_binary_coded_multi_block_k_and_refusals():
    """Several TPU K steps accumulate the binary planes; the kernels that implement only the
    uniform grid refuse the format with the reason (the dispatcher then logs it and uses XLA)."""
    from jaxquant.kernels.dispatch import can_use_jax_triton
    from jaxquant.kernels.int_matmul import check_int_qarray

    x, qa, W = _case_binary(3, 64, 16, 2048, 256)
    got = dequant_matmul_pallas_tpu(x, qa, bm=8, bn=128, bk=1024, interpret=True)
    assert _rel_err(got, _oracle(x, W)) < 2e-5
    assert can_use_pallas_tpu(x, qa, "tpu") == (True, "ok")
    ok, why = can_use_jax_triton(x, qa, "cuda")
    assert not ok and "uniform codebook" in why and "binary" in why
    with pytest.raises(ValueError, match="binary"):
        check_int_qarray(qa, 8)
    with pytest.raises(ValueError, match="dsq"):  # no silent uniform fit of a binary spec
        jq.quantize(jnp.ones((64, 8)), jq.QuantSpec(bits=2, group_size=32, codebook="binary"))


@pytest.mark.parametrize(("bits", "gs", "symmetric"),
                         [(3, 64, False), (4, -1, True), (8, 32, False), (5, 96, False)])
def test_xla_path_and_jnp_reference_equal_numpy_oracle(bits, gs, symmetric):
    x, qa, W = _case(bits, gs, 16, 384, 200, symmetric=symmetric)
    ref = _oracle(x, W)
    assert _rel_err(dequant_matmul_xla(x, qa), ref) < 1e-5
    assert _rel_err(dequant_matmul_reference(x, qa), ref) < 1e-5
    xb = x.astype(jnp.bfloat16)  # bf16 activations: the weight is dequantized to bf16
    got = dequant_matmul_xla(xb, qa)
    assert got.dtype == jnp.bfloat16
    assert _rel_err(got, _oracle(xb, W)) < _tol(jnp.bfloat16)


def test_multi_block_k_and_explicit_blocks():
    """Several K steps (the accumulator across grid steps) with explicit static block sizes."""
    x, qa, W = _case(4, 32, 16, 2048, 256)
    got = dequant_matmul_pallas_tpu(x, qa, bm=8, bn=128, bk=1024, interpret=True)
    assert _rel_err(got, _oracle(x, W)) < 2e-5
    x, qa, W = _case(2, -1, 3, 4096, 128)
    got = dequant_matmul_pallas_tpu(x, qa, bm=8, bn=128, bk=2048, interpret=True)
    assert _rel_err(got, _oracle(x, W)) < 2e-5


def test_unsupported_inputs_are_refused_with_the_reason():
    w = jnp.ones((96, 8), jnp.float32)
    qa = jq.quantize(w, jq.QuantSpec(bits=4, group_size=48))
    with pytest.raises(ValueError, match="not a multiple of 32"):
        dequant_matmul_pallas_tpu(jnp.ones((1, 96), jnp.float32), qa, interpret=True)
    qa5 = jq.quantize(w, jq.QuantSpec(bits=5, group_size=32))
    with pytest.raises(ValueError, match="2, 3, 4 and 8 bits"):
        dequant_matmul_pallas_gpu(jnp.ones((1, 96), jnp.float32), qa5, interpret=True)
    qa4 = jq.quantize(w, jq.QuantSpec(bits=4, group_size=32))
    with pytest.raises(ValueError, match="input features"):
        dequant_matmul_pallas_tpu(jnp.ones((1, 64), jnp.float32), qa4, interpret=True)
    with pytest.raises(ValueError, match="K block"):
        dequant_matmul_pallas_tpu(jnp.ones((1, 96), jnp.float32), qa4, bk=48, interpret=True)


def test_dispatch_predicates_and_logged_fallback(caplog):
    x, qa, W = _case(4, 32, 2, 64, 32)
    assert can_use_pallas_tpu(x, qa, "tpu") == (True, "ok")
    assert not can_use_pallas_tpu(x, qa, "cpu")[0]
    assert can_use_pallas_gpu(x, qa, "cuda")[0]
    ok, why = can_use_pallas_gpu(jnp.ones((2, 64, 64), jnp.float32), qa, "cuda")
    assert not ok and "prefill" in why  # shape-based: 128 rows go to XLA + cuBLAS
    ok, why = can_use_pallas_gpu(x.astype(jnp.float16), qa, "cuda")
    assert not ok and "float16" in why
    from jaxquant.kernels import dispatch
    from jaxquant.kernels.dispatch import quant_matmul

    dispatch._logged.clear()  # logged once per process: another test in this worker may have
    with caplog.at_level(logging.INFO, logger="jaxquant.kernels.dispatch"):
        y = quant_matmul(x, qa, platform="cpu")
    assert "XLA dequantize+matmul" in caplog.text and "is not TPU" in caplog.text
    assert _rel_err(y, _oracle(x, W)) < 1e-5
    with kernel_mode("interpret", interpret_platform="gpu"):
        y2 = quant_matmul(x, qa)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=1e-4, atol=1e-4)


def _abstract(bits, gs, k, n, codebook="uniform"):
    spec = jq.QuantSpec(bits=bits, group_size=gs, codebook=codebook)
    if codebook == "binary":  # codes and plane scales, as the DSQ algorithm returns them
        g = spec.num_groups(k)
        return jax.eval_shape(lambda q, r: from_codes(q, r, None, spec),
                              jax.ShapeDtypeStruct((k, n), jnp.int32),
                              jax.ShapeDtypeStruct((g, n, bits), jnp.float32))
    return jax.eval_shape(lambda w: jq.quantize(w, spec, validate=False),
                          jax.ShapeDtypeStruct((k, n), jnp.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("platform", "fn"), [("tpu", dequant_matmul_pallas_tpu),
                                             ("cuda", dequant_matmul_pallas_gpu)])
def test_kernels_lower_for_their_target(bits, platform, fn):
    """Lowering for the real platform runs the Mosaic / Triton lowering rules, which reject
    unsupported ops and block shapes (a kernel that cannot compile for its target fails here)."""
    for gs, (m, k, n) in ((128, (1, 4096, 4096)), (32, (16, 4096, 1024)), (-1, (256, 8192, 512)),
                          (64, (7, 576, 1536))):
        qa = _abstract(bits, gs, k, n)
        x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
        text = jax.jit(fn).trace(x, qa).lower(lowering_platforms=(platform,)).as_text()
        assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text.lower())


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize(("platform", "fn"), [("tpu", dequant_matmul_pallas_tpu),
                                             ("cuda", dequant_matmul_pallas_gpu)])
def test_binary_coded_kernels_lower_for_their_target(bits, platform, fn):
    for gs, (m, k, n) in ((128, (1, 4096, 4096)), (64, (16, 1536, 576)), (64, (7, 8192, 512))):
        qa = _abstract(bits, gs, k, n, codebook="binary")
        x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
        text = jax.jit(fn).trace(x, qa).lower(lowering_platforms=(platform,)).as_text()
        assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text.lower())


def test_jax_triton_kernel_needs_a_gpu_jaxlib():
    pytest.importorskip("jax_triton", exc_type=ImportError)
    from jaxquant.kernels.triton_dequant import dequant_matmul_jax_triton

    x, qa, W = _case(4, 128, 16, 512, 256)
    assert _rel_err(dequant_matmul_jax_triton(x, qa), _oracle(x, W)) < 1e-3


@pytest.mark.parametrize("platform", [pytest.param("gpu", marks=pytest.mark.gpu),
                                      pytest.param("tpu", marks=pytest.mark.tpu)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pallas_kernel_compiled_on_device(platform, bits):
    for gs in (32, 64, 128):
        for m in (1, 7, 16, 128):
            x, qa, W = _case(bits, gs, m, 4096, 1000, dtype=jnp.bfloat16, seed=m)
            assert _rel_err(KERNELS[platform](x, qa), _oracle(x, W)) < _tol(jnp.bfloat16)
            if bits in (2, 3):
                x, qa, W = _case_binary(bits, gs, m, 4096, 1000, dtype=jnp.bfloat16, seed=m)
                assert _rel_err(KERNELS[platform](x, qa), _oracle(x, W)) < _tol(jnp.bfloat16)
