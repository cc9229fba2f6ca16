"""The sequential calibration driver: block by block, streaming, resumable.

For each transformer block ``b``::

    fp block params  <- read from the checkpoint now (memory-mapped safetensors / GGUF on demand)
    stats            <- one jitted pass over X_b (inputs from the already-quantized prefix),
                        batch by batch, optionally sharded over a data mesh axis
    AWQ scales       <- searched and folded (RMSNorm gains, v_proj / up_proj columns)
    QArrays          <- the recipe's algorithm per linear (RTN / GPTQ / AWQ)
    X_{b+1}          <- quantized block(X_b)
    checkpoint       <- quantized block b, X_{b+1}, progress (atomic; the resume point)

The peak holds the quantized prefix, one fp block, the activations and the statistics, never the
whole fp model beside the quantized one. A resumed run restores the quantized blocks and X_b of
the last completed block and continues; its result is bit-identical to an uninterrupted run. A
resume whose model, recipe or calibration data differ is refused, naming which.
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
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxquant.algorithms.awq import awq_clip, awq_search_scale
from jaxquant.algorithms.d2quant import dsq, dsq_dequantize, fold_channel_scale
from jaxquant.algorithms.gptq import gptq
from jaxquant.algorithms.rtn import rtn
from jaxquant.calibration.capture import INPUT_GROUPS, STAT_OF, block_stats_all, run_block_capture
from jaxquant.calibration.checkpoint import load_tree, save_tree
from jaxquant.calibration.staged import staged_block
from jaxquant.calibration.weight_only import LINEAR_PATHS as LINEARS
from jaxquant.core.qarray import dequantize, split_columns
from jaxquant.models.common.config import DecoderConfig
from jaxquant.models.common.decoder import block_apply, embed
from jaxquant.models.common.hf_weights import _read, block_params_from_source, check_tensor
from jaxquant.models.loading import config_from_hf, open_source
from jaxquant.recipes.recipe import Recipe

log = logging.getLogger(__name__)
PROGRESS_DIR = "progress"
STATE_FILE = "state.json"
# where an AWQ scale of each input group is folded (None: no exact fold for this shape)
AWQ_FOLD = {
    "self_attn/q_proj": "input_layernorm",
    "self_attn/o_proj": "self_attn/v_proj",
    "mlp/gate_proj": "post_attention_layernorm",
    "mlp/down_proj": "mlp/up_proj",
}


class ResumeMismatchError(ValueError):
    """A resume whose model, recipe or calibration data differ from the saved run."""


@dataclasses.dataclass
class LayerReport:
    layer: str
    algorithm: str
    bits: int | None
    rel_error: float
    seconds: float


@dataclasses.dataclass
class CalibrationResult:
    config: DecoderConfig
    params: Any
    report: list[LayerReport]
    seconds: float
    unmatched: list[str]
    unused_rules: list[str]
    resumed_from: int = 0


# ---------------------------------------------------------------------------- helpers
def _get(tree: dict, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _set(tree: dict, path: str, value) -> dict:
    """Functional update of a nested dict at ``a/b/c``."""
    k, _, rest = path.partition("/")
    out = dict(tree)
    out[k] = _set(tree[k], rest, value) if rest else value
    return out


def fingerprint_model(src, cfg_dict: dict) -> str:
    h = hashlib.sha256(json.dumps(cfg_dict, sort_keys=True, default=str).encode())
    for name in sorted(src.keys()):
        h.update(f"{name}:{tuple(src.shape(name))}".encode())
    # content, cheaply: a strided sample of one block's first linear
    first = "model.layers.0.self_attn.q_proj.weight"
    if first in src:
        h.update(np.ascontiguousarray(np.asarray(src.get(first)).ravel()[::97]).tobytes())
    return h.hexdigest()[:16]


def fingerprint_data(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()
                          + str(tokens.shape).encode()).hexdigest()[:16]


def _rel_error(W: jax.Array, W_hat: jax.Array, H: jax.Array) -> float:
    """``‖X(W − Ŵ)‖ / ‖XW‖`` from ``H = XᵀX``."""
    d = (W - W_hat).astype(jnp.float32)
    num = jnp.sum(d * (H @ d))
    den = jnp.sum(W.astype(jnp.float32) * (H @ W.astype(jnp.float32)))
    return float(jnp.sqrt(num / jnp.maximum(den, 1e-30)))


def _check_tokens(tokens: np.ndarray, cfg: DecoderConfig, recipe: Recipe) -> np.ndarray:
    tokens = np.asarray(tokens)
    c = recipe.calib
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [n_samples, seqlen], got {tokens.shape}")
    if tokens.shape[0] < c["n_samples"] or tokens.shape[1] < c["seqlen"]:
        raise ValueError(
            f"calibration data has {tokens.shape[0]} x {tokens.shape[1]} tokens, shorter than the "
            f"recipe asks for ({c['n_samples']} x {c['seqlen']})"
        )
    tokens = tokens[: c["n_samples"], : c["seqlen"]]
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(
            f"calibration token ids must lie in [0, {cfg.vocab_size}); got "
            f"[{tokens.min()}, {tokens.max()}]"
        )
    return tokens.astype(np.int32)


# ---------------------------------------------------------------------------- one block
def _apply_awq(cfg, recipe, b, bp, X, positions, batch_size, which=None):
    """Search and fold AWQ scales for the input groups (of ``which``) whose linears are AWQ;
    returns the new block params, per-linear row scales (for error accounting) and clip inputs."""
    groups = [g for g in INPUT_GROUPS if (which is None or g[0] in which)
              and any((r := recipe.match(f"layers/{b}/{p}")) and r.algorithm == "awq" for p in g)]
    row_scale: dict[str, jax.Array] = {}
    clip_x: dict[str, jax.Array] = {}
    if not groups:
        return bp, row_scale, clip_x
    captured: dict[str, list] = {g[0]: [] for g in groups}
    cap = jax.jit(lambda p, x, pos: run_block_capture(cfg, p, x, pos)[1])
    search_tokens = max(r.opts["search_tokens"] for g in groups for p in g
                        if (r := recipe.match(f"layers/{b}/{p}")) and r.algorithm == "awq")
    stride = max(1, (X.shape[0] * X.shape[1]) // search_tokens)
    for i in range(0, X.shape[0], batch_size):
        seen = cap(bp, X[i : i + batch_size], positions[i : i + batch_size])
        for g in captured:  # a strided token subsample bounds memory and search cost
            captured[g].append(seen[g].reshape(-1, seen[g].shape[-1])[::stride])
    for g in groups:
        rule = recipe.match(f"layers/{b}/{g[0]}")
        opts = rule.opts
        Xg = jnp.concatenate(captured[g[0]])
        members = [p for p in g if (r := recipe.match(f"layers/{b}/{p}")) and r.algorithm == "awq"]
        fold = AWQ_FOLD[g[0]]
        foldable = members == list(g)
        if fold == "self_attn/v_proj":
            v_out = _get(bp, "self_attn/v_proj/kernel").shape[-1]
            foldable = foldable and v_out == Xg.shape[-1]  # GQA: no exact per-channel fold
        s = jnp.ones((Xg.shape[-1],), jnp.float32)
        if foldable:
            Ws = tuple(_get(bp, f"{p}/kernel") for p in members)
            s, _ = awq_search_scale(Xg, Ws, rule.spec, n_grid=opts["n_grid"])
            for p in members:
                bp = _set(bp, f"{p}/kernel", _get(bp, f"{p}/kernel") * s[:, None])
            if fold.endswith("layernorm"):
                bp = _set(bp, f"{fold}/scale", _get(bp, f"{fold}/scale") / s)
                if "bias" in _get(bp, fold):
                    bp = _set(bp, f"{fold}/bias", _get(bp, f"{fold}/bias") / s)
            else:
                bp = _set(bp, f"{fold}/kernel", _get(bp, f"{fold}/kernel") / s[None, :])
                if "bias" in _get(bp, fold):
                    bp = _set(bp, f"{fold}/bias", _get(bp, f"{fold}/bias") / s)
        n_clip = min(opts["clip_tokens"], Xg.shape[0])
        stride = max(1, Xg.shape[0] // n_clip)
        xs = Xg[::stride][:n_clip] / s[None, :]
        for p in members:
            row_scale[p] = s
            clip_x[p] = xs
    return bp, row_scale, clip_x


def _batched_gptq(recipe, b, bp, stats) -> dict[str, tuple[Any, float]]:
    """GPTQ of the linears that share an input (hence H) and a rule, as ONE matrix: the rows of
    ``Wᵀ`` are independent given ``H``, so concatenating outputs changes nothing but the cost."""
    done: dict[str, tuple[Any, float]] = {}
    for g in INPUT_GROUPS:
        if g[0] not in stats:
            continue
        rules = [recipe.match(f"layers/{b}/{p}") for p in g]
        r0 = rules[0]
        if (len(g) < 2 or r0 is None or r0.algorithm != "gptq" or r0.spec.per_tensor
                or any(r is not r0 for r in rules)):
            continue
        t0 = time.perf_counter()
        Ws = [_get(bp, f"{p}/kernel") for p in g]
        o = r0.opts
        qa, _ = gptq(jnp.concatenate(Ws, axis=-1), stats[g[0]]["H"], r0.spec,
                     blocksize=o["blocksize"], damp=o["damp"], act_order=o["act_order"],
                     static_groups=o["static_groups"])
        parts = split_columns(qa, [w.shape[-1] for w in Ws])
        secs = (time.perf_counter() - t0) / len(g)
        done.update({p: (q, secs) for p, q in zip(g, parts, strict=True)})
    return done


def _quantize_block(cfg, recipe, b, bp, stats, X, positions, batch_size):
    """Quantize the linears whose input statistics are in ``stats`` (all of a block's, or one
    stage's); DSQ's channel scale is folded into ``up_proj`` (quantized in the same stage)."""
    which = tuple(stats)
    bp, row_scale, clip_x = _apply_awq(cfg, recipe, b, bp, X, positions, batch_size, which)
    batched = _batched_gptq(recipe, b, bp, stats)
    reports = []
    fold_up = None
    for p in LINEARS:
        if STAT_OF[p] not in which:
            continue
        path = f"layers/{b}/{p}"
        rule = recipe.match(path)
        if rule is None or rule.algorithm == "none":
            continue
        t0 = time.perf_counter()
        W = _get(bp, f"{p}/kernel")
        H = stats[STAT_OF[p]]["H"]
        opts = rule.opts
        if rule.algorithm == "rtn":
            qa = rtn(W, rule.spec)
        elif p in batched:
            qa, secs = batched[p]
            t0 = time.perf_counter() - secs
        elif rule.algorithm == "gptq":
            qa, _ = gptq(W, H, rule.spec, blocksize=opts["blocksize"], damp=opts["damp"],
                         act_order=opts["act_order"], static_groups=opts["static_groups"])
        elif rule.algorithm == "awq":
            Wc = awq_clip(clip_x[p], W, rule.spec, n_grid=opts["clip_grid"],
                          max_shrink=opts["max_shrink"]) if opts["clip_search"] else W
            qa = rtn(Wc, rule.spec)
        elif rule.algorithm == "dsq":
            if p != "mlp/down_proj":
                raise ValueError(f"{path}: the dsq algorithm applies to mlp/down_proj only (its "
                                 "channel scale folds into mlp/up_proj); check the recipe's "
                                 f"rule {rule.pattern!r}")
            qa, fold_up, _ = dsq(W, H, rule.spec, **opts)
        else:  # guarded by the recipe loader
            raise ValueError(f"unknown algorithm {rule.algorithm!r}")
        if rule.algorithm == "dsq":
            W_hat = dsq_dequantize(qa, fold_up)
        else:
            W_hat = dequantize(qa, dtype=jnp.float32)
        if not bool(jnp.all(jnp.isfinite(W_hat))):
            raise FloatingPointError(f"{path}: quantized weights are not finite; not writing them")
        rs = row_scale.get(p)
        if rs is not None:  # error in the original input space: X diag(1/s) (W_s - Ŵ_s)
            err = _rel_error(W / rs[:, None], W_hat / rs[:, None], H)
        else:
            err = _rel_error(W, W_hat, H)
        bp = _set(bp, f"{p}/kernel", qa)
        reports.append(LayerReport(path, rule.algorithm, rule.spec.bits, err,
                                   time.perf_counter() - t0))
    if fold_up is not None:  # s^c -> up_proj's per-column scales (codes unchanged)
        bp = _set(bp, "mlp/up_proj/kernel", fold_channel_scale(_get(bp, "mlp/up_proj/kernel"),
                                                               fold_up))
        if "bias" in _get(bp, "mlp/up_proj"):
            bp = _set(bp, "mlp/up_proj/bias", _get(bp, "mlp/up_proj/bias") * fold_up)
    return bp, reports


def _add_norm_bias(bp, norm: str, mu):
    old = _get(bp, norm).get("bias")
    return _set(bp, f"{norm}/bias", mu if old is None else old + mu)


def _check_stats(stats, b):
    bad = [k for k, s in stats.items() if not bool(s["finite"])]
    if bad:
        raise FloatingPointError(
            f"block {b}: NaN/Inf in the calibration activations entering {bad}; the "
            "quantized prefix or the data are broken (nothing was written for this block)"
        )


# ---------------------------------------------------------------------------- the driver
_EMBED, _NORM, _HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def _top_tensors(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Names and HF shapes of the tensors that stay unquantized."""
    v, d = cfg.vocab_size, cfg.hidden_size
    out = {_EMBED: (v, d), _NORM: (d,)}
    if not cfg.tie_word_embeddings:
        out[_HEAD] = (v, d)
    return out


def _top_params(cfg: DecoderConfig, src) -> dict:
    """Embedding, final norm and (untied) LM head, in float32 (they stay unquantized)."""
    t = {name: jnp.asarray(_read(src, name, shape, np.float32))
         for name, shape in _top_tensors(cfg).items()}
    top = {"embed_tokens": {"embedding": t[_EMBED]}, "norm": {"scale": t[_NORM]}}
    if _HEAD in t:
        top["lm_head"] = {"kernel": t[_HEAD].T}
    return top


def _progress_paths(out_dir: str) -> tuple[str, str]:
    d = os.path.join(out_dir, PROGRESS_DIR)
    return d, os.path.join(d, STATE_FILE)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _check_resume(state: dict, fps: dict, out_dir: str) -> None:
    for key, label in (("model", "model"), ("recipe", "recipe"), ("data", "calibration data")):
        if state["fingerprints"].get(key) != fps[key]:
            raise ResumeMismatchError(
                f"{out_dir}: the saved progress was made with a different {label} "
                f"(fingerprint {state['fingerprints'].get(key)} != {fps[key]}); refusing to "
                "resume. Use another --out directory or delete this one."
            )


def calibrate(
    model_path: str | os.PathLike,
    recipe: Recipe,
    calib_tokens: np.ndarray,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    mesh: Mesh | None = None,
    progress: bool = True,
    on_block_end: Callable[[int, dict], None] | None = None,
) -> CalibrationResult:
    """Quantize the model at ``model_path`` with ``recipe`` on ``calib_tokens`` ``[n, T]``.

    Args:
      out_dir: where progress is checkpointed after every block (None: no checkpoints).
      resume: continue from ``out_dir``'s progress (refused if model, recipe or data differ).
      mesh: shard the statistics pass over ``mesh``'s ``data`` axis.
      on_block_end: ``callback(block_index, info)`` after every block (tests, logging).
    """
    t_start = time.perf_counter()
    src, cfg_dict = open_source(model_path)
    cfg = config_from_hf(cfg_dict, source=os.fspath(model_path))
    tokens = _check_tokens(calib_tokens, cfg, recipe)
    c = recipe.calib
    bs = int(c["batch_size"])
    fps = {"model": fingerprint_model(src, cfg_dict), "recipe": recipe.fingerprint(),
           "data": fingerprint_data(tokens)}

    for name, shape in _top_tensors(cfg).items():  # fail now, not after calibrating
        check_tensor(src, name, shape)
    paths = [f"layers/{b}/{p}" for b in range(cfg.num_layers) for p in LINEARS]
    unmatched, unused = recipe.report(paths)
    if unmatched:
        log.warning("%d linears match no rule and stay fp: %s%s", len(unmatched),
                    unmatched[:4], " ..." if len(unmatched) > 4 else "")
    if unused:
        log.warning("recipe rules that match no layer: %s", unused)

    blocks: list = []
    reports: list[LayerReport] = []
    start = 0
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    X = X_ref = None
    need_ref = bool(recipe.dac) and recipe.dac["reference"] == "fp_prefix"
    prog_dir = state_path = None
    if out_dir is not None:
        out_dir = os.path.abspath(os.fspath(out_dir))
        prog_dir, state_path = _progress_paths(out_dir)
        if os.path.isfile(state_path):
            with open(state_path) as f:
                state = json.load(f)
            _check_resume(state, fps, out_dir)
            if not resume:
                raise FileExistsError(
                    f"{out_dir} holds the progress of an earlier run of this job; pass "
                    "resume=True (--resume) to continue it, or choose another directory"
                )
            start = int(state["next_block"])
            blocks = [load_tree(os.path.join(prog_dir, f"block_{b:04d}")) for b in range(start)]
            X = jnp.asarray(np.load(os.path.join(prog_dir, "acts.npy"), allow_pickle=False))
            if need_ref:
                X_ref = jnp.asarray(np.load(os.path.join(prog_dir, "acts_ref.npy"),
                                            allow_pickle=False))
            reports = [LayerReport(**r) for r in state["report"]]
            log.info("resuming at block %d of %d", start, cfg.num_layers)
        elif os.path.isfile(os.path.join(out_dir, "jaxquant.json")):
            raise FileExistsError(f"{out_dir} already holds a finished quantized model; "
                                  "refusing to overwrite it")
        os.makedirs(prog_dir, exist_ok=True)
    if X is None:  # the [V, D] table is read for this and again at the end, not held between
        X = embed({"embed_tokens": {"embedding": jnp.asarray(_read(
            src, _EMBED, _top_tensors(cfg)[_EMBED], np.float32))}}, jnp.asarray(tokens))

    if X_ref is None and need_ref:
        # block 0: the fp and the quantized paths start from the same embeddings (a copy:
        # propagation donates its input buffer)
        X_ref = jnp.array(X, copy=True)

    bar = tqdm(range(start, cfg.num_layers), desc="calibrate", unit="block",
               disable=not progress, initial=start, total=cfg.num_layers)
    for b in bar:
        bp = jax.tree.map(jnp.asarray, block_params_from_source(cfg, src, b, np.float32))
        if recipe.staged:
            Xb = X
            qbp, rep, X, X_ref = staged_block(
                cfg, recipe, b, bp, Xb, X_ref, positions, bs, mesh,
                quantize=lambda p, st, b=b, Xb=Xb: _quantize_block(cfg, recipe, b, p, st, Xb,
                                                                    positions, bs),
                add_bias=_add_norm_bias, check_stats=lambda st, b=b: _check_stats(st, b),
                report=lambda norm, rel, secs, b=b: LayerReport(f"layers/{b}/{norm}", "dac",
                                                                None, rel, secs))
            del Xb
        else:
            stats = block_stats_all(cfg, bp, X, positions, batch_size=bs, mesh=mesh)
            _check_stats(stats, b)
            qbp, rep = _quantize_block(cfg, recipe, b, bp, stats, X, positions, bs)
            del stats
            X = _propagate(cfg, qbp, X, positions, bs)
        del bp
        if not bool(jnp.all(jnp.isfinite(X))):
            raise FloatingPointError(f"block {b}: quantized block produced NaN/Inf activations")
        blocks.append(qbp)
        reports.extend(rep)
        if prog_dir is not None:
            save_tree(os.path.join(prog_dir, f"block_{b:04d}"), qbp)
            for name, arr in (("acts", X), ("acts_ref", X_ref)):
                if arr is None:
                    continue
                tmp = os.path.join(prog_dir, f"{name}.tmp.npy")
                np.save(tmp, np.asarray(arr))
                os.replace(tmp, os.path.join(prog_dir, f"{name}.npy"))
            _write_json_atomic(state_path, {
                "next_block": b + 1, "fingerprints": fps,
                "report": [dataclasses.asdict(r) for r in reports]})
        if on_block_end is not None:
            on_block_end(b, {"reports": rep})
        errs = [r.rel_error for r in rep]
        bar.set_postfix(rel_err=f"{np.mean(errs):.4f}" if errs else "-")

    del X, X_ref
    layers = stack_or_list(blocks)
    del blocks
    params = {**_top_params(cfg, src), "layers": layers}
    return CalibrationResult(cfg, params, reports, time.perf_counter() - t_start,
                             unmatched, unused, start)


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def _propagate_scan(cfg, qbp, X, positions, bs):
    n, t, d = X.shape
    xs = X.reshape(n // bs, bs, t, d)
    ps = positions.reshape(n // bs, bs, t)
    out = jax.lax.map(lambda a: block_apply(cfg, qbp, a[0], a[1]), (xs, ps))
    return out.reshape(n, t, d)


_apply_jit = jax.jit(block_apply, static_argnums=0)


def _propagate(cfg, qbp, X, positions, bs):
    """``X_{b+1} = block_b(X_b)`` batch by batch; one program (X donated) when ``bs`` divides n."""
    if X.shape[0] % bs == 0:
        return _propagate_scan(cfg, qbp, X, positions, bs)
    return jnp.concatenate([_apply_jit(cfg, qbp, X[i : i + bs], positions[i : i + bs])
                            for i in range(0, X.shape[0], bs)])


def stack_or_list(blocks: list) -> Any:
    """Stack blocks into the scan layout when their structures agree, else keep a list."""
    structs = {jax.tree.structure(b) for b in blocks}
    if len(structs) == 1:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return list(blocks)


def clear_progress(out_dir: str | os.PathLike) -> None:
    """Remove the per-block progress of a finished run."""
    d, _ = _progress_paths(os.fspath(out_dir))
    if os.path.isdir(d):
        shutil.rmtree(d)

