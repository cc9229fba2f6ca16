"""Why DAC does (not) help on SmolLM2: per block, the post-attention-norm deviation between the fp
and the GPTQ-quantized attention on the same input, before and after the mean-shift bias.

    JAXQUANT_DATA=../shared/data .venv/bin/python benchmarks/diag_dac.py --bits 3 --blocks 0,3,10,20,29

For each listed block (inputs: the fp model's activations on the first 16 calibration windows),
attention is GPTQ-quantized as in ``d2quant_w{bits}_g64``, and the table gives ``‖μ‖/‖h‖``
(the mean shift against the fp activation's norm), the share of the deviation energy that the
mean carries, ``E‖h_fp − h_q‖²`` before and after adding ``μ`` (tokens after position 0), and
``‖μ‖`` when position 0 (the attention sink) is left out of the mean.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    from jaxquant import data as jdata
    from jaxquant.calibration.capture import ATTN_STATS, block_stats_all
    from jaxquant.calibration.driver import _quantize_block
    from jaxquant.calibration.staged import attn_pass
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.models.common.decoder import block_apply, embed, post_attn_norm
    from jaxquant.models.common.hf_weights import read_tensor, block_params_from_source
    from jaxquant.models.loading import config_from_hf, open_source
    from jaxquant.recipes import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--blocks", default="0,3,10,20,29")
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    blocks = {int(b) for b in args.blocks.split(",")}

    path = resolve_model_path("smollm2-135m")
    src, cd = open_source(path)
    cfg = config_from_hf(cd, source=path)
    tok = np.load(os.path.join(jdata.data_dir(), "smollm2_wikitext2_valid_calib_32x512.npy"))
    tok = tok[: args.windows]
    emb = {"embed_tokens": {"embedding": jnp.asarray(read_tensor(
        src, "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), np.float32))}}
    x = embed(emb, jnp.asarray(tok))
    pos = jnp.broadcast_to(jnp.arange(tok.shape[1], dtype=jnp.int32), tok.shape)
    recipe = load_recipe(f"d2quant_w{args.bits}_g64")
    step = jax.jit(lambda bp, x: block_apply(cfg, bp, x, pos))
    print(f"# SmolLM2-135M, GPTQ W{args.bits}g64 attention, {args.windows}x512 calibration "
          "windows, fp-model block inputs")
    print("| block | ‖μ‖/‖h‖ | mean's share of E‖d‖² | E‖d‖² before | after +μ | "
          "‖μ‖ w/o pos 0 / ‖μ‖ |")
    print("|---|---|---|---|---|---|")
    for b in range(max(blocks) + 1):
        bp = jax.tree.map(jnp.asarray, block_params_from_source(cfg, src, b, np.float32))
        if b in blocks:
            st = block_stats_all(cfg, bp, x, pos, batch_size=4, which=ATTN_STATS)
            qbp, _ = _quantize_block(cfg, recipe, b, bp, st, x, pos, 4)
            r_fp, _ = attn_pass(cfg, bp, x, pos, 4)
            r_q, _ = attn_pass(cfg, qbp, x, pos, 4)
            h_fp = np.asarray(post_attn_norm(cfg, bp, r_fp), np.float64)
            d = h_fp - np.asarray(post_attn_norm(cfg, qbp, r_q), np.float64)
            dim = d.shape[-1]
            mu = d.reshape(-1, dim).mean(0)
            mu_rest = d[:, 1:].reshape(-1, dim).mean(0)
            before = np.mean(np.sum(d[:, 1:] ** 2, -1))
            after = np.mean(np.sum((d[:, 1:] - mu) ** 2, -1))
            h_norm = np.sqrt(np.mean(np.sum(h_fp ** 2, -1)))
            share = np.sum(mu ** 2) / np.mean(np.sum(d.reshape(-1, dim) ** 2, -1))
            print(f"| {b} | {np.linalg.norm(mu) / h_norm:.4f} | {share:.3f} | {before:.4g} | "
                  f"{after:.4g} | {np.linalg.norm(mu_rest) / np.linalg.norm(mu):.3f} |",
                  flush=True)
        x = step(bp, x)


if __name__ == "__main__":
    main()
