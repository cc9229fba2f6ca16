"""Calibration time of the D²Quant recipe against the plain GPTQ recipes, in one process, one
after another, on SmolLM2-135M with the protocol's 32x512 calibration windows (seed 0), with the
engine's per-phase breakdown (read / statistics / algorithm / propagation summed over blocks) and
the stream passes each block needs.

    JAXQUANT_DATA=../shared/data .venv/bin/python benchmarks/bench_d2quant_time.py --bits 3

Recipes: ``mse_gptq`` = the shipped ``gptq_w{b}_g64`` (act-order, static groups, MSE grid 20),
``gptq`` = the paper's GPTQ baseline with D²Quant's observers (``d2q_gptq_w{b}_g64``: no
act-order, dynamic groups, QuaRot's MSE grid 80) and ``d2quant`` = ``d2quant_w{b}_g64``. The
first recipe also pays the process's one-time compilations of shared functions; the order puts
the plain recipes first so that D²Quant is not the one flattered. Writes
``benchmarks/results/d2quant_time_<date>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> None:
    from bench_d2quant import VARIANTS, variant_recipe

    from jaxquant import data as jdata
    from jaxquant.calibration.engine import calibrate
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.models.loading import adapter_for
    from jaxquant.recipes import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--variants", default="mse_gptq,gptq,d2quant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    d = jdata.data_dir()
    if d is None:
        raise SystemExit("set $JAXQUANT_DATA to the protocol data directory")
    calib = np.load(os.path.join(d, "smollm2_wikitext2_valid_calib_32x512.npy"))
    path = resolve_model_path("smollm2-135m")
    rows = []
    for v in args.variants.split(","):
        recipe = load_recipe(variant_recipe(v, args.bits))
        t0 = time.perf_counter()
        res = calibrate(adapter_for(path), recipe, calib, progress=False)
        secs = time.perf_counter() - t0
        phases: dict[str, float] = {}
        for br in res.blocks:
            for k, x in dataclasses.asdict(br).items():
                if k != "block":
                    phases[k] = phases.get(k, 0) + x
        rows.append({"variant": v, "recipe": recipe.name, "bits": args.bits,
                     "calib_seconds": round(secs, 1),
                     "phases": {k: round(x, 1) for k, x in phases.items()}})
        print(f"# {v}: {secs:.1f} s", file=sys.stderr, flush=True)
    base = {r["variant"]: r["calib_seconds"] for r in rows}
    for r in rows:
        for b in ("mse_gptq", "gptq"):
            if b in base:
                r[f"ratio_to_{b}"] = round(r["calib_seconds"] / base[b], 3)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"d2quant_time_{date}.json")
    with open(out, "w") as f:
        json.dump({"date": date, "machine": "2-core AVX2 CPU, float32", "rows": rows}, f,
                  indent=1)
    print("| recipe | calib s | × shipped GPTQ | × GPTQ (same observers) | statistics s | "
          "algorithm s | propagation s | passes/block |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["phases"]
        print(f"| {VARIANTS[r['variant']]} (`{r['recipe']}`) | {r['calib_seconds']:.1f} | "
              f"{r.get('ratio_to_mse_gptq', float('nan')):.2f} | "
              f"{r.get('ratio_to_gptq', float('nan')):.2f} | {p['statistics']:.1f} | "
              f"{p['algorithm']:.1f} | {p['propagation']:.1f} | "
              f"{p['passes'] / len(res.blocks):.0f} |")


if __name__ == "__main__":
    main()
