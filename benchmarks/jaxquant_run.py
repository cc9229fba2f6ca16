"""jaxquant side of the peer comparison: one scheme per process (calibration wall time and peak
RSS are the calibration's own), then the protocol's quick-eval perplexity.

    .venv/bin/python benchmarks/jaxquant_run.py --algo gptq --bits 3 --group 64

Prints one JSON line: algo, bits, group, calib_seconds, peak_rss_mib (after calibration), ppl.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", choices=["rtn", "gptq", "awq"], required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib", default=None, help=".npy of calibration windows (default: the "
                    "protocol's seed-0 file)")
    ap.add_argument("--recipe", default=None, help="default: {algo}_w{bits}_g{group}")
    ap.add_argument("--compile-cache", default=None, help="persistent XLA compilation cache "
                    "directory (default: none, every program is compiled: a cold start)")
    args = ap.parse_args()
    if args.compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    import protocol_data

    from jaxquant import eval as jeval
    from jaxquant.calibration.engine import calibrate
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.models.loading import adapter_for
    from jaxquant.recipes import load_recipe

    path = resolve_model_path(args.model)
    import numpy as np

    calib = (np.load(args.calib, allow_pickle=False) if args.calib
             else protocol_data.load(protocol_data.CALIB))
    recipe = load_recipe(args.recipe or f"{args.algo}_w{args.bits}_g{args.group}")
    t0 = time.perf_counter()
    res = calibrate(adapter_for(path), recipe, calib, progress=False)
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    windows = protocol_data.load(protocol_data.TEST)[: args.windows]
    ppl = jeval.perplexity(jeval.model_logits_fn(res.config, res.params), windows,
                           batch_size=1, progress=False)["ppl"]
    phases = {p: round(sum(getattr(b, p) for b in res.blocks), 2)
              for p in ("read", "statistics", "algorithm", "propagation", "checkpoint")}
    print(json.dumps({"engine": "jaxquant", "algo": args.algo, "bits": args.bits,
                      "group": args.group, "recipe": recipe.name,
                      "compile_cache": bool(args.compile_cache), "calib_seconds": round(secs, 1),
                      "phase_seconds": phases, "peak_rss_mib": round(rss, 1), "ppl": ppl}))


if __name__ == "__main__":
    main()
