"""The calibration engine: one loop for every model family, true-sequential, one forward per block.

For each layer block ``b`` (parameters streamed from the checkpoint by the family's adapter)::

    read      fp block params
    for each stage of the family's BlockSpec, in true-sequential order:
      statistics   state = stage.fn(quantized params so far, state) over all samples, chunk by
                   chunk, accumulating the statistics of state[stage.input] that the stage's
                   algorithms need (and of the fp reference stream, when the recipe asks for one)
      corrections  DAC: a norm producer gets the bias mean(ref) − mean(quantized); the state and
                   the statistics are shifted exactly (no second pass)
      algorithm    per linear, the registered algorithm; AWQ-like input scales and DSQ-like
                   channel scales are folded into the stage's producer (state and stats rescaled)
    propagation   X_{b+1} = finish(quantized params, state)
    checkpoint    quantized block b, X_{b+1} (and the reference stream), the report: resume point

Each stage function runs once per sample, so a block costs one forward (two with a reference
stream). A recipe whose algorithms need no data runs no forward at all. The engine names no
family, no linear and no tensor: everything comes from the adapter and its block spec.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxquant.algorithms import registry
from jaxquant.calibration import distributed as D
from jaxquant.calibration import stats as S
from jaxquant.core.qarray import QArray, dequantize, split_columns
from jaxquant.models.blockspec import (
    BlockSpec,
    ModelAdapter,
    Producer,
    Stage,
    get_path,
    set_path,
)
from jaxquant.models.quantized import load_tree, save_tree
from jaxquant.models.rotation import RotatedAdapter, RotationSpec
from jaxquant.recipes.recipe import KEEP_FP, Recipe

log = logging.getLogger(__name__)
PROGRESS_DIR = "progress"
STATE_FILE = "state.json"
PHASES = ("read", "statistics", "algorithm", "propagation", "checkpoint")


class ResumeMismatchError(ValueError):
    """A resume whose model, recipe or calibration data differ from the saved run."""


@dataclasses.dataclass
class LayerReport:
    layer: str
    algorithm: str
    bits: int | None
    rel_error: float
    seconds: float
    info: dict | None = None  # e.g. a parameter search's choice


@dataclasses.dataclass
class BlockReport:
    """Seconds per phase of one layer block (see :data:`PHASES`) and its stream passes."""

    block: int
    read: float = 0.0
    statistics: float = 0.0
    algorithm: float = 0.0
    propagation: float = 0.0
    checkpoint: float = 0.0
    passes: int = 0


@dataclasses.dataclass
class CalibrationResult:
    config: Any
    params: Any
    report: list[LayerReport]
    seconds: float
    unmatched: list[str]
    unused_rules: list[str]
    resumed_from: int = 0
    blocks: list[BlockReport] = dataclasses.field(default_factory=list)
    # offload=True: ``params`` is None; the quantized blocks are these on-disk trees, the rest
    # of the model comes from ``top_parts`` ``[(key, load)]`` one entry at a time
    block_dirs: list[str] | None = None
    top_parts: list | None = None
    blocks_key: str | None = None


def _last(c, x):
    """Per-channel ``c`` ``[K]`` shaped to broadcast against ``x`` ``[..., K]`` (``x``'s dtype)."""
    return jnp.asarray(c).astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))


def _is_q(a) -> bool:
    return isinstance(a, QArray)


def dense_params(tree):
    """``tree`` with every QArray dequantized to float32 (done once per stage, not per chunk).

    Leaf by leaf, not one jit over the tree: the tree's structure changes as each stage's linears
    are quantized, and a whole-tree jit recompiled for every stage (8 s of a 30-block run)."""
    return jax.tree.map(lambda a: dequantize(a, dtype=jnp.float32) if _is_q(a) else a, tree,
                        is_leaf=_is_q)


def scale_columns(w, c):
    """Output channels of a dense kernel ``[K, N]`` / bias ``[N]`` / QArray times ``c`` ``[N]``."""
    c = jnp.asarray(c, jnp.float32)
    if isinstance(w, QArray):
        if w.spec.per_tensor:
            raise ValueError("cannot fold a per-channel scale into a per-tensor QArray")
        return w.replace(scale=(w.scale.astype(jnp.float32) * c[None, :]).astype(w.scale.dtype))
    return (w.astype(jnp.float32) * c.reshape((1,) * (w.ndim - 1) + (-1,))).astype(w.dtype)


def fold_into_producer(bp: dict, producer: Producer, c) -> dict:
    """Multiply the producer's output channels by ``c`` (a norm's gain and bias, or a linear's
    kernel columns and bias), so the stage input becomes ``x ⊙ c``."""
    if producer.kind == "modulation":  # LN(x)(1+scale)+shift, times c: scale' = c·scale + c − 1
        n, i_shift, i_scale = producer.chunks
        path = producer.paths[0]
        node = get_path(bp, path)
        c = jnp.asarray(c, jnp.float32)
        d = c.shape[0]
        full = jnp.ones((n * d,), jnp.float32)
        full = full.at[i_shift * d:(i_shift + 1) * d].set(c).at[i_scale * d:(i_scale + 1) * d].set(c)
        bp = set_path(bp, f"{path}/kernel", scale_columns(node["kernel"], full))
        b = jnp.asarray(node["bias"], jnp.float32) if "bias" in node \
            else jnp.zeros((n * d,), jnp.float32)
        b = b * full
        b = b.at[i_scale * d:(i_scale + 1) * d].add(c - 1.0)
        return set_path(bp, f"{path}/bias", b)
    for path in producer.paths:
        node = get_path(bp, path)
        keys = ("scale", "bias") if producer.kind == "norm" else ("kernel", "bias")
        for k in keys:
            if k in node:
                bp = set_path(bp, f"{path}/{k}", scale_columns(node[k], c))
    return bp


def _add_bias(bp: dict, path: str, mu) -> dict:
    old = get_path(bp, path).get("bias")
    return set_path(bp, f"{path}/bias", mu if old is None else old + mu)


def rel_error(W, W_hat, H=None) -> float:
    """``‖X(W − Ŵ)‖ / ‖XW‖`` from ``H = XᵀX`` (weight space ``‖W − Ŵ‖/‖W‖`` without data)."""
    d = (W - W_hat).astype(jnp.float32)
    W = W.astype(jnp.float32)
    if H is None:
        return float(jnp.sqrt(jnp.sum(d * d) / jnp.maximum(jnp.sum(W * W), 1e-30)))
    num = jnp.sum(d * (H @ d))
    den = jnp.sum(W * (H @ W))
    return float(jnp.sqrt(num / jnp.maximum(den, 1e-30)))


# ---------------------------------------------------------------------------- passes
def _chunk(tree, bs):
    """``[n, ...] -> [n/bs, bs, ...]`` with chunk ``c`` holding samples ``c, c + n/bs, ...``
    (strided, so a batch axis sharded over devices stays sharded inside every chunk)."""
    def f(a):
        n = a.shape[0]
        return a.reshape(bs, n // bs, *a.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(f, tree)


def _unchunk(tree):
    return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(-1, *a.shape[2:]), tree)


def _empty_stats(like):
    def init(path, sd):
        name = path[-1].key
        if name == "max":
            return jnp.full(sd.shape, -jnp.inf, sd.dtype)
        if name == "min":
            return jnp.full(sd.shape, jnp.inf, sd.dtype)
        if name == "finite":
            return jnp.ones(sd.shape, sd.dtype)
        return jnp.zeros(sd.shape, sd.dtype)
    return jax.tree_util.tree_map_with_path(init, like)


@functools.partial(jax.jit, static_argnames=("fn", "input_key", "bs", "needs", "n_groups",
                                             "stride"))
def stage_pass(params, state, batch, ref_params, ref_state, *, fn, input_key, bs, needs,
               n_groups, stride):
    """Run ``fn`` over every sample (chunks of ``bs``), on the quantized stream and (when
    ``ref_state`` is given) on the fp reference stream; accumulate the statistics of
    ``state[input_key]``. Returns ``(state', ref_state', stats)``."""
    with_ref = ref_state is not None
    xs = (_chunk(state, bs), _chunk(batch, bs), _chunk(ref_state, bs) if with_ref else None)

    def one(s, bt, rs):
        s2 = fn(params, s, bt)
        rs2 = fn(ref_params, rs, bt) if with_ref else None
        x = s2[input_key]
        st = S.chunk_stats(x, needs=needs, w=bt.get("sample_weight"),
                           x_ref=rs2[input_key] if with_ref else None, group=bt.get("group"),
                           n_groups=n_groups)
        tok = x.reshape(-1, x.shape[-1])[::stride].astype(jnp.float32) if "tokens" in needs \
            else None
        return s2, rs2, st, tok

    first = jax.tree.map(lambda a: a[0], xs)
    acc0 = _empty_stats(jax.eval_shape(lambda a: one(*a)[2], first))

    def body(acc, c):
        s2, rs2, st, tok = one(*c)
        return S.merge(acc, st), (s2, rs2, tok)

    acc, (s2, rs2, tok) = jax.lax.scan(body, acc0, xs)
    if tok is not None:
        acc["tokens"] = tok.reshape(-1, tok.shape[-1])
    return _unchunk(s2), (_unchunk(rs2) if with_ref else None), acc


@functools.partial(jax.jit, static_argnames=("fn", "bs", "stream"))
def finish_pass(params, state, batch, *, fn, bs, stream):
    """The block output ``fn(params, state)[stream]`` over every sample."""
    out = jax.lax.map(lambda c: fn(params, c[0], c[1])[stream],
                      (_chunk(state, bs), _chunk(batch, bs)))
    return _unchunk(out)


@functools.partial(jax.jit, static_argnames=("fns", "bs", "stream"))
def block_pass(params, state, batch, *, fns, bs, stream):
    """The whole block (its stage functions, then ``finish``) over every sample."""
    def one(c):
        s, bt = c
        for fn in fns:
            s = fn(params, s, bt)
        return s[stream]
    return _unchunk(jax.lax.map(one, (_chunk(state, bs), _chunk(batch, bs))))


def _teacher_params(spec: BlockSpec, q_bp: dict, fp_bp: dict, dac_norms: set) -> dict:
    """The quantized block up to its last DAC norm (its attention and DAC bias), fp after it."""
    last = max(i for i, st in enumerate(spec.stages)
               if st.producer is not None and st.producer.paths[0] in dac_norms)
    out = q_bp
    for st in spec.stages[last:]:
        for lin in st.linears:
            out = set_path(out, lin, get_path(fp_bp, lin))
    return out


# ---------------------------------------------------------------------------- checks
def check_recipe_against_spec(recipe: Recipe, spec: BlockSpec, num_blocks: int) -> tuple:
    """Refuse rules that name no linear of the family and algorithms placed where they cannot
    work; returns ``(unmatched linears, rules shadowed by earlier ones)``."""
    paths = [f"layers/{b}/{lin}" for b in range(num_blocks) for lin in spec.linears]
    for r in recipe.rules:
        if not any(r.matches(p) for p in paths):
            raise ValueError(
                f"{recipe.source}: rule {r.pattern!r} matches no linear of this model; its block "
                f"has {list(spec.linears)} (paths like 'layers/0/{spec.linears[0]}')")
    for p in paths:
        r = recipe.match(p)
        if r is None or r.algorithm == KEEP_FP:
            continue
        algo = registry.get(r.algorithm)
        if algo.producer_fold:
            st = spec.stage_of(p.split("/", 2)[2])
            prod = st.producer
            if prod is None or prod.kind != "linear" or prod.role != algo.fold_target:
                raise ValueError(
                    f"{p}: the {algo.name} algorithm folds a per-channel scale into the linear "
                    f"that produces its input, which must have the role {algo.fold_target!r} in "
                    f"the block spec; stage {st.name!r}'s producer is {prod} (recipe rule "
                    f"{r.pattern!r})")
    if recipe.dac:
        for norm in recipe.dac["norms"]:
            st = spec.stage_with_producer(norm)
            if st is None or st.producer.kind != "norm":
                norms = [s.producer.paths[0] for s in spec.stages
                         if s.producer is not None and s.producer.kind == "norm"]
                raise ValueError(f"{recipe.source}: dac.norms names {norm!r}, which is not a "
                                 f"norm of this block (its norms: {norms})")
            if st is spec.stages[0] and recipe.dac["reference"] == "same_input":
                raise ValueError(
                    f"{recipe.source}: dac at {norm!r} (it feeds the block's first stage) needs "
                    "reference fp_prefix: with the same input, the fp and quantized paths agree "
                    "there, so its mean shift is zero")
    unmatched, unused = recipe.report(paths)
    return unmatched, unused


def check_batch(batch: dict, spec: BlockSpec) -> None:
    missing = [f for f in spec.batch_fields if f not in batch]
    if missing:
        raise ValueError(f"calibration batch lacks field(s) {missing} that this model's block "
                         f"needs (fields given: {sorted(batch)})")
    n = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(n.values())) > 1:
        raise ValueError(f"calibration batch fields disagree on the number of samples: {n}")


def fingerprint_data(batch: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        a = np.ascontiguousarray(np.asarray(batch[k]))
        h.update(k.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- one stage
def _rule_of(recipe, b, lin):
    r = recipe.match(f"layers/{b}/{lin}")
    return None if r is None or r.algorithm == KEEP_FP else r


def _stage_needs(recipe, b, stage: Stage, ref: bool) -> tuple[frozenset, int]:
    needs: set[str] = {"H"}  # the per-linear error report reads H
    budget = 0
    for lin in stage.linears:
        r = _rule_of(recipe, b, lin)
        if r is None:
            continue
        algo = registry.get(r.algorithm)
        needs |= set(algo.needs)
        if f"layers/{b}/{lin}" in getattr(recipe, "group_weights", {}):
            needs.add("H_groups")
        if algo.token_budget is not None:
            budget = max(budget, algo.token_budget(r.opts))
    if not ref:
        needs.discard("cross")
    return frozenset(needs), budget


def _apply_input_scale(recipe, b, stage: Stage, bp, state, st):
    """Search and fold an input scale (AWQ) for a stage whose linears all ask for one."""
    rules = [_rule_of(recipe, b, lin) for lin in stage.linears]
    algos = [registry.get(r.algorithm) if r else None for r in rules]
    if not any(a is not None and a.input_scale is not None for a in algos):
        return bp, state, st
    if stage.producer is None or any(a is None or a.input_scale is None for a in algos):
        log.info("block %d stage %s: no exact fold for an input scale; searching none", b,
                 stage.name)
        return bp, state, st
    r0 = rules[0]
    Ws = [get_path(bp, f"{lin}/kernel") for lin in stage.linears]
    s = algos[0].input_scale(st["tokens"], Ws, r0.spec, **r0.opts)
    for lin in stage.linears:
        bp = set_path(bp, f"{lin}/kernel", get_path(bp, f"{lin}/kernel") * s[:, None])
    bp = fold_into_producer(bp, stage.producer, 1.0 / s)
    x = state[stage.input]
    state = dict(state, **{stage.input: x / _last(s, x)})
    return bp, state, S.rescale(st, s)


def _apply_smoothing(recipe, b, stage: Stage, bp, state, st):
    """SmoothQuant (recipe section ``smooth``) for a stage whose linears all quantize their
    activations: ``s_j = max|X_j|^α / max|W_j|^(1−α)``; the weights' rows times ``s``, the input
    divided by ``s`` -- folded into the stage's producer when it has one, else kept as the
    linears' ``act_scale`` (divided at run time before the activation quantizer)."""
    sm = recipe.smooth
    if sm is None:
        return bp, state, st
    rules = [_rule_of(recipe, b, lin) for lin in stage.linears]
    if any(r is None or r.act is None for r in rules):
        return bp, state, st
    from jaxquant.algorithms.smoothquant import smoothquant_scales

    Ws = [get_path(bp, f"{lin}/kernel") for lin in stage.linears]
    absmax = jnp.maximum(jnp.abs(st["max"]), jnp.abs(st["min"]))
    s = smoothquant_scales(absmax, Ws, alpha=float(sm["alpha"]))
    for lin in stage.linears:
        bp = set_path(bp, f"{lin}/kernel", get_path(bp, f"{lin}/kernel") * s[:, None])
    if stage.producer is not None:
        bp = fold_into_producer(bp, stage.producer, 1.0 / s)
        x = state[stage.input]
        state = dict(state, **{stage.input: x / _last(s, x)})
    else:  # the stage input keeps its fp value; each linear divides it by s itself
        for lin in stage.linears:
            bp = set_path(bp, f"{lin}/act_scale", s)
    return bp, state, S.rescale(st, s)


def _rotate_input(W, st, k: int):
    """An online rotation ``x Q`` before a linear (its ActQuant ``rotate``): the weight becomes
    ``Qᵀ W`` and the input statistics those of ``x Q``."""
    from jaxquant.nn.linear import online_rotation

    Q = jnp.asarray(online_rotation(W.shape[0], k), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    st = dict(st)
    if "H" in st:
        st["H"] = jnp.matmul(Q.T, jnp.matmul(st["H"], Q, precision=hi), precision=hi)
    if "H_groups" in st:
        st["H_groups"] = jnp.einsum("ki,gkl,lj->gij", Q, st["H_groups"], Q, precision=hi)
    for key in ("sum", "sum_ref"):
        if key in st:
            st[key] = jnp.matmul(st[key], Q, precision=hi)
    if "tokens" in st:
        st["tokens"] = jnp.matmul(st["tokens"], Q, precision=hi)
    st.pop("max", None), st.pop("min", None)
    return jnp.matmul(Q.T, W.astype(jnp.float32), precision=hi), st


def _apply_obs(recipe, b, stage: Stage, bp, st):
    """CLQ's orthogonal-based smoothing for a stage whose rules carry a ``transform``: the
    outlier-aware permutation ``P`` from the stage input's statistics, ``G = P · H_block``;
    every linear's weight becomes ``Gᵀ W`` and its params get the input transform slot
    (``transform``, ``in_perm``) that applies ``x G`` online; the statistics become those of
    ``x G``. Returns ``(bp, st)``."""
    from jaxquant.core import orthogonal as O
    from jaxquant.nn.linear import InputTransform

    rules = [_rule_of(recipe, b, lin) for lin in stage.linears]
    obs = [None if r is None else r.obs for r in rules]
    if all(o is None for o in obs):
        return bp, st
    if any(o != obs[0] for o in obs):
        raise ValueError(f"block {b} stage {stage.name!r}: the linears {list(stage.linears)} "
                         "read one input and need one input transform, but their rules give "
                         f"{obs}")
    o = obs[0]
    K = get_path(bp, f"{stage.linears[0]}/kernel").shape[0]
    where = f"layers/{b}/{stage.linears[0]} (input width)"
    width = O.padded_width(K, o["block"], pad=o["pad"], what=where)
    for lin, r in zip(stage.linears, rules, strict=True):
        gs = r.spec.group_size
        if gs != -1 and width % gs:
            raise ValueError(f"layers/{b}/{lin}: the transformed input width {width} is not a "
                             f"multiple of the weight's group_size {gs}")
    perm = None
    if o["permute"]:
        absmax = jnp.maximum(jnp.abs(st["max"]), jnp.abs(st["min"]))
        sq = jnp.diagonal(st["H"]) / jnp.maximum(st["count"], 1.0)
        scores = np.asarray(O.outlier_scores(absmax, sq, statistic=o["statistic"]))
        scores = np.concatenate([scores, np.full(width - K, -np.inf)])  # pads go last
        perm = jnp.asarray(O.outlier_permutation(scores, o["block"], deal=o["deal"]))
    t = InputTransform(int(o["block"]), int(width), int(o["seed"]))
    blocks = jnp.asarray(t.blocks())
    for lin in stage.linears:
        W = get_path(bp, f"{lin}/kernel")
        bp = set_path(bp, f"{lin}/kernel", O.fold_weight(W, blocks, perm))
        bp = set_path(bp, f"{lin}/transform", t)
        if perm is not None:
            bp = set_path(bp, f"{lin}/in_perm", perm)
    st = dict(st)
    for key in ("H", "cross"):
        if key in st:
            st[key] = O.fold_gram(st[key], blocks, perm)
    if "H_groups" in st:
        st["H_groups"] = jax.vmap(lambda h: O.fold_gram(h, blocks, perm))(st["H_groups"])
    for key in ("sum", "sum_ref", "tokens"):
        if key in st:
            st[key] = O.apply_transform(st[key], blocks, perm)
    st.pop("max", None), st.pop("min", None)
    return bp, st


@functools.lru_cache(maxsize=64)
def _downstream_fn(spec: BlockSpec, si: int):
    """``run(params, (state, batch))``: the block after stage ``si``'s linears, returning every
    later stage's input and the block output (CLPS's downstream points)."""
    def run(params, inputs):
        s, batch = inputs
        pts = []
        for st in spec.stages[si + 1:]:
            s = st.fn(params, s, batch)
            pts.append(s[st.input])
        pts.append(spec.finish(params, s, batch)[spec.stream])
        return pts
    return run


def _clps_stage(recipe, b, spec: BlockSpec, si: int, bp, state, batch):
    """CLQ's cross-layer parameter search for stage ``si`` (recipe section ``clps``): returns
    ``({linear: rule with the chosen clip ratios}, report or None)``."""
    from jaxquant.algorithms.clq import clps_search

    c = recipe.clps
    stage = spec.stages[si]
    if c is None:
        return {}, None
    rules = [_rule_of(recipe, b, lin) for lin in stage.linears]
    if any(r is None or r.act is None for r in rules):
        return {}, None
    r0 = rules[0]
    if any(r.spec != r0.spec or r.act != r0.act for r in rules):
        log.info("block %d stage %s: linears with different quantizers; no CLPS", b, stage.name)
        return {}, None
    t0 = time.perf_counter()
    n = state[spec.stream].shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, int(c["n_samples"]))).astype(np.int64))
    inputs = jax.tree.map(lambda a: a[idx], (state, batch))
    res = clps_search(_downstream_fn(spec, si), dense_params(bp), inputs, stage.linears,
                      r0.spec, r0.act.bits, c["grid_w"], c["grid_a"],
                      downstream=c["downstream"], cost=c["cost"])
    acts = tuple(sorted({**dict(r0.activations), "clip_ratio": res.act_clip}.items()))
    new = dataclasses.replace(r0, spec=dataclasses.replace(r0.spec, clip_ratio=res.weight_clip),
                              activations=acts)
    best = float(np.min(res.errors[:, res.target]))
    rep = LayerReport(f"layers/{b}/{stage.name}", "clps", None, best,
                      time.perf_counter() - t0,
                      {"weight_clip": res.weight_clip, "act_clip": res.act_clip,
                       "target": res.target, "base_error": float(res.base[res.target]),
                       "points": [s.input for s in spec.stages[si + 1:]] + [spec.stream]})
    return {lin: new for lin in stage.linears}, rep


def _quantize_stage(recipe, b, stage: Stage, bp, state, st, overrides=None, cols=(None, None)):
    """Quantize the stage's linears (``overrides``: rules replacing the recipe's, e.g. with
    searched clip ratios; ``cols``: ``(mesh, axis)`` splitting every weight's output columns
    over devices while its algorithm runs); returns ``(bp, state, reports)``."""
    reports = []
    done: dict[str, tuple[Any, dict, float]] = {}
    rules = {lin: (overrides or {}).get(lin) or _rule_of(recipe, b, lin) for lin in stage.linears}
    # linears sharing the input and the rule of a batchable algorithm: one matrix
    firsts = [r for r in rules.values() if r is not None]
    r0 = firsts[0] if firsts else None
    gw = getattr(recipe, "group_weights", {})
    if (r0 is not None and len(stage.linears) > 1 and all(r is r0 for r in rules.values())
            and not any(f"layers/{b}/{lin}" in gw for lin in stage.linears)
            and registry.get(r0.algorithm).batchable and not r0.spec.per_tensor
            and (r0.act is None or not r0.act.rotate)):
        t0 = time.perf_counter()
        Ws = [get_path(bp, f"{lin}/kernel") for lin in stage.linears]
        qa, extras = registry.get(r0.algorithm).quantize(
            D.shard_columns(jnp.concatenate(Ws, axis=-1), *cols), st, r0.spec, **r0.opts)
        parts = split_columns(qa, [w.shape[-1] for w in Ws])
        secs = (time.perf_counter() - t0) / len(Ws)
        diag = {"diagnostics": extras["diagnostics"]} if "diagnostics" in extras else {}
        done = {lin: (q, diag, secs) for lin, q in zip(stage.linears, parts, strict=True)}
    for lin in stage.linears:
        r = rules[lin]
        if r is None:
            continue
        path = f"layers/{b}/{lin}"
        algo = registry.get(r.algorithm)
        W = get_path(bp, f"{lin}/kernel")
        t0 = time.perf_counter()
        st_l = st
        if path in gw:  # AdaTSQ: H' = Σ_t α_t X_tᵀ X_t
            from jaxquant.algorithms.adatsq import weighted_hessian

            st_l = dict(st, H=weighted_hessian(st["H_groups"], jnp.asarray(gw[path])))
        if r.act is not None and r.act.rotate and lin not in done:
            W, st_l = _rotate_input(W, st_l, r.act.rotate)
        if lin in done:
            qa, extras, secs = done[lin]
        else:
            qa, extras = algo.quantize(D.shard_columns(W, *cols), st_l, r.spec, **r.opts)
        W_hat = dequantize(qa, dtype=jnp.float32)
        c = extras.get("producer_scale")
        if c is not None:
            W_hat = c[:, None].astype(jnp.float32) * W_hat
        if not bool(jnp.all(jnp.isfinite(W_hat))):
            raise FloatingPointError(f"{path}: quantized weights are not finite; not writing them")
        err = rel_error(W, W_hat, st_l.get("H"))
        bp = set_path(bp, f"{lin}/kernel", qa)
        if r.act is not None:  # the activation quantizer rides with the linear's params
            bp = set_path(bp, f"{lin}/act", r.act)
        if c is not None:  # s^c -> the producer's output channels; the stage input x ⊙ c
            bp = fold_into_producer(bp, stage.producer, c)
            x = state[stage.input]
            state = dict(state, **{stage.input: x * _last(c, x)})
        secs = time.perf_counter() - t0 if lin not in done else done[lin][2]
        reports.append(LayerReport(path, r.algorithm, r.spec.bits, err, secs,
                                   _hessian_check(path, extras.get("diagnostics"))))
    return bp, state, reports


def _hessian_check(path: str, diag: dict | None) -> dict | None:
    """GPTQ-family diagnostics of one linear: its Hessian's positive-definiteness check (the
    Cholesky factor of ``H + λI``), the dampening ``λ`` used, and a logged warning when the
    first ``λ`` failed and was raised. None for algorithms without a Hessian inverse."""
    if not diag or "damp" not in diag:
        return None
    lam, lam0 = float(diag["damp"]), float(diag.get("damp0", diag["damp"]))
    pd = bool(diag.get("pd", True))
    retries = round(np.log10(lam / lam0)) if lam0 > 0 and lam > lam0 else 0
    if not pd:
        raise FloatingPointError(f"{path}: H + λI is not positive definite even at λ = {lam:.3g} "
                                 "(the dampening retries are exhausted); nothing was written")
    if retries:
        log.warning("%s: H + λI was not positive definite at λ = %.3g; dampening raised %d "
                    "time(s) to λ = %.3g", path, lam0, retries, lam)
    return {"hessian_pd": pd, "damp": lam, "damp_retries": retries,
            "dead_inputs": int(diag.get("dead_inputs", 0))}


class _WithGroupWeights:
    """A recipe seen by the engine with per-linear sample-group weights attached."""

    def __init__(self, recipe, group_weights):
        self._recipe, self.group_weights = recipe, dict(group_weights)

    def __getattr__(self, name):
        return getattr(self._recipe, name)


# ---------------------------------------------------------------------------- the loop
def _progress_paths(out_dir: str) -> tuple[str, str]:
    d = os.path.join(out_dir, PROGRESS_DIR)
    return d, os.path.join(d, STATE_FILE)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _save_array(prog_dir, name, arr):
    tmp = os.path.join(prog_dir, f"{name}.tmp.npy")
    np.save(tmp, np.asarray(arr))
    os.replace(tmp, os.path.join(prog_dir, f"{name}.npy"))


def _save_acts(prog_dir, name, X):
    """The carried activations: one ``.npy`` on one process; on several, an orbax tree whose
    every shard is written once, by the process that holds it."""
    if D.is_multi():
        save_tree(os.path.join(prog_dir, name), {"x": X})
    else:
        _save_array(prog_dir, name, X)


def _load_acts(prog_dir, name, sharding, *, mmap: bool = False):
    """Saved activations: a device array, or with ``mmap`` a read-only memory map of the file
    (one process); on several processes each reads only its shards."""
    if sharding is None:
        a = np.load(os.path.join(prog_dir, f"{name}.npy"), mmap_mode="r" if mmap else None,
                    allow_pickle=False)
        return a if mmap else jnp.asarray(a)
    return load_tree(os.path.join(prog_dir, name), sharding=sharding)["x"]


def _ready(tree):
    return jax.block_until_ready(tree)


def calibrate(
    model: ModelAdapter,
    recipe: Recipe,
    calib: Any = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    model_axis: str | None = None,
    progress: bool = True,
    on_block_end: Callable[[int, dict], None] | None = None,
    group_weights: dict | None = None,
    offload: bool = False,
    act_budget: int | None = None,
    disk_budget: int | None = None,
) -> CalibrationResult:
    """Quantize ``model`` (a family adapter over a checkpoint or params in memory) with
    ``recipe`` on the calibration data ``calib`` (whatever the family's ``make_batch`` takes:
    token ids ``[n, T]`` or a dict of per-sample fields; None for a data-free recipe).

    Args:
      out_dir: where progress is checkpointed after every block (None: no checkpoints).
      resume: continue from ``out_dir``'s progress (refused if model, recipe or data differ).
      mesh: shard the samples over ``mesh``'s ``data_axis`` (statistics are all-reduced). In
        a multi-process job (``jax.distributed``) the mesh spans every process's devices;
        every process passes the same model, recipe and ``calib`` (refused otherwise) and
        holds only its share of the activations; ``out_dir`` must be a directory they all see.
      model_axis: a ``mesh`` axis over which each linear's output columns are split while its
        algorithm runs (GPTQ, RTN: columns are independent).
      on_block_end: ``callback(block_index, info)`` after every block (tests, logging).
      group_weights: ``{linear path: α [G]}``: that linear's algorithm reads the weighted
        Hessian ``Σ_g α_g H_g`` over the batch's sample groups (``group``, e.g. timesteps:
        AdaTSQ's Fisher-weighted temporal Hessian) instead of ``H``.
      offload: keep no quantized block in memory: each is written to ``out_dir`` as it
        finishes (its checkpoint) and the result's ``params`` is None (``block_dirs`` and
        ``top_parts`` say where the model is; :func:`jaxquant.api.quantize_model` writes it).
        Peak memory is then one fp block, its statistics, the activations and a fixed
        overhead, whatever the depth.
      act_budget: bytes; carried activations larger than this live between blocks in a
        memory-mapped file in ``out_dir`` (they are the checkpoint too) instead of in memory.
      disk_budget: bytes ``out_dir`` may use (default: its filesystem's free space); a run
        whose checkpoints need more is refused before it starts.
    """
    t_start = time.perf_counter()
    if offload and out_dir is None:
        raise ValueError("offload=True needs out_dir: the quantized blocks are written there as "
                         "they finish")
    if recipe.rotation is not None:  # folded into the fp weights as each block is read
        model = RotatedAdapter(model, RotationSpec(**recipe.rotation))
    spec = model.spec
    model.check()
    unmatched, unused = check_recipe_against_spec(recipe, spec, model.num_blocks)
    if unmatched:
        log.warning("%d linears match no rule and stay fp: %s%s", len(unmatched),
                    unmatched[:4], " ..." if len(unmatched) > 4 else "")
    if unused:
        log.warning("recipe rules shadowed by earlier rules (they match nothing): %s", unused)
    data = recipe.needs_data
    batch = None
    if data:
        if calib is None:
            raise ValueError(f"recipe {recipe.name!r} needs calibration data (its algorithms "
                             "read activation statistics); calib=None given")
        c = recipe.calib
        batch = model.make_batch(calib, n_samples=int(c["n_samples"]), seqlen=int(c["seqlen"]))
        check_batch(batch, spec)
    ref_kind = recipe.reference
    fps = {"model": model.fingerprint(), "recipe": recipe.fingerprint() + (
               "+" + fingerprint_data({k: np.asarray(v, np.float32)
                                       for k, v in group_weights.items()})
               if group_weights else ""),
           "data": fingerprint_data(batch) if batch is not None else "none"}
    D.check_mesh(mesh)
    D.agree(fps)  # every process of a multi-process job runs the same job
    multi = D.is_multi()
    rep_sh = D.replicated(mesh) if multi else None

    blocks: list = []
    reports: list[LayerReport] = []
    block_reports: list[BlockReport] = []
    start = 0
    X = X_ref = X_t = None
    final_dac = bool(recipe.dac and recipe.dac["final"])
    if final_dac:
        for attr in ("final_norm", "add_final_norm_bias"):
            if not hasattr(model, attr):
                raise ValueError(f"dac.final: the {type(model).__name__} model adapter has no "
                                 f"{attr!r} (the model's last norm)")
    prog_dir = state_path = None
    if out_dir is not None:
        out_dir = os.path.abspath(os.fspath(out_dir))
        prog_dir, state_path = _progress_paths(out_dir)
        D.check_shared_dir(prog_dir)
        if os.path.isfile(state_path):
            with open(state_path) as f:
                saved = json.load(f)
            for key, label in (("model", "model"), ("recipe", "recipe"),
                               ("data", "calibration data")):
                if saved["fingerprints"].get(key) != fps[key]:
                    raise ResumeMismatchError(
                        f"{out_dir}: the saved progress was made with a different {label} "
                        f"(fingerprint {saved['fingerprints'].get(key)} != {fps[key]}); refusing "
                        "to resume. Use another --out directory or delete this one.")
            if saved.get("processes", 1) != jax.process_count():
                raise ResumeMismatchError(
                    f"{out_dir}: the saved progress was made by {saved.get('processes', 1)} "
                    f"process(es), this run has {jax.process_count()}; refusing to resume "
                    "(the saved activations are sharded for that job)")
            if not resume:
                raise FileExistsError(
                    f"{out_dir} holds the progress of an earlier run of this job; pass "
                    "resume=True (--resume) to continue it, or choose another directory")
            start = int(saved["next_block"])
            blocks = [None if offload else load_tree(os.path.join(prog_dir, f"block_{b:04d}"))
                      for b in range(start)]
            act_sh = _act_sharding(mesh, data_axis) if multi else None
            if data:  # memory maps until the activations' size is compared with act_budget
                X = _load_acts(prog_dir, "acts", act_sh, mmap=not multi)
            if ref_kind == "fp_prefix":
                X_ref = _load_acts(prog_dir, "acts_ref", act_sh, mmap=not multi)
            if final_dac:
                X_t = _load_acts(prog_dir, "acts_teacher", act_sh, mmap=not multi)
            reports = [LayerReport(**r) for r in saved["report"]]
            block_reports = [BlockReport(**r) for r in saved.get("blocks", [])]
            log.info("resuming at block %d of %d", start, model.num_blocks)
        elif os.path.isfile(os.path.join(out_dir, "jaxquant.json")):
            raise FileExistsError(f"{out_dir} already holds a finished quantized model; "
                                  "refusing to overwrite it")
        os.makedirs(prog_dir, exist_ok=True)

    jbatch = None
    bs = 1
    if data:
        jbatch = {k: jnp.asarray(v) for k, v in batch.items() if k != "tokens"}
        n = next(iter(batch.values())).shape[0]
        bs = int(recipe.calib["batch_size"])
        while n % bs:  # chunks must tile the samples
            bs -= 1
        if mesh is not None:
            sh = _act_sharding(mesh, data_axis)
            jbatch = {k: D.put(v, sh) for k, v in batch.items() if k != "tokens"}
        if X is None:  # the embedding table is read for this, not held through the loop
            X = model.first_input(batch)
            if mesh is not None:
                X = D.put(X, _act_sharding(mesh, data_axis))
        if ref_kind == "fp_prefix" and X_ref is None:
            X_ref = jnp.array(X, copy=True)
        if final_dac and X_t is None:
            X_t = jnp.array(X, copy=True)
    n_groups = int(np.max(batch["group"])) + 1 if data and "group" in batch else 0
    if group_weights:
        if not n_groups:
            raise ValueError("group_weights need a calibration batch with a 'group' field (the "
                             "timestep group of every sample)")
        for path, a in group_weights.items():
            if np.shape(a) != (n_groups,):
                raise ValueError(f"group_weights[{path!r}]: {np.shape(a)} weights for "
                                 f"{n_groups} sample groups")
    recipe = _WithGroupWeights(recipe, group_weights) if group_weights else recipe
    n_streams = int(X is not None) + int(ref_kind == "fp_prefix") + int(final_dac)
    act_bytes = n_streams * (int(np.prod(X.shape)) * X.dtype.itemsize if X is not None else 0)
    spill = act_budget is not None and act_bytes > act_budget and prog_dir is not None
    if spill and multi:
        raise ValueError("act_budget: activations spilled to a memory-mapped file are for one "
                         "process; a multi-process job shards them over the hosts instead")
    if not spill:  # resumed from files: back in memory (on the mesh when there is one)
        X, X_ref, X_t = (a if a is None or isinstance(a, jax.Array)
                         else D.put(np.asarray(a), _act_sharding(mesh, data_axis))
                         for a in (X, X_ref, X_t))
    first_bp = None  # the first block to calibrate, read once: its shapes size the disk check
    if prog_dir is not None and start < model.num_blocks:
        first_bp = model.read_block(start)
        _check_disk(prog_dir, model, first_bp, recipe, act_bytes, start, disk_budget)

    bar = tqdm(range(start, model.num_blocks), desc="calibrate", unit="block",
               disable=not progress or not D.is_writer(), initial=start, total=model.num_blocks)
    for b in bar:
        br = BlockReport(b)
        t0 = time.perf_counter()
        bp = D.put_tree(first_bp if b == start and first_bp is not None else model.read_block(b),
                        rep_sh)
        first_bp = None
        if spill:  # the carried activations come back from their file for this block
            X, X_ref, X_t = (None if a is None else D.put(a, _act_sharding(mesh, data_axis))
                             for a in (X, X_ref, X_t))
        br.read = time.perf_counter() - t0
        rep: list[LayerReport] = []
        if not data:
            t0 = time.perf_counter()
            bp, _, rep = _quantize_data_free(recipe, b, spec, bp)
            br.algorithm = time.perf_counter() - t0
        else:
            fp_bp = bp
            X_in = X if on_block_end is not None else None
            bp, X, X_ref, rep = _calibrate_block(recipe, b, spec, bp, X, X_ref, jbatch, bs,
                                                 n_groups, ref_kind, br,
                                                 cols=(mesh, model_axis))
            if final_dac:  # the final DAC's teacher: quantized attention + DAC, fp MLP
                t0 = time.perf_counter()
                X_t = _ready(block_pass(
                    dense_params(_teacher_params(spec, bp, fp_bp, set(recipe.dac["norms"]))),
                    {spec.stream: X_t}, jbatch, fns=(*(st.fn for st in spec.stages),
                                                     spec.finish), bs=bs, stream=spec.stream))
                br.passes += 1
                br.propagation += time.perf_counter() - t0
            del fp_bp
        bp = D.to_host(bp, mesh)  # multi-process: every process holds the whole block
        blocks.append(None if offload else bp)
        reports.extend(rep)
        t0 = time.perf_counter()
        if prog_dir is not None:
            save_tree(os.path.join(prog_dir, f"block_{b:04d}"), bp)
            if X is not None:
                _save_acts(prog_dir, "acts", X)
            if ref_kind == "fp_prefix":
                _save_acts(prog_dir, "acts_ref", X_ref)
            if final_dac:
                _save_acts(prog_dir, "acts_teacher", X_t)
        if spill:  # between blocks the activations live only in their (checkpoint) files
            X, X_ref, X_t = (None if a is None else _load_acts(prog_dir, name, None, mmap=True)
                             for a, name in ((X, "acts"), (X_ref, "acts_ref"),
                                             (X_t, "acts_teacher")))
        br.checkpoint = time.perf_counter() - t0
        block_reports.append(br)
        if prog_dir is not None:
            D.barrier(f"jaxquant-block-{b}")  # every shard is on disk before the state says so
            if D.is_writer():
                _write_json_atomic(state_path, {
                    "next_block": b + 1, "fingerprints": fps, "processes": jax.process_count(),
                    "report": [dataclasses.asdict(r) for r in reports],
                    "blocks": [dataclasses.asdict(r) for r in block_reports]})
            D.barrier(f"jaxquant-state-{b}")
        if on_block_end is not None:
            on_block_end(b, {"reports": rep, "block": br,
                             "input": X_in if data else None})
        errs = [r.rel_error for r in rep]
        bar.set_postfix(rel_err=f"{np.mean(errs):.4f}" if errs else "-")
        del bp

    final_mu = None
    if final_dac:  # the mean shift at the model's last norm, as at every post-attention norm
        mu = (jnp.mean(model.final_norm(X_t).reshape(-1, X.shape[-1]), axis=0)
              - jnp.mean(model.final_norm(X).reshape(-1, X.shape[-1]), axis=0))
        if recipe.dac["clip"] is not None:
            mu = jnp.clip(mu, -recipe.dac["clip"], recipe.dac["clip"])
        if not bool(jnp.all(jnp.isfinite(mu))):
            raise FloatingPointError("the final DAC mean shift is not finite")
        final_mu = mu
        reports.append(LayerReport("final_norm", "dac", None,
                                   float(jnp.sqrt(jnp.mean(mu * mu))), 0.0))
    del X, X_ref, X_t
    if offload:
        parts, key = _top_parts(model, final_mu)
        return CalibrationResult(
            getattr(model, "config", None), None, reports, time.perf_counter() - t_start,
            unmatched, unused, start, block_reports,
            [os.path.join(prog_dir, f"block_{b:04d}") for b in range(model.num_blocks)],
            parts, key)
    params = model.assemble(blocks)
    del blocks
    if final_mu is not None:
        params = model.add_final_norm_bias(params, final_mu)
    return CalibrationResult(getattr(model, "config", None), params, reports,
                             time.perf_counter() - t_start, unmatched, unused, start,
                             block_reports)


def _top_parts(model, final_mu) -> tuple[list, str]:
    """The params outside the blocks as ``[(key, load)]`` (one table in memory at a time when
    the family can read them so), with the final DAC bias added to the last norm."""
    if hasattr(model, "top_parts"):
        parts, key = model.top_parts()
    else:  # params in memory, or a rotated model (its tables are rotated together)
        full = model.assemble([])
        keys = [k for k, v in full.items() if isinstance(v, list) and not v]
        if len(keys) != 1:
            raise ValueError(f"offload: cannot tell the {type(model).__name__} model's blocks "
                             "apart from its other params")
        key = keys[0]
        parts = [(k, (lambda v=v: v)) for k, v in full.items() if k != key]
    if final_mu is None:
        return parts, key
    return [(k, _biased(model, k, load, final_mu)) for k, load in parts], key


def _biased(model, k, load, mu):
    """``load`` of top-level entry ``k``, with the final-norm bias added if ``k`` is that norm."""
    def run():
        v = load()
        try:
            return model.add_final_norm_bias({k: v}, mu)[k]
        except KeyError:  # not the final norm
            return v
    return run


def _act_sharding(mesh, data_axis):
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(data_axis))


def _check_disk(prog_dir, model, bp, recipe, act_bytes, start, disk_budget) -> None:
    """Refuse, before calibrating, a run whose checkpoints (the carried activations, twice
    while one is replaced, and the quantized blocks) need more than ``disk_budget`` bytes or
    the free space of ``prog_dir``'s filesystem."""
    free = shutil.disk_usage(prog_dir).free
    budget = free if disk_budget is None else min(int(disk_budget), free)
    # a quantized block: at most its fp32 size (fp linears and norms stay fp32; quantized ones
    # take bits/32 of it plus scales) -- bounded from the first block's shapes (``bp``)
    sizes = [int(np.prod(np.shape(a))) for a in jax.tree.leaves(bp)]
    bits = [r.spec.bits for r in recipe.rules if r.spec is not None] or [32]
    per_block = sum(sizes) * 4 * min(1.0, max(bits) / 32 + 0.1)
    need = int(2 * act_bytes + per_block * (model.num_blocks - start))
    if need > budget:
        raise ValueError(
            f"{prog_dir}: this run's checkpoints need about {need} bytes ({need / 2**30:.2f} GiB: "
            f"activations {act_bytes} bytes, kept twice while replaced, and "
            f"{model.num_blocks - start} quantized blocks of about {int(per_block)} bytes), but "
            f"the disk budget is {budget} bytes ({budget / 2**30:.2f} GiB"
            f"{'' if disk_budget is None else ', disk_budget'}); free space or choose another "
            "directory")


def _quantize_data_free(recipe, b, spec: BlockSpec, bp):
    reports = []
    for lin in spec.linears:
        r = _rule_of(recipe, b, lin)
        if r is None:
            continue
        t0 = time.perf_counter()
        W = get_path(bp, f"{lin}/kernel")
        if r.act is not None and r.act.rotate:
            W, _ = _rotate_input(W, {}, r.act.rotate)
        if r.obs is not None:  # no data: the block Hadamard without the permutation
            from jaxquant.core import orthogonal as O
            from jaxquant.nn.linear import InputTransform

            o = r.obs
            t = InputTransform(int(o["block"]), O.padded_width(
                W.shape[0], o["block"], pad=o["pad"], what=f"layers/{b}/{lin}"), int(o["seed"]))
            W = O.fold_weight(W, jnp.asarray(t.blocks()))
            bp = set_path(bp, f"{lin}/transform", t)
        qa, _ = registry.get(r.algorithm).quantize(W, {}, r.spec, **r.opts)
        W_hat = dequantize(qa, dtype=jnp.float32)
        if not bool(jnp.all(jnp.isfinite(W_hat))):
            raise FloatingPointError(f"layers/{b}/{lin}: quantized weights are not finite")
        bp = set_path(bp, f"{lin}/kernel", qa)
        if r.act is not None:
            bp = set_path(bp, f"{lin}/act", r.act)
        reports.append(LayerReport(f"layers/{b}/{lin}", r.algorithm, r.spec.bits,
                                   rel_error(W, W_hat), time.perf_counter() - t0))
    return bp, None, reports


def _calibrate_block(recipe, b, spec: BlockSpec, bp, X, X_ref, batch, bs, n_groups, ref_kind,
                     br: BlockReport, cols=(None, None)):
    fp = bp
    state = {spec.stream: X}
    ref_state = None
    if ref_kind is not None:
        ref_state = {spec.stream: X_ref if ref_kind == "fp_prefix" else X}
    reports: list[LayerReport] = []
    # CBC (the default): statistics of the quantized prefix's stream; "fp": of the fp model's
    inputs_fp = recipe.calib["inputs"] == "fp"
    dac_norms = set(recipe.dac["norms"]) if recipe.dac else set()
    # DAC's teacher when it is not the carried reference: the fp block on this block's input
    teach = {spec.stream: X} if recipe.dac_teacher else None
    last_dac = max((i for i, st in enumerate(spec.stages) if st.producer is not None
                    and st.producer.paths[0] in dac_norms), default=-1)
    for si, stage in enumerate(spec.stages):
        t0 = time.perf_counter()
        needs, budget = _stage_needs(recipe, b, stage, ref_state is not None)
        n_tok = int(np.prod(state[spec.stream].shape[:-1]))
        stride = max(1, n_tok // max(budget, 1)) if "tokens" in needs else 1
        state, ref_state, st = _ready(stage_pass(
            fp if inputs_fp else dense_params(bp), state, batch,
            fp if ref_state is not None else None, ref_state,
            fn=stage.fn, input_key=stage.input, bs=bs, needs=needs, n_groups=n_groups,
            stride=stride))
        br.passes = (2 if ref_state is not None else 1) + (teach is not None)
        t_st = None
        if teach is not None and si <= last_dac:
            teach, _, t_st = _ready(stage_pass(
                fp, teach, batch, None, None, fn=stage.fn, input_key=stage.input, bs=bs,
                needs=frozenset(), n_groups=n_groups, stride=1))
        if not bool(st["finite"]):
            raise FloatingPointError(
                f"block {b}: NaN/Inf in the calibration activations entering stage "
                f"{stage.name!r} {list(stage.linears)}; the quantized prefix or the data are "
                "broken (nothing was written for this block)")
        br.statistics += time.perf_counter() - t0
        t0 = time.perf_counter()
        prod = stage.producer
        if prod is not None and prod.kind == "norm" and prod.paths[0] in dac_norms:
            teacher = S.mean(t_st) if t_st is not None else S.mean(st, ref=True)
            mu = teacher - S.mean(st)
            if recipe.dac["clip"] is not None:
                mu = jnp.clip(mu, -recipe.dac["clip"], recipe.dac["clip"])
            if not bool(jnp.all(jnp.isfinite(mu))):
                raise FloatingPointError(f"block {b}: the DAC mean shift at {prod.paths[0]} is "
                                         "not finite")
            bp = _add_bias(bp, prod.paths[0], mu)
            x = state[stage.input]
            state = dict(state, **{stage.input: x + _last(mu, x)})
            st = S.shift(st, mu)
            rms = jnp.sqrt(jnp.trace(st["H"]) / (st["count"] * mu.shape[0]))
            reports.append(LayerReport(f"layers/{b}/{prod.paths[0]}", "dac", None,
                                       float(jnp.sqrt(jnp.mean(mu * mu)) / jnp.maximum(rms, 1e-30)),
                                       time.perf_counter() - t0))
        passed = state
        bp, state, st = _apply_smoothing(recipe, b, stage, bp, state, st)
        bp, state, st = _apply_input_scale(recipe, b, stage, bp, state, st)
        bp, st = _apply_obs(recipe, b, stage, bp, st)
        over, crep = _clps_stage(recipe, b, spec, si, bp, state, batch)
        if crep is not None:
            reports.append(crep)
        bp, state, rep = _quantize_stage(recipe, b, stage, bp, state, st, over, cols=cols)
        if inputs_fp:  # the fp stream goes on unchanged (the folds act on the quantized model)
            state = passed
        reports.extend(rep)
        del st
        br.algorithm += time.perf_counter() - t0
    t0 = time.perf_counter()
    X = _ready(finish_pass(fp if inputs_fp else dense_params(bp), state, batch, fn=spec.finish,
                           bs=bs, stream=spec.stream))
    if ref_kind == "fp_prefix":
        X_ref = _ready(finish_pass(fp, ref_state, batch, fn=spec.finish, bs=bs,
                                   stream=spec.stream))
    br.propagation = time.perf_counter() - t0
    if not bool(jnp.all(jnp.isfinite(X))):
        raise FloatingPointError(f"block {b}: quantized block produced NaN/Inf activations")
    return bp, X, X_ref, reports


def clear_progress(out_dir: str | os.PathLike) -> None:
    """Remove the per-block progress of a finished run."""
    d, _ = _progress_paths(os.fspath(out_dir))
    if os.path.isdir(d):
        shutil.rmtree(d)
