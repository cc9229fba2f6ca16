"""Sampling speed of the trained Fashion-MNIST DiT: jaxquant's jitted DDIM loop against diffusers
(``DDIMScheduler`` driving ``DiTTransformer2DModel`` in torch, the DiTPipeline loop) on this CPU,
in the same run, same model directory, 50 DDIM steps, batch 64, float32, classifier-free guidance
(a batch of 128 through the model per step). Each side is timed after one warm-up run (jaxquant:
compile; torch: first-call allocations), best of ``--repeats``.

    .venv/bin/python benchmarks/bench_dit_speed.py [--model DIR]

Writes ``benchmarks/results/dit_speed_<date>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    import jax
    import jax.numpy as jnp

    from jaxquant import models
    from jaxquant.diffusion.calibration import sample_dit
    from jaxquant.diffusion.schedules import NoiseSchedule
    from jaxquant.diffusion.train_fmnist import default_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_dir())
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tdir = os.path.join(args.model, "transformer")
    with open(os.path.join(args.model, "scheduler", "scheduler_config.json")) as f:
        sched_cfg = json.load(f)
    m = models.load(tdir)
    cfg = m.config
    labels = np.arange(args.batch) % cfg.num_classes
    x_T = np.random.default_rng(0).standard_normal(
        (args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)).astype(np.float32)

    sched = NoiseSchedule.from_config(sched_cfg)
    f = jax.jit(lambda xt, y: sample_dit(cfg, m.params, sched, y, steps=args.steps,
                                         guidance=args.guidance, x_T=xt))
    ours = np.asarray(f(jnp.asarray(x_T), jnp.asarray(labels)))  # compile
    t_jax = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(jnp.asarray(x_T), jnp.asarray(labels)))
        t_jax.append(time.perf_counter() - t0)

    import diffusers
    import torch

    dm = diffusers.DiTTransformer2DModel.from_pretrained(tdir).eval()
    ds = diffusers.DDIMScheduler.from_config(
        {k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    null = cfg.num_classes

    def torch_sample():
        ds.set_timesteps(args.steps)
        x = torch.from_numpy(x_T)
        y = torch.from_numpy(labels)
        yin = torch.cat([y, torch.full_like(y, null)])
        with torch.no_grad():
            for t in ds.timesteps:
                out = dm(torch.cat([x, x]), timestep=t.expand(2 * len(y)),
                         class_labels=yin).sample[:, :cfg.in_channels]
                c, u = out.chunk(2)
                x = ds.step(u + args.guidance * (c - u), t, x).prev_sample
        return x.numpy()

    ref = torch_sample()
    t_torch = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        torch_sample()
        t_torch.append(time.perf_counter() - t0)
    row = {"steps": args.steps, "batch": args.batch, "guidance": args.guidance,
           "jaxquant_s": round(min(t_jax), 3), "diffusers_torch_s": round(min(t_torch), 3),
           "speedup": round(min(t_torch) / min(t_jax), 2),
           "max_abs_diff_samples": float(np.abs(ours - ref).max()),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "jax": jax.__version__,
           "machine": "2-core Xeon (AVX2), CPU, float32"}
    date = datetime.date.today().isoformat()
    with open(os.path.join(HERE, "results", f"dit_speed_{date}.json"), "w") as fh:
        json.dump({"date": date, "rows": [row]}, fh, indent=1)
    print("| sampler | steps | batch (x2 CFG) | seconds | speed vs diffusers |")
    print("|---|---|---|---|---|")
    print(f"| diffusers + torch {torch.__version__} | {args.steps} | {args.batch} | "
          f"{row['diffusers_torch_s']} | 1.00x |")
    print(f"| jaxquant (jit, lax.scan) | {args.steps} | {args.batch} | {row['jaxquant_s']} | "
          f"{row['speedup']}x |")
    print(f"max |jaxquant - diffusers| over the samples: {row['max_abs_diff_samples']:.2e}")


if __name__ == "__main__":
    main()
