"""Train the real diffusion LM the Elastic-dLLM measurements use: a small byte-level LLaDA
(masked-diffusion LM, the LLaDA pre-training objective) on Shakespeare, holding out Hamlet and
The Tempest (docs/protocol.md). Fixed seed; sized to finish in under 30 minutes on 2 CPU cores.

    python -m jaxquant.diffusion.train_shakespeare [--out DIR] [--steps N] [--data DIR]

Writes the model in the LLaDA Hugging Face layout, so the LLaDA converter is its loading path
(``jaxquant.load(DIR)``)::

    DIR/config.json, DIR/model.safetensors            # LLaDA HF layout (LLaDAModelLM)
    DIR/tokenizer.json, DIR/tokenizer_config.json     # byte tokenizer: id = byte, 256 eos, 257 mask
    DIR/train_log.json                                # losses, held-out NLL bound, seconds, seed
    DIR/ckpt/                                         # resumable state (removed when done)

Training windows are ``--seq-len`` bytes at random offsets of the training stream, each with a
random RoPE position offset in ``[0, max_sequence_length - seq_len]`` so that every position id a
decode of up to ``max_sequence_length`` tokens uses has been trained. A run killed part way resumes
from its last checkpoint (``--ckpt-every`` steps) with the same data order.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.data import shakespeare as sh
from jaxquant.diffusion.masked_objective import llada_loss, nll_bound
from jaxquant.models.llada.config import LLaDAConfig

# The Shakespeare dLLM: byte vocabulary (256 + eos + [MASK]), width 128, 4 blocks.
SHAKESPEARE_LLADA = LLaDAConfig(
    vocab_size=sh.VOCAB_SIZE, embedding_size=sh.VOCAB_SIZE, d_model=128, n_heads=4,
    n_kv_heads=4, n_layers=4, mlp_hidden_size=384, mask_token_id=sh.MASK_ID,
    max_sequence_length=1152, eos_token_id=sh.EOS_ID, pad_token_id=sh.EOS_ID)


def default_dir() -> str:
    base = os.environ.get("JAXQUANT_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                         "jaxquant"))
    return os.path.join(base, "llada-shakespeare")


def _save_state(path: str, step: int, params, opt) -> None:
    from safetensors.numpy import save_file

    leaves = jax.tree.leaves((params, opt))
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "state.safetensors.tmp")
    save_file({f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}, tmp,
              metadata={"step": str(step)})
    os.replace(tmp, os.path.join(path, "state.safetensors"))


def _load_state(path: str, params, opt):
    from safetensors import safe_open

    f = os.path.join(path, "state.safetensors")
    if not os.path.exists(f):
        return None
    leaves, treedef = jax.tree.flatten((params, opt))
    with safe_open(f, "np") as sf:
        step = int(sf.metadata()["step"])
        new = [jnp.asarray(sf.get_tensor(f"leaf_{i:05d}")) for i in range(len(leaves))]
    for a, b in zip(leaves, new, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"{f}: checkpoint leaf shape {b.shape} != {a.shape} (a different "
                             "model config); delete the checkpoint directory to start over")
    params, opt = jax.tree.unflatten(treedef, new)
    return step, params, opt


def train(stream: np.ndarray, *, cfg: LLaDAConfig = SHAKESPEARE_LLADA, steps: int = 600,
          batch_size: int = 8, seq_len: int = 1024, lr: float = 2e-3, warmup: int = 60,
          seed: int = 0, ckpt_dir: str | None = None, ckpt_every: int = 100,
          log=print) -> tuple[dict, list[float], float]:
    """LLaDA pre-training on random ``seq_len`` windows of the id ``stream``.
    Returns ``(params, loss per 50 steps, seconds)``."""
    import optax

    from jaxquant.models.llada.model import LogitsFn, init_params

    if seq_len > cfg.max_sequence_length:
        raise ValueError(f"seq_len={seq_len} exceeds max_sequence_length="
                         f"{cfg.max_sequence_length}")
    warmup = min(warmup, max(1, steps // 10))
    logits_fn = LogitsFn(cfg)
    params = init_params(cfg, jax.random.key(seed))
    # embedding N(0, 1) from init_params is too large for a trained LM; start it small
    params["wte"]["embedding"] = params["wte"]["embedding"] * 0.02
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps,
                                                                    lr * 0.05),
                                 b2=0.99, weight_decay=0.01))
    opt = tx.init(params)
    start = 0
    if ckpt_dir:
        got = _load_state(ckpt_dir, params, opt)
        if got is not None:
            start, params, opt = got
            log(f"resumed from {ckpt_dir} at step {start}")
    max_off = cfg.max_sequence_length - seq_len

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt, key, ids, offset):
        positions = offset[:, None] + jnp.arange(ids.shape[1], dtype=jnp.int32)[None, :]

        def loss_fn(p):
            return llada_loss(logits_fn, p, ids, key, mask_id=cfg.mask_token_id,
                              positions=positions)

        loss, g = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's schedules mix int counts, floats
            upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    curve, window = [], []
    t0 = time.perf_counter()
    for i in range(start, steps):
        rng = np.random.default_rng([seed, i])  # the batch of step i, also after a resume
        starts = rng.integers(0, len(stream) - seq_len, batch_size)
        ids = np.stack([stream[s:s + seq_len] for s in starts])
        offset = rng.integers(0, max_off + 1, batch_size).astype(np.int32)
        key = jax.random.fold_in(jax.random.key(seed + 1), i)
        params, opt, loss = step(params, opt, key, jnp.asarray(ids), jnp.asarray(offset))
        window.append(loss)
        done = i + 1 - start
        if (i + 1) % 50 == 0 or i + 1 == steps:
            curve.append(float(np.mean([float(x) for x in window])))
            window = []
            el = time.perf_counter() - t0
            log(f"step {i + 1}/{steps}: loss {curve[-1]:.4f} ({el:.0f} s, ETA "
                f"{el / done * (steps - i - 1):.0f} s)")
        if ckpt_dir and (i + 1) % ckpt_every == 0 and i + 1 < steps:
            _save_state(ckpt_dir, i + 1, params, opt)
    return params, curve, time.perf_counter() - t0


def main(argv=None) -> None:
    from jaxquant.models.llada.convert import save_llada
    from jaxquant.models.llada.model import LogitsFn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=default_dir())
    ap.add_argument("--data", default=None, help="Shakespeare directory (*_gut.txt)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--ckpt-every", type=int, default=100)
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    stream = sh.corpus("train", args.data)
    print(f"training text: {len(stream)} bytes; held out: {', '.join(sh.HELDOUT)}", flush=True)
    ckpt = os.path.join(args.out, "ckpt")
    params, curve, secs = train(stream, steps=args.steps, batch_size=args.batch_size,
                                seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                                ckpt_dir=ckpt, ckpt_every=args.ckpt_every)
    cfg = SHAKESPEARE_LLADA
    windows = sh.heldout_windows(args.seq_len, args.eval_windows, args.data, seed=args.seed)
    t0 = time.perf_counter()
    ev = nll_bound(LogitsFn(cfg), params, windows, mask_id=cfg.mask_token_id, seed=args.seed)
    print(f"held-out NLL bound {ev['nll_bound']:.4f} nats/byte ({ev['bits_per_token']:.3f} "
          f"bits/byte) on {ev['n_windows']} windows x {ev['n_t']} mask ratios "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    save_llada(args.out, cfg, params)
    sh.write_byte_tokenizer(args.out)
    log = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "lr": args.lr, "seed": args.seed, "loss_per_50": curve,
           "train_seconds": round(secs, 1), "heldout": list(sh.HELDOUT),
           "heldout_nll_bound": ev["nll_bound"], "heldout_bits_per_byte": ev["bits_per_token"],
           "heldout_masked_ce": {str(k): v for k, v in ev["masked_ce"].items()},
           "eval_windows": args.eval_windows,
           "total_seconds": round(time.perf_counter() - t_all, 1)}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    shutil.rmtree(ckpt, ignore_errors=True)
    print(f"wrote {args.out} in {log['total_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
