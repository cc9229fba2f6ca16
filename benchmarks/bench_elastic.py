"""Elastic-dLLM on the trained Shakespeare dLLM (``python -m
jaxquant.diffusion.train_shakespeare``): decode speed and quality of position-preserving [MASK]
compression against baseline decoding, and the W4 GPTQ model (the engine, calibrated on masked
windows) decoding with compression.

Decoding (docs/protocol.md, diffusion LLM protocol): held-out prompts of ``--prompt-len`` bytes
(Hamlet / The Tempest, never trained on), gen length 256 / 512 / 1024, block 32, ``gen/2`` steps
(two tokens per step), low-confidence remasking, greedy. Each configuration decodes two batches
of ``--batch`` prompts with the same shapes: the first compiles, the second is timed (both count
for quality). Configurations:

* ``baseline``       every step runs the whole sequence (prompt + gen length);
* ``keep_far=K``     the forward sees the prompt, the decoded blocks, the current block and K far
                     [MASK]s spread to the end (always the last position), at their position ids;
* ``terminal``       keep_far=0 plus one protected terminal [MASK] (methods.md §4.2's default
                     keep set: the current block and a terminal mask);
* ``fold=W``         (gen 1024) keep_far=4 with context folding: at most W tokens per forward.

Quality: agreement of the generated tokens with the baseline's; the held-out NLL bound the fp
model gives the generated text (prompt + generation, stratified mask ratios, fixed keys: lower is
more likely under the model, but degenerate repetition also scores well, hence) the fraction of
distinct 4-grams in the generations.

Quantized: RTN W4 and GPTQ W4 (group 64, llada_*_w4_g64 recipes) calibrated on 64 x 256 training
windows masked at ratios 0.1..0.9 (the ratio carried per sample like a timestep), and GPTQ
calibrated on the same windows unmasked; three calibration draws each; held-out NLL bound of
each model; then the masked-calibrated GPTQ model decodes with and without compression.

    JAXQUANT_DATA=../shared/data .venv/bin/python benchmarks/bench_elastic.py

Writes ``benchmarks/results/elastic_dllm_<date>.json`` and ``elastic_dllm.png``, prints tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def distinct4(rows) -> float:
    """Distinct 4-grams / all 4-grams over the generated rows."""
    grams, total = set(), 0
    for r in rows:
        r = list(map(int, r))
        for i in range(len(r) - 3):
            grams.add(tuple(r[i:i + 4]))
            total += 1
    return len(grams) / max(total, 1)


def run_config(name, fn, prompts, *, gen, full_len):
    """Decode the two prompt batches with ``fn(prompts) -> (ids, stats|None)``: the first call
    compiles, the second is timed."""
    t0 = time.perf_counter()
    a, stats = fn(prompts[0])
    a = np.asarray(jax.block_until_ready(a))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    b, _ = fn(prompts[1])
    b = np.asarray(jax.block_until_ready(b))
    secs = time.perf_counter() - t0
    p = prompts.shape[2]
    out = np.concatenate([a, b])[:, : p + gen]
    per_step = None if stats is None else np.asarray(stats["tokens_per_step"])
    mean_tokens = full_len if per_step is None else float(per_step.mean())
    return {"config": name, "gen_length": gen, "seconds": round(secs, 3),
            "first_call_seconds": round(first, 3),
            "tokens_per_s": round(prompts.shape[1] * gen / secs, 2),
            "mean_tokens_per_step": round(mean_tokens, 1),
            "kept_fraction": round(mean_tokens / full_len, 4)}, out


def score(model_fp, seqs, gen, p, seed=0):
    from jaxquant.diffusion.masked_objective import nll_bound

    b = nll_bound(model_fp.logits_fn, model_fp.params, seqs, mask_id=model_fp.config.mask_token_id,
                  n_t=4, batch_size=4, seed=seed)
    return {"gen_nll_bound": round(b["nll_bound"], 4),
            "distinct4": round(distinct4(seqs[:, p:]), 4)}


def decode_table(model, fp, prompts, gens, keeps, *, block, label, base_out=None):
    from jaxquant.diffusion.elastic import generate_compressed
    from jaxquant.diffusion.masked import generate

    rows, outs = [], {}
    p = prompts.shape[2]
    for gen in gens:
        steps = gen // 2
        full = p + gen
        kw = dict(gen_length=gen, block_length=block, steps=steps,
                  mask_id=model.config.mask_token_id)
        cfgs = [("baseline", lambda x, kw=kw: (generate(model.logits_fn, model.params, x, **kw),
                                                None))]
        for k in keeps:
            if k == "terminal":
                cfgs.append(("terminal", lambda x, kw=kw: generate_compressed(
                    model.logits_fn, model.params, x, keep_far=0, terminal_mask=True,
                    return_stats=True, **kw)))
            elif isinstance(k, str) and k.startswith("fold="):
                if gen < 1024:
                    continue
                w = int(k.split("=")[1])
                cfgs.append((k, lambda x, kw=kw, w=w: generate_compressed(
                    model.logits_fn, model.params, x, keep_far=4, fold_window=w,
                    return_stats=True, **kw)))
            else:
                cfgs.append((f"keep_far={k}", lambda x, kw=kw, k=k: generate_compressed(
                    model.logits_fn, model.params, x, keep_far=k, return_stats=True, **kw)))
        for name, fn in cfgs:
            t0 = time.perf_counter()
            row, out = run_config(name, fn, prompts, gen=gen, full_len=full)
            ref = out if name == "baseline" else outs[(gen, "baseline")]
            row["agreement_vs_baseline"] = round(float(np.mean(out[:, p:] == ref[:, p:])), 4)
            if base_out is not None:
                row["agreement_vs_fp_baseline"] = round(
                    float(np.mean(out[:, p:] == base_out[(gen, "baseline")][:, p:])), 4)
            row |= score(fp, out, gen, p)
            row["model"] = label
            row["sample"] = out[0, p: p + 160].tolist()
            outs[(gen, name)] = out
            rows.append(row)
            print(f"  {label} gen {gen} {name}: {row['seconds']:.1f} s timed "
                  f"({row['tokens_per_s']:.1f} tok/s, kept {row['kept_fraction']:.2f}, agree "
                  f"{row['agreement_vs_baseline']:.3f}, nll {row['gen_nll_bound']:.3f}); wall "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    for r in rows:
        base = next(b for b in rows if b["gen_length"] == r["gen_length"]
                    and b["config"] == "baseline")
        r["speedup_vs_baseline"] = round(base["seconds"] / r["seconds"], 3)
    return rows, outs


def forward_ms(model, batch, lengths, reps=10):
    """Milliseconds of one jitted forward of ``batch`` sequences of each length."""
    out = {}
    for t in lengths:
        x = np.full((batch, t), 65, np.int32)
        jax.block_until_ready(model(x))
        t0 = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(model(x))
        out[int(t)] = round((time.perf_counter() - t0) / reps * 1000, 2)
    return out


def quantized_models(fp, stream, *, seeds, n=64, seqlen=256, ratios=(0.1, 0.3, 0.5, 0.7, 0.9)):
    import jaxquant
    from jaxquant.models.llada.spec import masked_calibration_batch
    from jaxquant.recipes import load_recipe

    mask_id = fp.config.mask_token_id
    out = {}
    t0 = time.perf_counter()
    out["rtn_w4"] = [jaxquant.quantize_model(fp, load_recipe("llada_rtn_w4_g64"), None,
                                             progress=False)]
    rec = load_recipe("llada_gptq_w4_g64").with_calib(n_samples=n, seqlen=seqlen)
    for s in seeds:
        rng = np.random.default_rng(1000 + s)
        starts = rng.integers(0, len(stream) - seqlen, n)
        w = np.stack([stream[i:i + seqlen] for i in starts])
        masked = masked_calibration_batch(w, ratios, mask_id=mask_id, seed=s)
        plain = {"tokens": w.astype(np.int32)}
        t1 = time.perf_counter()
        out.setdefault("gptq_w4_masked", []).append(
            jaxquant.quantize_model(fp, rec, masked, progress=False))
        out.setdefault("calib_seconds", []).append(round(time.perf_counter() - t1, 1))
        out.setdefault("gptq_w4_unmasked", []).append(
            jaxquant.quantize_model(fp, rec, plain, progress=False))
    print(f"  quantized {len(seeds)} draws in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({r["model"] for r in rows}):
        for cfg in dict.fromkeys(r["config"] for r in rows if r["model"] == model):
            rs = sorted((r for r in rows if r["model"] == model and r["config"] == cfg),
                        key=lambda r: r["gen_length"])
            style = "-o" if model == "fp" else "--s"
            ax[0].plot([r["gen_length"] for r in rs], [r["tokens_per_s"] for r in rs], style,
                       label=f"{model} {cfg}")
            ax[1].plot([r["kept_fraction"] for r in rs],
                       [r["agreement_vs_baseline"] for r in rs], style, label=f"{model} {cfg}")
    ax[0].set(xlabel="gen length", ylabel="tokens / s (timed decode)", xscale="log",
              title="decode speed (block 32, gen/2 steps)")
    ax[1].set(xlabel="mean tokens per forward / full length",
              ylabel="token agreement with its baseline", title="compression vs agreement")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from jaxquant.data import shakespeare as sh
    from jaxquant.diffusion.masked_objective import nll_bound
    from jaxquant.diffusion.train_shakespeare import default_dir
    from jaxquant.models.llada import load_llada

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_dir())
    ap.add_argument("--gens", default="256,512,1024")
    ap.add_argument("--keeps", default="32,4,terminal,fold=288")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prompt-seed", type=int, default=1)
    ap.add_argument("--quant-gens", default="512,1024")
    ap.add_argument("--quant-keeps", default="4")
    ap.add_argument("--quant-seeds", type=int, default=3)
    ap.add_argument("--nll-windows", type=int, default=16)
    ap.add_argument("--skip-quant", action="store_true")
    args = ap.parse_args()
    fp = load_llada(args.model)
    with open(os.path.join(args.model, "train_log.json")) as f:
        train_log = json.load(f)
    gens = [int(g) for g in args.gens.split(",")]
    keeps = [k if not k.lstrip("-").isdigit() else int(k) for k in args.keeps.split(",")]
    windows = sh.heldout_windows(args.prompt_len, 2 * args.batch, seed=args.prompt_seed)
    prompts = windows.reshape(2, args.batch, args.prompt_len)
    t_all = time.perf_counter()
    print(f"model {args.model}: held-out NLL bound {train_log['heldout_nll_bound']:.4f} "
          f"nats/byte (from training)", flush=True)
    fwd = forward_ms(fp, args.batch, [288, 544, 800, 1000, 1024, 1040, 1056, 1088])
    print(f"  forward ms by sequence length (batch {args.batch}): {fwd}", flush=True)
    rows, outs = decode_table(fp, fp, prompts, gens, keeps, block=args.block, label="fp")

    quant = {}
    if not args.skip_quant:
        stream = sh.corpus("train")
        hw = sh.heldout_windows(1024, args.nll_windows, seed=0)
        seeds = list(range(args.quant_seeds))
        models = quantized_models(fp, stream, seeds=seeds)
        quant["calib_seconds"] = models.pop("calib_seconds")

        def bound(m):
            return nll_bound(m.logits_fn, m.params, hw, mask_id=fp.config.mask_token_id,
                             n_t=8, batch_size=4, seed=0)["nll_bound"]

        quant["heldout_nll_bound"] = {"fp": round(bound(fp), 4)}
        for name, ms in models.items():
            quant["heldout_nll_bound"][name] = [round(bound(m), 4) for m in ms]
            print(f"  held-out NLL bound {name}: {quant['heldout_nll_bound'][name]}", flush=True)
        qg = [int(g) for g in args.quant_gens.split(",")]
        qk = [k if not k.isdigit() else int(k) for k in args.quant_keeps.split(",")]
        qrows, _ = decode_table(models["gptq_w4_masked"][0], fp, prompts, qg, qk,
                                block=args.block, label="gptq_w4", base_out=outs)
        rows += qrows

    res = {"date": datetime.date.today().isoformat(),
           "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
                      f"jax {jax.__version__}, f32",
           "model": args.model, "train_log": {k: train_log[k] for k in (
               "steps", "batch_size", "seq_len", "train_seconds", "heldout_nll_bound",
               "heldout_bits_per_byte", "total_seconds")},
           "settings": {"block": args.block, "batch": args.batch, "prompt_len": args.prompt_len,
                        "prompt_seed": args.prompt_seed, "steps": "gen_length / 2",
                        "remasking": "low_confidence", "temperature": 0.0},
           "forward_ms_by_length": fwd, "rows": rows, "quantized": quant,
           "seconds": round(time.perf_counter() - t_all, 1)}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"elastic_dllm_{res['date']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    plot(rows, os.path.join(HERE, "results", "elastic_dllm.png"))
    print("\n| model | gen | config | timed s | tokens/s | speedup | kept | agreement | gen NLL "
          "| distinct-4 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['gen_length']} | {r['config']} | {r['seconds']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['speedup_vs_baseline']:.2f}x | "
              f"{r['kept_fraction']:.2f} | {r['agreement_vs_baseline']:.3f} | "
              f"{r['gen_nll_bound']:.3f} | {r['distinct4']:.3f} |")
    if quant:
        print("\nheld-out NLL bound (nats/byte):", json.dumps(quant["heldout_nll_bound"]))
    print(f"wrote {path} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
