"""Side-by-side: jaxquant vs llm-compressor on SmolLM2-135M, WikiText-2 (protocol.md), CPU, f32.

Each (engine, algorithm, bits) runs in its own process, one after the other (never two at once),
so calibration wall time and peak RSS after calibration are comparable. Prints a table and writes
benchmarks/results/peer_<date>.json.

    make peer-venv          # llm-compressor in .venv-peer (its own transformers pin)
    .venv/bin/python benchmarks/bench_vs_llmcompressor.py --algos rtn,gptq,awq --bits 4,3,2 \
        --peer-python .venv-peer/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd: list[str]) -> dict:
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algos", default="rtn,gptq,awq")
    ap.add_argument("--peer-algos", default=None, help="default: same as --algos")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--peer-python", default=None, help="python of the llm-compressor venv")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    from jaxquant.data import data_dir
    from jaxquant.models.assets import resolve_model_path

    data = data_dir()
    gguf = resolve_model_path("smollm2-135m")
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for algo in args.algos.split(","):
            rows.append(run([sys.executable, os.path.join(HERE, "jaxquant_run.py"), "--algo",
                             algo, "--bits", str(bits), "--group", str(args.group),
                             "--windows", str(args.windows)]) | {"algo": algo, "bits": bits,
                                                                 "engine": "jaxquant"})
            print(json.dumps(rows[-1]), flush=True)
        if args.peer_python:
            for algo in (args.peer_algos or args.algos).split(","):
                rows.append(run([args.peer_python, os.path.join(HERE, "peers",
                                 "llmcompressor_run.py"), "--algo", algo, "--bits", str(bits),
                                 "--group", str(args.group), "--gguf", gguf, "--data", data,
                                 "--windows", str(args.windows)]) | {"algo": algo, "bits": bits,
                                                                     "engine": "llm-compressor"})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M, WikiText-2 quick eval {args.windows}x512, calib 32x512, g{args.group}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}")
    print(f"  {'scheme':<8} {'algo':<5} {'engine':<15} {'PPL':>12} {'calib s':>8} {'RSS MiB':>8}")
    for r in rows:
        ppl = r.get("ppl")
        print(f"  W{r['bits']}g{args.group:<4} {r['algo']:<5} {r['engine']:<15} "
              f"{(f'{ppl:.2f}' if ppl else r.get('error', '?')):>12} "
              f"{r.get('calib_seconds', ''):>8} {r.get('peak_rss_mib', ''):>8}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = os.path.join(HERE, "results", f"peer_{datetime.date.today().isoformat()}.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
