"""Packed low-bit matmul against the dense matmul, on the linear shapes of Llama-3-8B and Qwen3-8B.

    .venv/bin/python benchmarks/kernels.py                 # CPU: the XLA path, float32
    python benchmarks/kernels.py --bits 4,2 --group 128    # on a GPU: the Pallas GPU kernel, bf16

For each (model, linear, M) it prints the time of the dense matmul (bf16 on an accelerator,
float32 on CPU, where bf16 is emulated), the time of the quantized path the backend uses (CPU:
XLA dequantize+matmul; CUDA: the Pallas Triton kernel; TPU: the Pallas Mosaic kernel), the
speed-up, the bytes the quantized matmul must move (packed weights + scales + zeros + x + y) per
second, and that as a fraction of the memory roofline: H100 3.35 TB/s, H200 4.8 TB/s, TPU v5e
819 GB/s, CPU: a measured copy bandwidth. ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {  # name: [(linear, K, N)]
    "Llama-3-8B": [("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 4096, 1024),
                   ("gate_proj/up_proj", 4096, 14336), ("down_proj", 14336, 4096)],
    "Qwen3-8B": [("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 4096, 1024),
                 ("gate_proj/up_proj", 4096, 12288), ("down_proj", 12288, 4096)],
}
ROOFLINE = {"H100": 3.35e12, "H200": 4.8e12, "v5e": 819e9}


def _device_roofline() -> tuple[str, float]:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", "") or ""
    for name, bw in ROOFLINE.items():
        if name.lower() in kind.lower().replace(" ", ""):
            return kind, bw
    if d.platform == "cpu":  # a copy bandwidth measured now stands in for the roofline
        a = jnp.ones((64 * 1024 * 1024,), jnp.float32)
        f = jax.jit(lambda a: a + 1.0)
        f(a).block_until_ready()
        t = min(_time(lambda: f(a)) for _ in range(3))
        return f"cpu ({d.device_kind})", 2 * a.nbytes / t
    return kind, float("nan")


def _time(fn, reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def bench(fn, *args, min_time: float = 0.2) -> float:
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))  # compile
    reps = 1
    while True:
        t = _time(lambda: f(*args), reps)
        if t * reps >= min_time or reps >= 1000:
            return t
        reps *= 4


def main() -> None:
    import jaxquant as jq
    from jaxquant.kernels.dispatch import GPU_MAX_M, quant_matmul

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--ms", default="1,16,64,256")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    platform = jax.default_backend()
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    kind, bw = _device_roofline()
    impl = {"cpu": "XLA dequant+matmul", "gpu": "Pallas GPU (Triton)",
            "tpu": "Pallas TPU (Mosaic)"}.get(platform, platform)
    print(f"# device: {kind}; dense {jnp.dtype(dtype).name}; quantized path: {impl}; "
          f"roofline {bw / 1e9:,.0f} GB/s")
    print("| model | linear | K x N | M | bits | dense ms | quant ms | speed-up | GB/s | "
          "% roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    rng = np.random.default_rng(0)
    for model in args.models.split(","):
        for name, k, n in SHAPES[model]:
            w = jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02)
            wd = w.astype(dtype)
            qas = {b: jq.quantize(w, jq.QuantSpec(bits=b, group_size=args.group))
                   for b in map(int, args.bits.split(","))}
            for m in map(int, args.ms.split(",")):
                x = jnp.asarray(rng.standard_normal((m, k), np.float32)).astype(dtype)
                t_dense = bench(jnp.matmul, x, wd)
                for b, qa in qas.items():
                    t_q = bench(quant_matmul, x, qa)
                    impl_row = impl
                    if platform == "gpu" and m > GPU_MAX_M:
                        impl_row = "XLA dequant+matmul (dispatch: prefill)"
                    moved = qa.nbytes + x.nbytes + m * n * x.dtype.itemsize
                    row = {"model": model, "linear": name, "k": k, "n": n, "m": m, "bits": b,
                           "group": args.group, "dense_ms": t_dense * 1e3, "quant_ms": t_q * 1e3,
                           "speedup": t_dense / t_q, "gbps": moved / t_q / 1e9,
                           "roofline_frac": moved / t_q / bw, "device": kind, "impl": impl_row}
                    rows.append(row)
                    print(f"| {model} | {name} | {k}x{n} | {m} | W{b}g{args.group} | "
                          f"{row['dense_ms']:.3f} | {row['quant_ms']:.3f} | "
                          f"{row['speedup']:.2f}x | {row['gbps']:.1f} | "
                          f"{100 * row['roofline_frac']:.1f}% |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": kind, "platform": platform, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
