"""D²Quant (Yan et al. 2026, arXiv 2602.02546): the Dual-Scale Quantizer (DSQ) for down-projections
and the Deviation-Aware Correction (DAC). Pure functions on ONE matrix / one activation pair; the
block pipeline (attention -> DAC -> MLP with DSQ on down_proj) lives in the calibration driver.

Layout: jaxquant's Flax ``W [K, N]`` (``y = x W``), so for ``down_proj`` ``K = d_ff`` input
channels (rows) and ``N = d_model`` outputs. The paper writes ``W_down [d_model, d_ff]``.

DSQ
---
``W[i, o] ≈ s^c[i] · S[g(i), o] · (Q[i, o] − Z[g(i), o])``: an ordinary group quantizer (codes
``Q``, scales ``S``, zeros ``Z``) of ``W_s = diag(s^c)⁻¹ W``, multiplied back by a per-input-channel
scale ``s^c``. Write ``U = S (Q − Z)`` for the dequantized codes. The objective is the layer's
output error on the calibration activations ``X`` (``H = XᵀX``)::

    f(s^c, U) = ‖X (W − diag(s^c) U)‖²_F = tr((W − diag(s^c) U)ᵀ H (W − diag(s^c) U)).

Alternating optimisation, ``iters`` rounds of

  (a) the s^c step, ``Q, S, Z`` fixed: f is a convex quadratic in ``s^c``; its minimiser solves
      ``(H ⊙ U Uᵀ) s^c = diag(H W Uᵀ)`` (``ls="full"``). A proximal term ``λ‖s − s_prev‖²`` with a
      tiny ``λ`` keeps the system well posed (dead channels keep their scale) and makes the step
      provably non-increasing. ``ls="diag"`` is the per-channel closed form
      ``s_i = ⟨W_i, U_i⟩ / ⟨U_i, U_i⟩`` that ignores cross-channel correlations.
  (a') the ``S`` step (``refit_scales=True``, default), codes and ``s^c`` fixed: f is also a
      convex quadratic in the group scales ``S``, solved per output column in closed form
      (:func:`dsq_group_scale_step`). The paper alternates "the two scales" without giving the
      update of ``S``; on SmolLM2's down_proj layers this step is where most of the gain over
      GPTQ comes from (the ``s^c`` step alone: ~1% lower layer error at W3, with it: ~4%).
  (b) the requantization step, ``s^c`` fixed: quantize ``W_s = W / s^c`` again, with GPTQ on the
      activation-scaled Hessian ``H_s = diag(s^c) H diag(s^c)`` (the Hessian of ``W_s``'s input
      ``X diag(s^c)``; default) or with RTN. GPTQ is a greedy solver, so this step can raise f; with
      ``monotone=True`` (default) a requantization that raises f is rejected and the previous codes
      are kept (with the new ``s^c``), so the recorded objective never increases.

Initialisation ``init``: ``"ones"`` (the first round is then exactly GPTQ/RTN, so DSQ ends at most
at their error) or ``"wmax"`` (``s_i ∝ sqrt(max_o |W[i, o]|)``, geometric mean 1).

Merging: ``y = (act(x W_gate) ⊙ (x W_up)) W_down``. Scaling output column ``i`` of ``W_up`` by
``s^c[i]`` equals scaling input row ``i`` of ``W_down`` by it, and column ``i`` of a group-quantized
``W_up`` owns its scales ``S_up[:, i]``, so ``S_up[:, i] *= s^c[i]`` absorbs ``s^c`` with the codes
unchanged: no extra tensor and no extra bit (:func:`fold_channel_scale`). Exact when the scales are
stored in float32; with a 16-bit ``scale_dtype`` the product is rounded to it.

DAC
---
:func:`mean_shift`: ``μ = (1/L) Σ_t (H_t − H̃_t)`` over the ``L`` calibration tokens, where ``H`` and
``H̃`` are the outputs of the post-attention RMSNorm on the fp and the quantized path. Stored as that
norm's bias, ``y = g ⊙ x / rms(x) + μ``, the quantized path's mean deviation on the calibration data
becomes zero.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from jaxquant.algorithms.gptq import check_weight_and_hessian, gptq_core
from jaxquant.algorithms.registry import Algorithm, register
from jaxquant.core.qarray import (
    QArray,
    _grouped,
    compute_scale_zero,
    dequantize_codes,
    from_codes,
    quantize_codes,
)
from jaxquant.core.spec import QuantSpec

DSQ_INITS = ("ones", "wmax")
DSQ_REQUANT = ("gptq", "rtn")
DSQ_LS = ("full", "diag")


# ----------------------------------------------------------------------------- the objective
def dsq_objective(W: jax.Array, s: jax.Array, U: jax.Array, H: jax.Array) -> jax.Array:
    """``tr((W − diag(s) U)ᵀ H (W − diag(s) U))`` = ``‖X(W − diag(s)U)‖²`` for ``H = XᵀX``."""
    D = W.astype(jnp.float32) - s[:, None] * U
    return jnp.sum(D * (H @ D))


def dsq_scale_step(
    W: jax.Array, U: jax.Array, H: jax.Array, s_prev: jax.Array, *,
    ls: Literal["full", "diag"] = "full", prox: float = 1e-6,
) -> jax.Array:
    """The closed-form least-squares update of ``s^c`` with the codes (``U = S(Q − Z)``) fixed.

    ``ls="full"`` minimises ``f(s) + λ‖s − s_prev‖²`` exactly, ``λ = prox · mean(diag(H ⊙ UUᵀ))``:
    ``(H ⊙ UUᵀ + λI) s = diag(H W Uᵀ) + λ s_prev``. ``ls="diag"``: ``s_i = ⟨W_i,U_i⟩/⟨U_i,U_i⟩``.
    Channels whose new scale would be ~0 (or whose row of ``U`` is zero) keep ``s_prev``.
    """
    W = W.astype(jnp.float32)
    H = H.astype(jnp.float32)
    if ls == "full":
        A = H * (U @ U.T)
        c = jnp.sum((H @ W) * U, axis=1)  # diag(H W Uᵀ)
        lam = prox * jnp.maximum(jnp.mean(jnp.diag(A)), 1e-30)
        A = A + lam * jnp.eye(A.shape[0], dtype=A.dtype)
        s = jax.scipy.linalg.solve(A, c + lam * s_prev, assume_a="pos")
    elif ls == "diag":
        uu = jnp.sum(U * U, axis=1)
        s = jnp.where(uu > 0, jnp.sum(W * U, axis=1) / jnp.where(uu > 0, uu, 1.0), s_prev)
    else:
        raise ValueError(f"ls must be one of {DSQ_LS}, got {ls!r}")
    tiny = 1e-3 * jnp.mean(jnp.abs(s_prev))
    ok = jnp.isfinite(s) & (jnp.abs(s) > tiny)
    return jnp.where(ok, s, s_prev)


def dsq_group_scale_step(
    W: jax.Array, s: jax.Array, C: jax.Array, H: jax.Array, S_prev: jax.Array, group_size: int,
    *, prox: float = 1e-6,
) -> jax.Array:
    """The closed-form least-squares update of the group scales ``S`` ``[G, N]`` with the codes
    (``C = Q − Z``, ``[K, N]``) and ``s^c`` fixed.

    Column ``o`` of ``diag(s) U`` is linear in ``S[:, o]``: ``(diag(s) U)[i, o] = s_i C[i, o]
    S[g(i), o]``, so each column solves a ``G x G`` system
    ``A_o S[:, o] = r_o``, ``A_o[g, h] = Σ_{i∈g, j∈h} H_ij C̃_io C̃_jo``, ``r_o[g] = Σ_{i∈g} C̃_io
    (H W)_io`` with ``C̃ = diag(s) C`` (plus the same proximal term as the ``s^c`` step). The
    integer codes and zero points are untouched, so the stored format does not change.
    """
    k, n = W.shape
    gs = k if group_size == -1 else group_size
    g = k // gs
    H = H.astype(jnp.float32)
    Ct = (s[:, None] * C).reshape(g, gs, n)
    A = jnp.einsum("gahb,gao,hbo->ogh", H.reshape(g, gs, g, gs), Ct, Ct)
    r = jnp.einsum("gao,gao->og", Ct, (H @ W.astype(jnp.float32)).reshape(g, gs, n))
    lam = prox * jnp.maximum(jnp.mean(jnp.diagonal(A, axis1=1, axis2=2), axis=1), 1e-30)
    eye = jnp.eye(g, dtype=jnp.float32)
    S = jnp.linalg.solve(A + lam[:, None, None] * eye[None],
                         (r + lam[:, None] * S_prev.T.astype(jnp.float32))[..., None])[..., 0].T
    ok = jnp.isfinite(S) & (S > 0)
    return jnp.where(ok, S, S_prev.astype(jnp.float32))


def dsq_init(W: jax.Array, init: str) -> jax.Array:
    """The initial ``s^c`` ``[K]``."""
    k = W.shape[0]
    if init == "ones":
        return jnp.ones((k,), jnp.float32)
    if init == "wmax":
        m = jnp.sqrt(jnp.max(jnp.abs(W.astype(jnp.float32)), axis=1))
        m = jnp.where(m > 0, m, 1.0)
        return m / jnp.exp(jnp.mean(jnp.log(m)))
    raise ValueError(f"init must be one of {DSQ_INITS}, got {init!r}")


# ----------------------------------------------------------------------------- the solver
def _requantize(W, H, s, *, spec, requant, blocksize, damp, act_order, static_groups):
    """Codes, scales and zeros of ``W / s`` (``[K, N]``, ``[G, N]``, ``[G, N]``) and ``U``."""
    Ws = W / s[:, None]
    if requant == "gptq":
        Hs = H * s[:, None] * s[None, :]
        Qt, S, Z, _ = gptq_core(Ws.T, Hs, spec=spec, blocksize=blocksize, damp=damp,
                                 act_order=act_order, static_groups=static_groups,
                                 max_damp_tries=6)
        Q = Qt.T
    else:
        S, Z = compute_scale_zero(Ws, spec)
        Q = quantize_codes(_grouped(Ws, spec), S, Z, spec).reshape(Ws.shape)
    U = dequantize_codes(_grouped(Q, spec), S, Z).reshape(Ws.shape)
    return Q, S.astype(jnp.float32), Z, U


@functools.partial(jax.jit, static_argnames=(
    "spec", "iters", "init", "requant", "ls", "refit_scales", "monotone", "blocksize", "damp",
    "act_order", "static_groups"))
def _dsq_core(W, H, *, spec, iters, init, requant, ls, refit_scales, monotone, blocksize, damp,
              act_order, static_groups):
    W = W.astype(jnp.float32)
    H = H.astype(jnp.float32)
    dead = jnp.diag(H) == 0
    W = jnp.where(dead[:, None], 0.0, W)  # as GPTQ does: dead inputs carry no signal
    rq = functools.partial(_requantize, spec=spec, requant=requant, blocksize=blocksize,
                           damp=damp, act_order=act_order, static_groups=static_groups)
    s = dsq_init(W, init)
    Q, S, Z, U = rq(W, H, s)
    f0 = dsq_objective(W, s, U, H)

    def one_round(state, _):
        s, Q, S, Z, U, f = state
        s_new = dsq_scale_step(W, U, H, s, ls=ls)
        f_s = dsq_objective(W, s_new, U, H)
        # the "full" step provably lowers f (up to rounding); "diag" need not: guard both
        take_s = f_s <= f if monotone else jnp.asarray(True)
        s = jnp.where(take_s, s_new, s)
        f_s = jnp.where(take_s, f_s, f)
        steps = [f_s]
        if refit_scales:  # the other scale of the pair: S given the codes and s^c
            C = (_grouped(Q, spec) - jnp.expand_dims(Z, -2)).reshape(Q.shape)
            S_new = dsq_group_scale_step(W, s, C, H, S, spec.group_size).astype(
                spec.jnp_scale_dtype).astype(jnp.float32)
            U_new = dequantize_codes(_grouped(Q, spec), S_new, Z).reshape(Q.shape)
            f_S = dsq_objective(W, s, U_new, H)
            take_S = f_S <= f_s if monotone else jnp.asarray(True)
            S = jnp.where(take_S, S_new, S)
            U = jnp.where(take_S, U_new, U)
            f_s = jnp.where(take_S, f_S, f_s)
            steps.append(f_s)
        Q2, S2, Z2, U2 = rq(W, H, s)
        f_q = dsq_objective(W, s, U2, H)
        take = f_q <= f_s if monotone else jnp.asarray(True)
        pick = lambda a, b: jnp.where(take, a, b)  # noqa: E731
        state = (s, pick(Q2, Q), pick(S2, S), pick(Z2, Z), pick(U2, U), pick(f_q, f_s))
        return state, jnp.stack([*steps, pick(f_q, f_s)])

    (s, Q, S, Z, _, _), hist = jax.lax.scan(one_round, (s, Q, S, Z, U, f0), None, length=iters)
    history = jnp.concatenate([f0[None], hist.reshape(-1)])
    return Q, S, Z, s, history


def dsq(
    w: jax.Array,
    H: jax.Array,
    spec: QuantSpec,
    *,
    iters: int = 5,
    init: Literal["ones", "wmax"] = "ones",
    requant: Literal["gptq", "rtn"] = "gptq",
    ls: Literal["full", "diag"] = "full",
    refit_scales: bool = True,
    monotone: bool = True,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> tuple[QArray, jax.Array, dict]:
    """Dual-scale quantization of ``w`` (``[K, N]``, Flax layout; ``down_proj``) given
    ``H = Σ x xᵀ`` over its inputs.

    Returns:
      ``(qa, s_c, info)``: ``qa`` quantizes ``w / s_c`` (fold ``s_c`` into ``up_proj`` with
      :func:`fold_channel_scale`, or use :func:`dsq_dequantize`); ``s_c`` ``[K]`` float32; ``info``
      holds ``history``, the objective after the initial quantization and after every step of
      every round (``s^c``, ``S`` when ``refit_scales``, requantization: ``3 · iters + 1`` or
      ``2 · iters + 1`` values), and ``rel_error`` ``sqrt(f / ‖XW‖²)``.
    """
    check_weight_and_hessian(w, H, spec, name="dsq")
    if spec.per_tensor:
        raise ValueError("dsq needs group-wise or per-channel scales (spec.per_tensor=True given)")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    for name, val, allowed in (("init", init, DSQ_INITS), ("requant", requant, DSQ_REQUANT),
                               ("ls", ls, DSQ_LS)):
        if val not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {val!r}")
    Q, S, Z, s, hist = _dsq_core(
        w, H, spec=spec, iters=iters, init=init, requant=requant, ls=ls,
        refit_scales=refit_scales, monotone=monotone,
        blocksize=blocksize, damp=damp, act_order=act_order, static_groups=static_groups)
    w32 = w.astype(jnp.float32)
    ref = jnp.sum(w32 * (H.astype(jnp.float32) @ w32))
    info = {"history": hist, "rel_error": jnp.sqrt(hist[-1] / jnp.maximum(ref, 1e-30))}
    return from_codes(Q, S, Z, spec, dtype=w.dtype), s, info


def dsq_dequantize(qa: QArray, s_c: jax.Array) -> jax.Array:
    """``diag(s_c) · S (Q − Z)``: the unfolded DSQ weight, float32 ``[K, N]``."""
    from jaxquant.core.qarray import dequantize

    return s_c[:, None].astype(jnp.float32) * dequantize(qa, dtype=jnp.float32)


def fold_channel_scale(up, s_c: jax.Array):
    """Absorb ``s_c`` (``[d_ff]``) into ``up_proj``'s output channels.

    ``up`` is a QArray (its per-column group scales are multiplied, codes unchanged) or a dense
    kernel ``[d_model, d_ff]`` (its columns are multiplied).
    """
    s_c = jnp.asarray(s_c, jnp.float32)
    n = up.shape[-1]
    if s_c.shape != (n,):
        raise ValueError(f"s_c must have one entry per up_proj output channel ({n}), "
                         f"got shape {tuple(s_c.shape)}")
    if isinstance(up, QArray):
        if up.spec.per_tensor:
            raise ValueError("cannot fold a per-channel scale into a per-tensor QArray")
        scale = (up.scale.astype(jnp.float32) * s_c[None, :]).astype(up.scale.dtype)
        return up.replace(scale=scale)
    return (up.astype(jnp.float32) * s_c[None, :]).astype(up.dtype)


# ----------------------------------------------------------------------------- DAC
def mean_shift(h_fp: jax.Array, h_q: jax.Array) -> jax.Array:
    """``μ = mean_t (H_t − H̃_t)`` over every token axis: ``[..., D] -> [D]`` (float32)."""
    if h_fp.shape != h_q.shape:
        raise ValueError(f"fp and quantized activations differ in shape: {h_fp.shape} vs "
                         f"{h_q.shape}")
    d = h_fp.astype(jnp.float32) - h_q.astype(jnp.float32)
    return jnp.mean(d.reshape(-1, d.shape[-1]), axis=0)


# ----------------------------------------------------------------------------- registry
def _check(opts: dict, spec) -> None:
    if opts["iters"] < 0:
        raise ValueError(f"options.iters must be an integer >= 0, got {opts['iters']!r}")
    if spec is not None and spec.per_tensor:
        raise ValueError("spec: dsq needs group-wise or per-channel scales, not per_tensor")


def _quantize(W, stats, spec: QuantSpec, **opts):
    qa, s_c, info = dsq(W, stats["H"], spec, **opts)
    return qa, {"producer_scale": s_c, "history": info["history"]}


register(Algorithm(
    "dsq_uniform", _quantize, needs=frozenset({"H"}),
    options={"iters": 5, "init": "ones", "requant": "gptq", "ls": "full", "refit_scales": True,
             "monotone": True, "blocksize": 128, "damp": 0.01, "act_order": False,
             "static_groups": False},
    choices={"init": DSQ_INITS, "requant": DSQ_REQUANT, "ls": DSQ_LS},
    check=_check, producer_fold=True, fold_target="gated_mlp",
    doc="D²Quant's dual-scale quantizer, our earlier reconstruction on a uniform grid (kept to "
        "compare); its per-input-channel scale folds into the producer (up_proj of a gated MLP)"))


# ----------------------------------------------------------------------------- binary-coded DSQ
def dsq_binary(w: jax.Array, H: jax.Array, spec: QuantSpec, *, cross: jax.Array | None = None,
               iters: int = 15, gar: bool = True, blocksize: int = 64, damp: float = 0.01,
               alpha: float = 0.25) -> tuple[QArray, jax.Array, dict]:
    """DSQ as D²Quant's public code does it: the binary-coded quantizer
    (:mod:`jaxquant.core.binary_code`) fitted at every group start inside the GPTAQ column loop
    (GPTQ's when ``cross`` is None), each error-compensated column snapping to its nearest
    candidate ``c_j · (±r0 ± r1 ...)``.

    ``w`` ``[K, N]`` (Flax layout: ``K`` = the gated MLP's hidden width), ``H`` ``[K, K]``.
    Returns ``(QArray, c [K], diagnostics)``: the QArray holds the sign planes and the plane scales
    (``codebook="binary"``); the per-input-channel scale ``c`` is folded by the caller into the
    producer (up_proj's output channels), so ``W ≈ diag(c) · dequantize(QArray)``."""
    spec = spec.replace(codebook="binary")
    check_weight_and_hessian(w, H, spec, name="dsq")
    if spec.group_size == -1:
        raise ValueError("dsq fits its planes per group: spec.group_size must be > 0")
    Q, R, c, diag = gptq_core(
        w.T, H, cross, spec=spec, blocksize=blocksize, damp=damp, act_order=False,
        static_groups=False, max_damp_tries=6, gar=gar, alpha=float(alpha), bc_iters=iters)
    return from_codes(Q.T, R, None, spec, dtype=w.dtype), c, diag


def _check_binary(opts: dict, spec) -> None:
    if opts["iters"] < 0:
        raise ValueError(f"options.iters must be an integer >= 0, got {opts['iters']!r}")
    if opts["blocksize"] < 1 or opts["damp"] < 0 or opts["alpha"] < 0:
        raise ValueError("options.blocksize must be >= 1, damp and alpha >= 0")
    if spec is not None and (spec.per_tensor or spec.group_size == -1):
        raise ValueError("spec: dsq fits sign planes per group; it needs group_size > 0")


def _quantize_binary(W, stats, spec: QuantSpec, **opts):
    backend = opts.pop("backend")
    cross = stats["cross"] if backend == "gptaq" else None
    qa, c, diag = dsq_binary(W, stats["H"], spec, cross=cross, **opts)
    return qa, {"producer_scale": c, "diagnostics": diag}


register(Algorithm(
    "dsq", _quantize_binary, needs=frozenset({"H", "cross"}),
    options={"iters": 15, "backend": "gptaq", "gar": True, "blocksize": 64, "damp": 0.01,
             "alpha": 0.25},
    choices={"backend": ("gptaq", "gptq")},
    check=_check_binary, producer_fold=True, fold_target="gated_mlp",
    doc="D²Quant's dual-scale quantizer as its public code does it: binary-coded sign planes "
        "with per-(row, group) plane scales and a per-input-channel scale folded into the "
        "producer (up_proj of a gated MLP), inside the GPTAQ column loop"))
