"""PPL-evaluation throughput: jaxquant (JAX/XLA) vs transformers (torch), same CPU, float32.

Both evaluate the same SmolLM2-135M windows (protocol eval windows, batch 1, seqlen 512) after one
warm-up window; tokens/s counts predicted positions. Prints a table and a JSON line.

    .venv/bin/python benchmarks/bench_eval_speed.py --windows 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from jaxquant import data as jdata
from jaxquant import eval as jeval
from jaxquant import models
from jaxquant.models.assets import resolve_model_path


def bench_jax(path: str, windows: np.ndarray) -> tuple[float, float]:
    m = models.load(path)
    fn = jeval.model_logits_fn(m.config, m.params)
    jeval.perplexity(fn, windows[:1], batch_size=1, progress=False)  # compile
    r = jeval.perplexity(fn, windows, batch_size=1, progress=False)
    return r["tokens"] / r["seconds"], r["ppl"]


def bench_torch(path: str, windows: np.ndarray) -> tuple[float, float]:
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()

    def run(ws):
        total, count = 0.0, 0
        with torch.inference_mode():
            for w in ws:
                t = torch.as_tensor(w[None], dtype=torch.long)
                lg = hf(t).logits[:, :-1]
                nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]),
                                                        t[:, 1:].reshape(-1), reduction="sum")
                total += float(nll)
                count += t.shape[1] - 1
        return total, count

    run(windows[:1])
    t0 = time.perf_counter()
    total, count = run(windows)
    return count / (time.perf_counter() - t0), float(np.exp(total / count))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    import torch

    path = resolve_model_path(args.model)
    d = jdata.data_dir()
    if d is None:
        raise SystemExit("set $JAXQUANT_DATA to the protocol data directory")
    windows = np.load(os.path.join(d, "smollm2_wikitext2_test_eval_64x512.npy"))[: args.windows]
    jtps, jppl = bench_jax(path, windows)
    ttps, tppl = bench_torch(path, windows)
    print(f"\nPPL eval throughput, {args.windows}x512 windows, float32, batch 1, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"torch threads {torch.get_num_threads()}, jax {jax.__version__}")
    print(f"  {'engine':<24} {'tokens/s':>10} {'PPL':>9}")
    print(f"  {'jaxquant (XLA CPU)':<24} {jtps:>10.1f} {jppl:>9.3f}")
    print(f"  {'transformers (torch)':<24} {ttps:>10.1f} {tppl:>9.3f}")
    print(f"  speed-up: {jtps / ttps:.2f}x")
    print(json.dumps({"jax_tokens_per_s": jtps, "torch_tokens_per_s": ttps,
                      "speedup": jtps / ttps, "jax_ppl": jppl, "torch_ppl": tppl}))


if __name__ == "__main__":
    main()
