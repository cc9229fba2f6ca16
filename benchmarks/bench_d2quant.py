"""D²Quant on SmolLM2-135M (protocol: ../shared/docs/protocol.md) against the paper's baselines
with the observers of its public code, at W2g64 and W3g64: PPL on the 64x512 quick-eval windows,
KL(fp || q) on the same windows, PPL on held-out validation windows, calibration wall seconds and
peak RSS. Each scheme runs in its own process, one after another.

    JAXQUANT_DATA=../shared/data .venv/bin/python benchmarks/bench_d2quant.py \\
        --bits 3,2 --variants d2quant,gptaq_rot --seeds 0

Variants (``VARIANTS``): the shipped ``d2quant_w{b}_g64`` (rotation + GPTAQ + GAR + binary DSQ +
DAC, methods.md §1.9) and its baselines ``d2q_{gptq,gptq_rot,gptaq,gptaq_rot}_w{b}_g64`` (GPTQ,
GPTQ†, GPTAQ, GPTAQ†), ``awq`` and today's ``gptq_w{b}_g64`` (act-order + MSE scales); ablations
switch one component of ``d2quant`` off (``no_dsq``, ``no_dac``, ``no_rot``, ``no_gar``) or use
our earlier uniform-grid DSQ (``uniform_dsq``). ``--seeds`` are calibration draws (protocol rule;
seed 0 is the shipped file). Writes ``benchmarks/results/d2quant_<date>.json`` and
``benchmarks/results/d2quant.png``, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"d2quant": "D²Quant", "gptq": "GPTQ", "gptq_rot": "GPTQ†", "gptaq": "GPTAQ",
            "gptaq_rot": "GPTAQ†", "awq": "AWQ", "mse_gptq": "GPTQ (act-order, MSE; shipped)",
            "no_dsq": "D²Quant − DSQ", "no_dac": "D²Quant − DAC", "no_rot": "D²Quant − rotation",
            "no_gar": "D²Quant − GAR", "uniform_dsq": "D²Quant, uniform DSQ"}
BASE = {"gptq": "d2q_gptq", "gptq_rot": "d2q_gptq_rot", "gptaq": "d2q_gptaq",
        "gptaq_rot": "d2q_gptaq_rot", "awq": "awq", "mse_gptq": "gptq"}


def variant_recipe(variant: str, bits: int) -> dict:
    from jaxquant.recipes import load_recipe

    if variant in BASE:
        return load_recipe(f"{BASE[variant]}_w{bits}_g64").to_dict()
    d = load_recipe(f"d2quant_w{bits}_g64").to_dict()
    d["name"] = f"{variant}_w{bits}_g64"
    down, rest = d["rules"]
    if variant == "no_dsq":
        d["rules"] = [rest]
    elif variant == "no_dac":
        d["dac"] = None
    elif variant == "no_rot":
        d.pop("rotation")
    elif variant == "no_gar":
        for r in d["rules"]:
            r["options"]["gar"] = False
    elif variant == "uniform_dsq":
        d["rules"] = [{"pattern": down["pattern"], "algorithm": "dsq_uniform",
                       "spec": {"bits": bits, "group_size": 64, "symmetric": False},
                       "options": {"act_order": False}}, rest]
    elif variant != "d2quant":
        raise SystemExit(f"unknown variant {variant!r}; known: {list(VARIANTS)}")
    if d.get("dac") is None:
        d.pop("dac", None)
    return d


def run_one(variant: str, bits: int, windows: int, calib_path: str | None = None) -> dict:
    from jaxquant import data as jdata
    from jaxquant import eval as jeval
    from jaxquant import models
    from jaxquant.calibration.engine import calibrate
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.models.loading import adapter_for
    from jaxquant.recipes import load_recipe

    d = jdata.data_dir()
    if d is None:
        raise SystemExit("set $JAXQUANT_DATA to the protocol data directory")
    path = resolve_model_path("smollm2-135m")
    calib = np.load(calib_path or os.path.join(d, "smollm2_wikitext2_valid_calib_32x512.npy"))
    recipe = load_recipe(variant_recipe(variant, bits))
    t0 = time.perf_counter()
    res = calibrate(adapter_for(path), recipe, calib, progress=False)
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del calib
    fp = models.load(path)
    w = np.load(os.path.join(d, "smollm2_wikitext2_test_eval_64x512.npy"))[:windows]
    r = jeval.kl_divergence(jeval.model_logits_fn(fp.config, fp.params),
                            jeval.model_logits_fn(res.config, res.params), w, batch_size=1,
                            progress=False)
    # held-out validation windows: what settings may be chosen on (never the test windows)
    held = jdata.heldout_windows(fp.tokenizer, 16, 512)
    v = jeval.perplexity(jeval.model_logits_fn(res.config, res.params), held, batch_size=1,
                         progress=False)
    layers = {}
    for rep in res.report:
        kind = rep.layer.split("/", 2)[-1]  # "layers/<b>/<linear>" or "final_norm"
        layers.setdefault(kind, []).append(rep.rel_error)
    return {"variant": variant, "bits": bits, "group": 64, "calib_seconds": round(secs, 1),
            "peak_rss_mib": round(rss, 1), "ppl": r["ppl"], "kl": r["kl"],
            "ppl_fp": r["ppl_ref"], "windows": windows, "ppl_heldout_valid": v["ppl"],
            "mean_rel_error": {k: float(np.mean(v)) for k, v in layers.items()},
            "rel_error_by_block": {k: [float(x) for x in v] for k, v in layers.items()}}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = sorted({r["bits"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, 2 * len(bits), figsize=(5 * 2 * len(bits), 4))
    for j, b in enumerate(bits):
        rs = [r for r in rows if r["bits"] == b]
        names = [VARIANTS[r["variant"]] for r in rs]
        for ax, key, label in ((axes[2 * j], "ppl", "PPL (64x512)"),
                               (axes[2 * j + 1], "kl", "KL(fp || q), nats/token")):
            ax.bar(names, [r[key] for r in rs],
                   color=["#d62728" if r["variant"] == "d2quant" else "#7f7f7f" for r in rs])
            ax.set_xticks(range(len(names)), names, fontsize=7)
            ax.set_title(f"SmolLM2-135M W{b}g64: {label}")
            ax.tick_params(axis="x", rotation=30)
            if key == "ppl":
                ax.axhline(rs[0]["ppl_fp"], ls="--", c="k", lw=0.8, label="fp")
                ax.set_yscale("log")
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    out = ["| scheme | method | seed | PPL | KL(fp‖q) | held-out valid PPL | calib s | "
           "peak RSS MiB | "
           "down_proj rel err (mean) | post-attn mean shift ‖μ‖/rms (mean) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        me = r["mean_rel_error"]
        shift = me.get("post_attention_layernorm")
        out.append(f"| W{r['bits']}g64 | {VARIANTS[r['variant']]} | {r.get('seed', 0)} | "
                   f"{r['ppl']:,.2f} | "
                   f"{r['kl']:.4f} | {r.get('ppl_heldout_valid', float('nan')):,.2f} | "
                   f"{r['calib_seconds']:.0f} | {r['peak_rss_mib']:.0f} | "
                   f"{me.get('mlp/down_proj', float('nan')):.4f} | "
                   f"{'-' if shift is None else f'{shift:.4f}'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="3,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seeds", default="0", help="calibration draws (protocol rule)")
    ap.add_argument("--calib", default=None, help="(with --one) .npy of calibration windows")
    ap.add_argument("--one", action="store_true", help="run a single variant in this process")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.variants, int(args.bits), args.windows, args.calib)))
        return
    from bench_like_for_like import calib_files

    seeds = [int(x) for x in args.seeds.split(",")]
    files = calib_files(sorted(set(seeds)))
    rows = []
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"d2quant_{date}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for b in [int(x) for x in args.bits.split(",")]:
        for v, seed in [(v, s) for v in args.variants.split(",") for s in seeds]:
            cmd = [sys.executable, __file__, "--one", "--bits", str(b), "--variants", v,
                   "--windows", str(args.windows), "--calib", files[seed]]
            print(f"# {VARIANTS[v]} W{b}g64 seed {seed} ...", file=sys.stderr, flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{v} W{b} failed")
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]) | {"seed": seed})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            with open(out, "w") as f:  # partial results survive an interruption
                json.dump({"date": date, "rows": rows}, f, indent=1)
    plot(rows, os.path.splitext(out)[0] + ".png")  # the plot beside its JSON
    print(table(rows))


if __name__ == "__main__":
    main()
