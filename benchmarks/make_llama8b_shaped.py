"""Write a checkpoint with Llama-3-8B's config, tensor names and shapes (random bf16 weights).

    .venv/bin/python benchmarks/make_llama8b_shaped.py --out /tmp/llama8b-shaped  # ~16 GB
    .venv/bin/python benchmarks/make_llama8b_shaped.py --out DIR --layers 2       # 2 blocks

32 blocks, hidden 4096, intermediate 14336, 32 query / 8 key-value heads, vocab 128256, untied
head, llama3 RoPE scaling: the HF ``LlamaForCausalLM`` layout (``model.layers.{i}.self_attn.
q_proj.weight`` ``[out, in]``, ...), sharded safetensors with ``model.safetensors.index.json``
and a ``config.json``; no tokenizer (calibrate on token ids: ``--calib tokens.npy``).

The weights are random with a realistic scale: linears ``N(0, 0.02²)`` (Llama-3-8B's trained
linears have a standard deviation of 0.01-0.03), RMSNorm gains ``1 + N(0, 0.05²)``, embeddings
and head ``N(0, 0.02²)``, rounded to bf16. The writer streams: each tensor is generated in row
chunks of at most ``--chunk-mb`` and written straight into its shard (the safetensors header is
computed first), so memory stays bounded by one chunk whatever the model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time

import ml_dtypes
import numpy as np

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "mlp_bias": False,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-5,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}


def tensor_plan(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, kind)`` of every tensor, in HF order; kind: linear / norm / embed."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, d), "embed")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,), "norm"),
                (p + "self_attn.q_proj.weight", (d, d), "linear"),
                (p + "self_attn.k_proj.weight", (kv, d), "linear"),
                (p + "self_attn.v_proj.weight", (kv, d), "linear"),
                (p + "self_attn.o_proj.weight", (d, d), "linear"),
                (p + "post_attention_layernorm.weight", (d,), "norm"),
                (p + "mlp.gate_proj.weight", (f, d), "linear"),
                (p + "mlp.up_proj.weight", (f, d), "linear"),
                (p + "mlp.down_proj.weight", (d, f), "linear")]
    out += [("model.norm.weight", (d,), "norm"), ("lm_head.weight", (v, d), "embed")]
    return out


def shards(plan, max_bytes: int) -> list[list]:
    groups, cur, size = [], [], 0
    for t in plan:
        n = int(np.prod(t[1])) * 2
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    if cur:
        groups.append(cur)
    return groups


def _chunks(shape, kind, rng, chunk_bytes):
    """The tensor's bf16 bytes, generated ``rows`` rows at a time."""
    rows = shape[0]
    per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, chunk_bytes // (4 * per_row))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        a = rng.standard_normal((n, *shape[1:]), dtype=np.float32)
        a = 1.0 + 0.05 * a if kind == "norm" else 0.02 * a
        yield a.astype(ml_dtypes.bfloat16).tobytes()


def write_shard(path: str, tensors, rng, chunk_bytes: int) -> int:
    header, off = {}, 0
    for name, shape, _ in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the safetensors writer does
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, shape, kind in tensors:
            for b in _chunks(shape, kind, rng, chunk_bytes):
                f.write(b)
    os.replace(tmp, path)
    return off


def write_checkpoint(out: str, cfg: dict, *, shard_bytes: int = 2 << 30,
                     chunk_bytes: int = 64 << 20, seed: int = 0, log=print) -> dict:
    """Write the checkpoint of ``cfg`` (an HF Llama config dict) into ``out``."""
    os.makedirs(out, exist_ok=True)
    groups = shards(tensor_plan(cfg), shard_bytes)
    rng = np.random.default_rng(seed)
    weight_map, total, t0 = {}, 0, time.perf_counter()
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_shard(os.path.join(out, fname), g, rng, chunk_bytes)
        weight_map.update({name: fname for name, _, _ in g})
        el = time.perf_counter() - t0
        log(f"  {fname}: {total / 2**30:.2f} GiB written, {el:.0f} s, "
            f"ETA {el / (i + 1) * (len(groups) - i - 1):.0f} s")
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return {"out": out, "layers": cfg["num_hidden_layers"], "shards": len(groups),
            "bytes": total, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32, help="blocks (32: Llama-3-8B)")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--chunk-mb", type=float, default=64.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    res = write_checkpoint(a.out, dict(CONFIG, num_hidden_layers=a.layers),
                           shard_bytes=int(a.shard_gb * 2**30),
                           chunk_bytes=int(a.chunk_mb * 2**20), seed=a.seed,
                           log=lambda m: print(m, flush=True))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
