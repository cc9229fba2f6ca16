"""Like-for-like GPTQ race with llm-compressor (protocol.md, "Comparing like with like").

Both sides: asymmetric int weights, group 64, blocksize 128, damp 0.01, act-order static, group
scales by an MSE grid search over the same 20 shrink ratios 1.00, 0.99, ..., 0.81 (jaxquant:
``scale_method: mse``, clip_ratio 0.81, mse_grid 20, norm 2.4; llm-compressor: ``observer: mse``,
maxshrink 0.2, grid 100, norm 2.4), the same calibration windows. W4 on the shipped seed-0 windows; W3 and W2 on 3 calibration draws (seeds 0,
1, 2 of the protocol's rule). One process per run, never two at once, so calibration wall time and
peak RSS are each run's own. Prints a table (mean and spread) and writes
benchmarks/results/like_for_like_<date>.json.

    make peer-venv
    .venv/bin/python benchmarks/bench_like_for_like.py --peer-python .venv-peer/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

import numpy as np
from bench_vs_llmcompressor import run  # one subprocess runner for both races

HERE = os.path.dirname(os.path.abspath(__file__))


def calib_files(seeds: list[int]) -> dict[int, str]:
    """The protocol's calibration windows for each seed, as .npy files (seed 0: the shipped one)."""
    sys.path.insert(0, os.path.dirname(HERE))
    from jaxquant.data import calib_windows, data_dir
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.models.loading import load_tokenizer

    d = data_dir()
    shipped = os.path.join(d, "smollm2_wikitext2_valid_calib_32x512.npy")
    out = {}
    tok = None
    for s in seeds:
        if s == 0:
            out[s] = shipped
            continue
        tok = tok or load_tokenizer(resolve_model_path("smollm2-135m"))
        path = os.path.join(tempfile.gettempdir(), f"smollm2_wikitext2_valid_calib_32x512_s{s}.npy")
        w = calib_windows(tok, 32, 512, seed=s)
        np.save(path, w)
        out[s] = path
    if 0 in seeds and tok is not None:  # the rule reproduces the shipped file
        assert np.array_equal(calib_windows(tok, 32, 512, seed=0), np.load(shipped))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws at W3 and W2")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--peer-python", default=None)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--reuse-peer", default=None,
                    help="a like_for_like JSON whose llm-compressor rows are kept (the peer's "
                         "code and data are unchanged); the peer runs only where it has no row")
    ap.add_argument("--compile-cache", default=None,
                    help="XLA compilation cache for jaxquant (default: none, a cold start)")
    args = ap.parse_args()
    from jaxquant.data import data_dir
    from jaxquant.models.assets import resolve_model_path

    bits_list = [int(b) for b in args.bits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    files = calib_files(sorted(set(seeds) | {0}))
    gguf = resolve_model_path("smollm2-135m")
    rows = []
    kept = []
    if args.reuse_peer:
        with open(args.reuse_peer) as f:
            kept = [r for r in json.load(f)["rows"] if r.get("engine") == "llm-compressor"
                    and "ppl" in r]
    cache = ["--compile-cache", args.compile_cache] if args.compile_cache else []
    for bits in bits_list:
        for seed in (seeds if bits < 4 else [0]):
            base = {"bits": bits, "seed": seed}
            rows.append(run([sys.executable, os.path.join(HERE, "jaxquant_run.py"), "--algo",
                             "gptq", "--bits", str(bits), "--group", "64", "--windows",
                             str(args.windows), "--calib", files[seed], *cache]) | base)
            print(json.dumps(rows[-1]), flush=True)
            old = [r for r in kept if r["bits"] == bits and r["seed"] == seed]
            if old:
                rows.append(old[0] | {"reused_from": os.path.basename(args.reuse_peer)})
                print(json.dumps(rows[-1]), flush=True)
            elif args.peer_python and not args.skip_peer:
                rows.append(run([args.peer_python, os.path.join(HERE, "peers",
                                 "llmcompressor_run.py"), "--algo", "gptq", "--bits", str(bits),
                                 "--group", "64", "--gguf", gguf, "--data", data_dir(),
                                 "--windows", str(args.windows), "--calib", files[seed],
                                 "--observer", "mse", "--actorder", "static"]) | base)
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M GPTQ g64, like for like (MSE group scales, act-order static), "
          f"WikiText-2 quick eval {args.windows}x512, calib 32x512, {os.cpu_count()} CPUs, "
          f"{platform.machine()}")
    print(f"  {'scheme':<7} {'engine':<15} {'seeds':<6} {'PPL mean':>9} {'min':>9} {'max':>9} "
          f"{'calib s':>8} {'RSS MiB':>8}")
    summary = []
    for bits in bits_list:
        for eng in ("jaxquant", "llm-compressor"):
            rs = [r for r in rows if r["bits"] == bits and r.get("engine") == eng and "ppl" in r]
            if not rs:
                continue
            p = np.array([r["ppl"] for r in rs])
            t = np.mean([r["calib_seconds"] for r in rs])
            m = max(r["peak_rss_mib"] for r in rs)
            summary.append({"bits": bits, "engine": eng, "n": len(rs), "ppl_mean": p.mean(),
                            "ppl_min": p.min(), "ppl_max": p.max(), "calib_seconds_mean": t,
                            "peak_rss_mib_max": m})
            print(f"  W{bits}g64  {eng:<15} {len(rs):<6} {p.mean():>9.2f} {p.min():>9.2f} "
                  f"{p.max():>9.2f} {t:>8.1f} {m:>8.0f}")
    for bits in bits_list:
        s = {x["engine"]: x for x in summary if x["bits"] == bits}
        if len(s) == 2:
            jq, pe = s["jaxquant"], s["llm-compressor"]
            print(f"  W{bits}: PPL ratio jaxquant/peer {jq['ppl_mean'] / pe['ppl_mean']:.3f}, "
                  f"calibration time ratio "
                  f"{jq['calib_seconds_mean'] / pe['calib_seconds_mean']:.2f}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = os.path.join(HERE, "results", f"like_for_like_{datetime.date.today().isoformat()}.json")
    with open(out, "w") as f:
        json.dump({"rows": rows, "summary": summary, "cpus": os.cpu_count(),
                   "machine": platform.machine()}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
