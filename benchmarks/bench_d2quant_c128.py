"""Does the paper's calibration setting (128 windows x 2048 tokens) fit on this machine?

Runs the ``d2quant_w{b}_g64_c128x2048`` recipe on SmolLM2-135M for the first ``--blocks`` blocks
(the engine holds the same buffers for every block of a decoder, so the peak of the first blocks
is the peak of the run), then stops. Prints a Markdown table with the peak resident memory, the
engine's stream buffers computed from the shapes, and the per-block time extrapolated to all
blocks, and writes ``benchmarks/results/d2quant_c128x2048_<date>.json``.

    JAXQUANT_DATA=../shared/data .venv/bin/python benchmarks/bench_d2quant_c128.py --bits 3 --blocks 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


class _Stop(Exception):
    pass


def main() -> None:
    from jaxquant import data as jdata
    from jaxquant.calibration.engine import calibrate
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.models.loading import adapter_for, load_tokenizer
    from jaxquant.recipes import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=2, help="stop after this many blocks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if jdata.data_dir() is None:
        raise SystemExit("set $JAXQUANT_DATA to the protocol data directory")
    recipe = load_recipe(f"d2quant_w{args.bits}_g64_c128x2048")
    n, T = int(recipe.calib["n_samples"]), int(recipe.calib["seqlen"])
    path = resolve_model_path("smollm2-135m")
    adapter = adapter_for(path)
    calib = jdata.calib_windows(load_tokenizer(path), n, T, seed=int(recipe.calib["seed"]))
    d = adapter.config.hidden_size
    L = adapter.num_blocks
    times: list[float] = []
    t0 = time.perf_counter()

    def on_block_end(b, info):
        times.append(time.perf_counter() - t0 - sum(times))
        print(f"# block {b}: {times[-1]:.1f} s, peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)
        if b + 1 >= args.blocks:
            raise _Stop

    try:
        calibrate(adapter, recipe, calib, progress=False, on_block_end=on_block_end)
    except _Stop:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    stream_gib = n * T * d * 4 / 2**30
    per_block = float(np.mean(times[1:] if len(times) > 1 else times))
    row = {"recipe": recipe.name, "n_samples": n, "seqlen": T, "blocks_run": len(times),
           "blocks_total": L, "peak_rss_gib": round(rss, 2),
           "one_stream_gib": round(stream_gib, 3),
           "block_seconds": [round(x, 1) for x in times],
           "est_total_minutes": round((times[0] + per_block * (L - 1)) / 60, 1),
           "machine": "2-core Xeon (AVX2), 24 GiB, CPU, f32"}
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"d2quant_c128x2048_{date}.json")
    with open(out, "w") as f:
        json.dump({"date": date, "rows": [row]}, f, indent=1)
    print("| recipe | calibration | blocks run | peak RSS GiB | one stream GiB | s/block | "
          "est. full run min |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {row['recipe']} | {n}x{T} | {len(times)}/{L} | {row['peak_rss_gib']} | "
          f"{row['one_stream_gib']} | {per_block:.1f} | {row['est_total_minutes']} |")


if __name__ == "__main__":
    main()
