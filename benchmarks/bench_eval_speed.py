"""PPL-evaluation throughput: jaxquant (JAX/XLA) vs transformers (torch), same CPU, float32.

Both engines score the same SmolLM2-135M protocol eval windows (seqlen 512) after one warm-up
batch; tokens/s counts predicted positions. Every configuration runs in its own process (a JAX
process's device count is fixed at start-up), and the configurations are interleaved for
``--reps`` rounds so that a slow phase of a shared machine hits all of them; the table reports
each one's median and best round.

Configurations:
  * jaxquant, 1 device, batch 1: XLA:CPU with its multi-threaded Eigen matmuls.
  * jaxquant, N CPU devices, data-parallel: the host split into N single-threaded JAX devices
    (``jax_num_cpu_devices``), a batch of N windows sharded over a ``data`` mesh axis, what
    ``jaxquant --cpu-devices N eval`` does.
  * transformers / torch at batch 1 and 2, ``torch.get_num_threads()`` threads (sdpa attention).

    .venv/bin/python benchmarks/bench_eval_speed.py --windows 16 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np


def _windows(n: int) -> np.ndarray:
    from jaxquant import data as jdata

    d = jdata.data_dir()
    if d is None:
        raise SystemExit("set $JAXQUANT_DATA to the protocol data directory")
    return np.load(os.path.join(d, "smollm2_wikitext2_test_eval_64x512.npy"))[:n]


def worker_jax(path: str, windows: np.ndarray, devices: int, batch: int) -> dict:
    if devices > 1:
        from jaxquant.cli.main import configure_cpu_devices

        configure_cpu_devices(devices)
    import jax
    from jax.sharding import Mesh

    from jaxquant import eval as jeval
    from jaxquant import models

    m = models.load(path)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",)) if devices > 1 else None
    fn = jeval.model_logits_fn(m.config, m.params)
    jeval.perplexity(fn, windows[:batch], batch_size=batch, progress=False, mesh=mesh)  # compile
    r = jeval.perplexity(fn, windows, batch_size=batch, progress=False, mesh=mesh)
    return {"tokens_per_s": r["tokens"] / r["seconds"], "ppl": r["ppl"],
            "info": f"jax {jax.__version__}, {len(jax.devices())} device(s)"}


def worker_torch(path: str, windows: np.ndarray, batch: int) -> dict:
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()

    def run(ws):
        total, count = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(ws), batch):
                t = torch.as_tensor(ws[i : i + batch], dtype=torch.long)
                lg = hf(t).logits[:, :-1]
                nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]),
                                                        t[:, 1:].reshape(-1), reduction="sum")
                total += float(nll)
                count += t.shape[0] * (t.shape[1] - 1)
        return total, count

    run(windows[:batch])
    t0 = time.perf_counter()
    total, count = run(windows)
    return {"tokens_per_s": count / (time.perf_counter() - t0),
            "ppl": float(np.exp(total / count)),
            "info": f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                    f"attn {hf.config._attn_implementation}"}


CONFIGS = {  # name -> worker argv
    "jaxquant, 1 device, batch 1": ["jax", "1", "1"],
    "jaxquant, {n} CPU devices, data-parallel": ["jax", "{n}", "{n}"],
    "torch, batch 1": ["torch", "0", "1"],
    "torch, batch 2": ["torch", "0", "2"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cpu-devices", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from jaxquant.models.assets import resolve_model_path

    path = resolve_model_path(args.model)
    if args.worker:
        kind, devices, batch = args.worker
        w = _windows(args.windows)
        r = (worker_jax(path, w, int(devices), int(batch)) if kind == "jax"
             else worker_torch(path, w, int(batch)))
        print("RESULT " + json.dumps(r))
        return

    n = args.cpu_devices
    configs = {k.format(n=n): [a.format(n=n) for a in v] for k, v in CONFIGS.items()}
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    for rep in range(args.reps):
        for name, argv in configs.items():
            out = subprocess.run(
                [sys.executable, __file__, "--windows", str(args.windows), "--model", args.model,
                 "--worker", *argv], capture_output=True, text=True, check=True).stdout
            r = json.loads(out.split("RESULT ", 1)[1])
            runs[name].append(r)
            print(f"  round {rep + 1}: {name:<40} {r['tokens_per_s']:8.1f} tokens/s", flush=True)

    rows = []
    for name, rs in runs.items():
        tps = [r["tokens_per_s"] for r in rs]
        rows.append({"engine": name, "median": statistics.median(tps), "best": max(tps),
                     "ppl": rs[0]["ppl"], "info": rs[0]["info"]})
    best_jax = max(r["median"] for r in rows if r["engine"].startswith("jaxquant"))
    best_torch = max(r["median"] for r in rows if r["engine"].startswith("torch"))
    print(f"\nPPL eval throughput, {args.windows}x512 windows, float32, {args.reps} interleaved "
          f"rounds, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"  {'engine':<40} {'median tok/s':>12} {'best tok/s':>10} {'PPL':>9}  runtime")
    for r in rows:
        print(f"  {r['engine']:<40} {r['median']:>12.1f} {r['best']:>10.1f} {r['ppl']:>9.3f}  "
              f"{r['info']}")
    print(f"  best jaxquant / best torch (medians): {best_jax / best_torch:.2f}x")
    summary = {"rows": rows, "speedup": best_jax / best_torch, "windows": args.windows,
               "reps": args.reps, "date": time.strftime("%Y-%m-%d")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
