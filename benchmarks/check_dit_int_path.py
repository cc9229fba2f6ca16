"""The integer path against the fake-quant path on the real (trained) DiT, linear by linear: every
quantized linear's output with integer products (per-token int8 activation codes times integer
weight codes, XLA int8 GEMM) against quantize-dequantize + float matmul, on the same inputs, in
one forward of the W8A8 / W4A8 / W4A4 RTN models over trajectory inputs. (A whole-model comparison
also picks up rounding cascades: a last-bit difference upstream flips a later per-token rounding.)

    .venv/bin/python benchmarks/check_dit_int_path.py [--model DIR]

Writes ``benchmarks/results/dit_int_path_<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    from jaxquant import models
    from jaxquant.calibration.engine import calibrate
    from jaxquant.diffusion.calibration import trajectory_batch
    from jaxquant.diffusion.schedules import NoiseSchedule
    from jaxquant.diffusion.train_fmnist import default_dir
    from jaxquant.models.dit import layers as dit_layers
    from jaxquant.models.dit.model import dit_forward
    from jaxquant.models.loading import adapter_for
    from jaxquant.nn.linear import ActQuant
    from jaxquant.recipes import load_recipe

    lin_mod = sys.modules["jaxquant.nn.linear"]
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_dir())
    args = ap.parse_args()
    m = models.load(os.path.join(args.model, "transformer"))
    with open(os.path.join(args.model, "scheduler", "scheduler_config.json")) as f:
        sched = NoiseSchedule.from_config(json.load(f))
    calib = trajectory_batch(m.config, m.params, sched, n_per_class=1, steps=4, seed=3)
    orig = lin_mod.apply_linear
    rows = []
    for w in ("w8a8", "w4a8", "w4a4"):
        res = calibrate(adapter_for(m), load_recipe(f"dit_rtn_{w}"), calib, progress=False)
        diffs = []

        def hooked(x, p, precision=None, diffs=diffs):
            y = orig(x, p, precision=precision)
            if "act" in p:
                a = p["act"]
                yf = orig(x, {**p, "act": ActQuant(a.bits, a.clip_ratio, "fake", a.rotate)},
                          precision=precision)
                diffs.append(float(jnp.linalg.norm(y - yf) / jnp.linalg.norm(yf)))
            return y

        dit_layers.apply_linear = hooked
        try:
            with jax.disable_jit():
                dit_forward.__wrapped__(m.config, res.params, jnp.asarray(calib["latents"][:8]),
                                        jnp.asarray(calib["timesteps"][:8]),
                                        jnp.asarray(calib["class_labels"][:8]))
        finally:
            dit_layers.apply_linear = orig
        rows.append({"recipe": f"dit_rtn_{w}", "linears": len(diffs),
                     "max_rel_diff": max(diffs), "mean_rel_diff": float(np.mean(diffs))})
    date = datetime.date.today().isoformat()
    with open(os.path.join(HERE, "results", f"dit_int_path_{date}.json"), "w") as f:
        json.dump({"date": date, "rows": rows}, f, indent=1)
    print("| recipe | linears | max rel. diff int vs fake | mean |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['linears']} | {r['max_rel_diff']:.1e} | "
              f"{r['mean_rel_diff']:.1e} |")


if __name__ == "__main__":
    main()
