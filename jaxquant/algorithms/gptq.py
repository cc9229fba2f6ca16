"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), on ONE weight matrix and its Hessian.

Notation follows the paper, in its ``W [d_row, d_col]`` layout (rows = output channels, columns =
input channels): the weight is transposed from jaxquant's Flax ``[K, N]`` on entry and back on exit.

* ``H = 2 X Xᵀ`` (``[K, K]``, accumulated in float32 by the caller; the factor 2 cancels).
* Dead inputs (``H_jj = 0``): ``H_jj := 1`` and ``W[:, j] := 0``.
* Dampening: ``H += λ I`` with ``λ = damp · mean(diag H)``. If the Cholesky factorisation still
  fails (``H`` not positive definite in float32), ``λ`` is multiplied by 10 and retried, up to
  ``max_damp_tries`` times; the damp used is reported.
* ``Hinv = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse).
* Columns are quantized left to right; the error of column ``j`` is spread over the columns not
  yet quantized, ``W[:, j:] -= (w_j - q_j)/Hinv_jj · Hinv[j, j:]``, lazily in blocks of
  ``blocksize`` columns (the *blocksize* is only a batching of updates: the result is the same up to
  rounding).
* Groups: with ``group_size`` g, a group's scale and zero are fitted when its first column is reached,
  on the error-updated weights (the reference behaviour). ``static_groups=True`` fits all groups on
  the original weights first. ``act_order=True`` quantizes columns in order of decreasing ``H_jj``
  and then always uses static groups, so every group still covers g *consecutive* input channels
  and the packed layout needs no ``g_idx``.
* ``gar=True`` (GAR ordering, as D²Quant's public code does it): within each group, columns by
  decreasing ``H_jj``; groups by their largest ``H_jj``. Groups stay contiguous, so group
  parameters are fitted at each group start (dynamic groups) and still cover one original group.

GPTAQ (Li et al., ICML 2025, "GPTQv2: Efficient Finetuning-Free Quantization with Asymmetric
Calibration"): ``H`` from the quantized-stream inputs ``X̃`` and the cross term
``dXXᵀ = (X − X̃) X̃ᵀ`` from the fp-stream inputs ``X``; with ``L`` the upper Cholesky factor of
``H⁻¹``, ``P = α · triu(dXXᵀ Lᵀ, 1) L``. The column update becomes
``W[:, j:] -= err_j ⊗ L[j, j:] − w_j ⊗ P[j, j:]`` (``w_j`` the column before it is quantized), and
the lazy block update ``W[:, i2:] -= Err1 · L[i1:i2, i2:] − W1 · P[i1:i2, i2:]`` with ``W1`` the
block after its loop (its quantized values), as the authors' code does. ``P = 0`` when ``X = X̃``:
GPTAQ is then GPTQ.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxquant.algorithms.registry import Algorithm, register
from jaxquant.core.binary_code import bc_fit, nearest_code
from jaxquant.core.qarray import QArray, compute_scale_zero, from_codes
from jaxquant.core.spec import QuantSpec


def _effective_blocksize(k: int, blocksize: int, spec: QuantSpec) -> int:
    if spec.per_tensor or spec.group_size == -1:
        return min(blocksize, k)
    gs = spec.group_size
    return gs * max(1, blocksize // gs)


def _hinv(H: jax.Array, damp: float, max_tries: int) -> tuple[jax.Array, jax.Array]:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, raising ``λ`` tenfold until it exists."""
    k = H.shape[0]
    eye = jnp.eye(k, dtype=jnp.float32)
    lam0 = damp * jnp.mean(jnp.diag(H))

    def attempt(lam):
        # With J the reversal permutation and J (H + λI) J = M Mᵀ (M lower), H + λI = R Rᵀ for
        # the upper triangular R = J M J, so (H + λI)⁻¹ = UᵀU with U = R⁻¹ = J M⁻¹ J: one
        # factorisation and one triangular solve, no explicit inverse.
        M = jnp.linalg.cholesky((H + lam * eye)[::-1, ::-1])
        U = jax.scipy.linalg.solve_triangular(M, eye, lower=True)[::-1, ::-1]
        return U, jnp.all(jnp.isfinite(U))

    # attempt 0 uses λ0, each later one 10x the previous (1 + max_tries in all); the first attempt
    # is the loop's first iteration, so the factorisation is compiled once
    def body(st):
        _, _, tries, lam = st
        lam = jnp.where(tries == 0, lam, 10.0 * lam)
        U, ok = attempt(lam)
        return U, ok, tries + 1, lam

    U, _, _, lam = jax.lax.while_loop(
        lambda st: jnp.logical_and(~st[1], st[2] <= max_tries), body,
        (jnp.zeros_like(H), jnp.asarray(False), jnp.asarray(0), lam0))
    return U, lam


def gar_permutation(h_diag: jax.Array, group_size: int) -> jax.Array:
    """GAR's column order: groups of ``group_size`` consecutive columns by their largest ``H_jj``
    (descending), and within each group its columns by ``H_jj`` (descending). ``perm[p]`` is the
    original column quantized at position ``p``; every run of ``group_size`` positions holds one
    original group."""
    k = h_diag.shape[0]
    d = h_diag.reshape(k // group_size, group_size)
    within = jnp.argsort(-d, axis=1)
    order = jnp.argsort(-jnp.max(d, axis=1))
    return (order[:, None] * group_size + within[order]).reshape(-1)


@functools.partial(
    jax.jit,
    static_argnames=("spec", "blocksize", "damp", "act_order", "static_groups", "max_damp_tries",
                     "gar", "alpha", "bc_iters"),
)
def gptq_core(W, H, cross=None, *, spec, blocksize, damp, act_order, static_groups,
              max_damp_tries, gar=False, alpha=0.25, bc_iters=15):
    """``W`` ``[N, K]`` (paper layout), ``H`` ``[K, K]``, ``cross`` ``[K, K]`` (GPTAQ's
    ``(X − X̃)X̃ᵀ``; None: GPTQ). Returns codes ``[N, K]``, ``S``/``Z`` ``[G, N]``, and
    diagnostics."""
    n, k = W.shape
    W = W.astype(jnp.float32)
    H = H.astype(jnp.float32)
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(dead.astype(jnp.float32))
    W = jnp.where(dead[None, :], 0.0, W)
    asym = cross is not None
    if asym:
        cross = jnp.where(dead[None, :], 0.0, cross.astype(jnp.float32))

    grouped = not (spec.per_tensor or spec.group_size == -1)
    gs = spec.group_size if grouped else k
    n_groups = k // gs if grouped else 1
    static = static_groups or act_order or not grouped
    binary = spec.codebook == "binary"
    if binary and (static or not grouped):
        raise ValueError("the binary codebook is fitted per group at each group start: it needs "
                         "groups (group_size > 0), dynamic groups and no act_order (use gar)")

    # static group parameters from the (dead-zeroed) original weights, [G, N]
    S_static, Z_static = compute_scale_zero(W.T, spec.replace(codebook="uniform"))
    if spec.per_tensor:
        S_static = jnp.broadcast_to(S_static, (1, n))
        Z_static = jnp.broadcast_to(Z_static, (1, n))

    if act_order:
        perm = jnp.argsort(-jnp.diag(H))
    elif gar:
        perm = gar_permutation(jnp.diag(H), gs)
    else:
        perm = jnp.arange(k)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv, lam = _hinv(H, damp, max_damp_tries)
    # the positive-definiteness check: the Cholesky factor exists (finite) at λ; λ0 is the first
    # λ tried, so λ > λ0 means H + λ0 I was not positive definite (the dampening was raised)
    pd, lam0 = jnp.all(jnp.isfinite(Hinv)), damp * jnp.mean(jnp.diag(H))
    if asym:
        cross = cross[perm][:, perm]
        P = alpha * jnp.triu(cross @ Hinv.T, 1) @ Hinv

    B = _effective_blocksize(k, blocksize, spec)
    kp = math.ceil(k / B) * B
    if kp != k:  # pad with independent, already-zero columns (identity Hinv rows)
        W = jnp.pad(W, ((0, 0), (0, kp - k)))
        Hinv = jnp.pad(Hinv, ((0, kp - k), (0, kp - k))) + jnp.diag(
            jnp.concatenate([jnp.zeros((k,), jnp.float32), jnp.ones((kp - k,), jnp.float32)])
        )
        perm_p = jnp.concatenate([perm, jnp.arange(k, kp)])
        if asym:
            P = jnp.pad(P, ((0, kp - k), (0, kp - k)))
    else:
        perm_p = perm
    maxq = float(spec.maxq)
    sdt = spec.jnp_scale_dtype

    def block(bi, state):
        W, Q, S, Z = state
        i1 = bi * B
        W1 = jax.lax.dynamic_slice(W, (0, i1), (n, B))
        Hinv1 = jax.lax.dynamic_slice(Hinv, (i1, i1), (B, B))
        P1 = jax.lax.dynamic_slice(P, (i1, i1), (B, B)) if asym else None

        def column(i, cstate):
            W1, Q1, Err1, S, Z, s_cur, z_cur = cstate
            j = i1 + i  # position in the (permuted) order
            w = W1[:, i]
            if binary:  # S: plane scales r [G, n, b]; Z: column scales c [kp]
                def bfit(_):
                    blk = jax.lax.dynamic_slice(W1, (0, i), (n, gs))
                    c, r, _ = bc_fit(blk, bits=spec.bits, iters=bc_iters)
                    return r.astype(sdt).astype(jnp.float32), c

                s, z = jax.lax.cond(i % gs == 0, bfit, lambda _: (s_cur, z_cur), None)
                g = jnp.minimum(perm_p[j] // gs, n_groups - 1)
                write = (i % gs == 0) & (j < k)
                S = jnp.where(write, S.at[g].set(s.astype(sdt)), S)
                cj = z[i % gs]
                Z = Z.at[perm_p[j]].set(cj)
                q, wq = nearest_code(w, jnp.broadcast_to(cj, w.shape), s, spec.bits)
                q = q.astype(jnp.float32)
            else:
                if static:
                    g = jnp.minimum(perm_p[j] // gs, n_groups - 1)
                    s, z = S[g], Z[g]
                else:
                    def fit(_):
                        blk = jax.lax.dynamic_slice(W1, (0, i), (n, gs))
                        s_new, z_new = compute_scale_zero(blk.T, spec.replace(group_size=-1))
                        return s_new[0], z_new[0]

                    s, z = jax.lax.cond(i % gs == 0, fit, lambda _: (s_cur, z_cur), None)
                    # the group of the original layout (GAR permutes whole groups)
                    g = jnp.minimum(perm_p[j] // gs, n_groups - 1)
                    write = (i % gs == 0) & (j < k)
                    S = jnp.where(write, S.at[g].set(s.astype(sdt)), S)
                    Z = jnp.where(write, Z.at[g].set(z), Z)
                s32 = s.astype(jnp.float32)
                q = jnp.clip(jnp.round(w / s32) + z, 0.0, maxq)
                wq = s32 * (q - z)
            err = (w - wq) / Hinv1[i, i]
            # Hinv1 is upper triangular: row i touches only columns >= i
            upd = err[:, None] * Hinv1[i][None, :]
            if asym:  # GPTAQ's asymmetric term, with the column before quantization
                upd = upd - w[:, None] * P1[i][None, :]
            W1 = W1 - upd
            Q1 = Q1.at[:, i].set(q)
            Err1 = Err1.at[:, i].set(err)
            return W1, Q1, Err1, S, Z, s, z

        zeros = jnp.zeros((n, B), jnp.float32)
        if binary:
            s0 = jnp.zeros((n, spec.bits), jnp.float32)
            z0 = jnp.ones((gs,), jnp.float32)
        else:
            s0 = jnp.ones((n,), sdt)
            z0 = jnp.zeros((n,), jnp.float32)
        W1, Q1, Err1, S, Z, _, _ = jax.lax.fori_loop(
            0, B, column, (W1, zeros, zeros, S, Z, s0, z0)
        )
        Q = jax.lax.dynamic_update_slice(Q, Q1, (0, i1))
        # lazy batch update of all later columns (rows i1..i1+B of Hinv are zero left of i1)
        upd = Err1 @ jax.lax.dynamic_slice(Hinv, (i1, 0), (B, kp))
        if asym:  # W1 now holds the block's quantized values (the authors' lazy update)
            upd = upd - W1 @ jax.lax.dynamic_slice(P, (i1, 0), (B, kp))
        W = W - upd
        return W, Q, S, Z

    Q = jnp.zeros((n, kp), jnp.float32)
    if binary:  # plane scales [G, n, b] and per-column scales [kp] (original column order)
        S0 = jnp.zeros((n_groups, n, spec.bits), sdt)
        Z0 = jnp.ones((kp,), jnp.float32)
    else:
        S0 = S_static.astype(sdt)
        Z0 = Z_static
    _, Q, S, Z = jax.lax.fori_loop(0, kp // B, block, (W, Q, S0, Z0))
    Q = Q[:, :k]
    invperm = jnp.argsort(perm)
    Q = Q[:, invperm]
    if binary:
        Z = Z[:k]
    if spec.per_tensor:
        S, Z = S[:1, :1], Z[:1, :1]
    return Q, S, Z, {"damp": lam, "damp0": lam0, "dead_inputs": jnp.sum(dead), "pd": pd}


def check_weight_and_hessian(w, H, spec: QuantSpec, *, name: str) -> None:
    """One weight matrix ``[K, N]`` with its ``[K, K]`` Hessian, shapes the spec accepts."""
    if w.ndim != 2:
        raise ValueError(f"{name} expects one weight matrix [K, N], got shape {tuple(w.shape)}")
    k = w.shape[0]
    if H.shape != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}] for w of shape {tuple(w.shape)}, "
                         f"got {tuple(H.shape)}")
    spec.check_weight_shape(w.shape)


def gptq(
    w: jax.Array,
    H: jax.Array,
    spec: QuantSpec,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    gar: bool = False,
    max_damp_tries: int = 6,
    cross: jax.Array | None = None,
    alpha: float = 0.25,
) -> tuple[QArray, dict]:
    """GPTQ-quantize ``w`` (``[K, N]``, Flax layout) given ``H = Σ x̃ x̃ᵀ`` (``[K, K]``); with
    ``cross = Σ (x − x̃) x̃ᵀ`` against the fp inputs ``x`` it is GPTAQ with correction ``alpha``.

    Returns:
      ``(QArray, diagnostics)``; diagnostics hold the dampening ``λ`` actually used and the number
      of dead input channels.
    """
    name = "gptq" if cross is None else "gptaq"
    check_weight_and_hessian(w, H, spec, name=name)
    if cross is not None and cross.shape != H.shape:
        raise ValueError(f"{name}: cross must be [K, K] = {tuple(H.shape)}, got "
                         f"{tuple(cross.shape)}")
    _check({"blocksize": blocksize, "damp": damp, "act_order": act_order, "gar": gar,
            "alpha": alpha}, spec)
    Q, S, Z, diag = gptq_core(
        w.T, H, cross, spec=spec, blocksize=blocksize, damp=damp, act_order=act_order,
        static_groups=static_groups, max_damp_tries=max_damp_tries, gar=gar,
        alpha=float(alpha),
    )
    return from_codes(Q.T, S, Z, spec, dtype=w.dtype), diag


def _check(opts: dict, spec) -> None:
    if opts["blocksize"] < 1:
        raise ValueError(f"options.blocksize must be >= 1, got {opts['blocksize']}")
    if opts["damp"] < 0:
        raise ValueError(f"options.damp must be >= 0, got {opts['damp']}")
    if opts.get("gar") and opts.get("act_order"):
        raise ValueError("options.gar and options.act_order are two column orders; choose one")
    if opts.get("alpha", 0.0) < 0:
        raise ValueError(f"options.alpha must be >= 0, got {opts['alpha']}")


def _quantize(W, stats, spec: QuantSpec, **opts):
    qa, diag = gptq(W, stats["H"], spec, **opts)
    return qa, {"diagnostics": diag}


def _quantize_gptaq(W, stats, spec: QuantSpec, **opts):
    qa, diag = gptq(W, stats["H"], spec, cross=stats["cross"], **opts)
    return qa, {"diagnostics": diag}


_GPTQ_OPTIONS = {"blocksize": 128, "damp": 0.01, "act_order": False, "static_groups": False,
                 "gar": False}

register(Algorithm(
    "gptq", _quantize, needs=frozenset({"H"}), options=_GPTQ_OPTIONS,
    check=_check, batchable=True, doc="GPTQ (Frantar et al. 2023) on H = Σ x xᵀ"))

register(Algorithm(
    "gptaq", _quantize_gptaq, needs=frozenset({"H", "cross"}),
    options={**_GPTQ_OPTIONS, "alpha": 0.25}, check=_check, batchable=True,
    doc="GPTAQ / GPTQv2 (Li et al. 2025): GPTQ on the quantized stream's H plus the asymmetric "
        "correction from the fp stream's cross term"))
