"""The trained Fashion-MNIST DiT under every DiT baseline recipe (RTN, SmoothQuant, QuaRot, GPTQ at
W8A8, W4A8, W4A4): samples from the same noise and classes as the fp model, scored by

* MSE and PSNR against the fp model's samples (pixel range [-1, 1], data range 2),
* the classifier's accuracy on the class-conditional samples (did it draw the asked class?),
* the Fréchet distance of the classifier's penultimate features to the real test images,

plus calibration seconds and the quantized model's parameter bytes. Writes
``benchmarks/results/dit_baselines_<date>.json``, a sample grid PNG beside it, and prints a table.

    .venv/bin/python -m jaxquant.diffusion.train_fmnist          # once: the DiT and classifier
    JAXQUANT_DATA=../shared/data .venv/bin/python benchmarks/bench_dit.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("rtn", "smoothquant", "quarot", "gptq")
WIDTHS = ("w8a8", "w4a8", "w4a4")


def param_bytes(tree) -> int:
    from jaxquant.core.qarray import QArray

    leaves = jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, QArray))
    return int(sum(a.nbytes if isinstance(a, QArray) else np.asarray(a).nbytes
                   for a in leaves))


class Harness:
    """The trained DiT, its classifier and the real test images' feature statistics; samples
    from fixed noise (``seed``) and classes, scored against the fp model's samples; calibration
    inputs from the fp sampler's trajectories (``calib_seed``) and held-out trajectory inputs."""

    def __init__(self, model_dir: str, *, per_class: int, steps: int, guidance: float,
                 seed: int, calib_seed: int | None = None):
        from jaxquant import models
        from jaxquant.data.images import fashion_mnist
        from jaxquant.diffusion.calibration import trajectory_batch
        from jaxquant.diffusion.schedules import NoiseSchedule
        from jaxquant.eval.classifier import load_classifier, make_apply, to_unit_range
        from jaxquant.eval.images import feature_stats

        self.m = models.load(os.path.join(model_dir, "transformer"))
        self.cfg = cfg = self.m.config
        self.steps, self.guidance = steps, guidance
        with open(os.path.join(model_dir, "scheduler", "scheduler_config.json")) as f:
            self.sched = NoiseSchedule.from_config(json.load(f))
        cparams, self.cmeta = load_classifier(os.path.join(model_dir, "classifier"))
        self.logits_fn, self.feat_fn = make_apply(cparams), make_apply(cparams, features=True)
        xte, _ = fashion_mnist("test")
        self.mu_r, self.S_r = feature_stats(self.feat_fn(to_unit_range(xte)))
        self.labels = np.repeat(np.arange(cfg.num_classes), per_class)
        self.x_T = np.asarray(jax.random.normal(
            jax.random.PRNGKey(seed), (len(self.labels), cfg.in_channels, cfg.sample_size,
                                       cfg.sample_size)))
        cs = seed + 1 if calib_seed is None else calib_seed
        self.calib = trajectory_batch(cfg, self.m.params, self.sched, n_per_class=4, steps=steps,
                                      guidance=guidance, seed=cs)
        self.held = trajectory_batch(cfg, self.m.params, self.sched, n_per_class=1, steps=5,
                                     guidance=guidance, seed=seed + 2)
        self.out_fp = self.forward(self.m.params)
        self.fp_samples, self.fp_secs = self.draw(self.m.params)

    def draw(self, params):
        from jaxquant.diffusion.calibration import sample_dit

        t0 = time.perf_counter()
        outs = []
        for i in range(0, len(self.labels), 100):
            f = jax.jit(lambda xt, y: sample_dit(self.cfg, params, self.sched, y,
                                                 steps=self.steps, guidance=self.guidance,
                                                 x_T=xt))
            outs.append(np.asarray(f(self.x_T[i:i + 100], self.labels[i:i + 100])))
        return np.clip(np.concatenate(outs), -1.0, 1.0), time.perf_counter() - t0

    def score(self, samples, ref=None) -> dict:
        from jaxquant.eval.images import feature_stats, frechet_distance, psnr, sample_mse

        acc = float(np.mean(np.argmax(self.logits_fn(samples), -1) == self.labels))
        mu, S = feature_stats(self.feat_fn(samples))
        row = {"acc": acc, "fd": float(frechet_distance(mu, S, self.mu_r, self.S_r))}
        if ref is not None:
            row |= {"mse": float(sample_mse(samples, ref)),
                    "psnr": float(psnr(samples, ref, data_range=2.0))}
        return row

    def forward(self, params):
        from jaxquant.models.dit.model import dit_forward

        h = self.held
        return np.asarray(dit_forward(self.cfg, params, h["latents"], h["timesteps"],
                                      h["class_labels"]))

    def fp_row(self) -> dict:
        return {"method": "fp", "width": "fp32", **self.score(self.fp_samples),
                "calib_seconds": 0.0, "sample_seconds": round(self.fp_secs, 1),
                "param_bytes": param_bytes(self.m.params)}

    def run(self, rec, **meta) -> tuple[dict, np.ndarray]:
        """Calibrate the recipe ``rec``, sample, score; ``(row, samples)``."""
        from jaxquant.calibration.engine import calibrate
        from jaxquant.models.loading import adapter_for

        t0 = time.perf_counter()
        res = calibrate(adapter_for(self.m), rec, self.calib, progress=False)
        secs = time.perf_counter() - t0
        s, ssecs = self.draw(res.params)
        # the integer path (int8 GEMM) against the fake-quant path on held-out inputs
        out_int = self.forward(res.params)
        out_fake = self.forward(with_act_mode(res.params, "fake"))
        int_vs_fake = float(np.linalg.norm(out_int - out_fake) / np.linalg.norm(out_fake))
        q_err = float(np.linalg.norm(out_fake - self.out_fp) / np.linalg.norm(self.out_fp))
        row = {**meta, **self.score(s, self.fp_samples), "calib_seconds": round(secs, 1),
               "sample_seconds": round(ssecs, 1), "param_bytes": param_bytes(res.params),
               "eps_rel_err_vs_fp": q_err, "int_vs_fake_rel_diff": int_vs_fake}
        clps = [r for r in res.report if r.algorithm == "clps"]
        if clps:
            row["clps"] = [{"stage": r.layer, **r.info} for r in clps]
        return row, s


def print_table(rows) -> None:
    print("| method | width | PSNR vs fp (dB) | MSE vs fp | class acc | FD | ε rel. err | "
          "int vs fake | calib s | params MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['width']} | {r.get('psnr', float('inf')):.2f} | "
              f"{r.get('mse', 0.0):.5f} | {r['acc']:.3f} | {r['fd']:.2f} | "
              f"{r.get('eps_rel_err_vs_fp', 0.0):.4f} | {r.get('int_vs_fake_rel_diff', 0.0):.1e} | "
              f"{r['calib_seconds']} | {r['param_bytes'] / 2**20:.2f} |")


def main() -> None:
    from jaxquant.diffusion.train_fmnist import default_dir
    from jaxquant.recipes import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_dir())
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--widths", default=",".join(WIDTHS))
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"dit_baselines_{date}.json")
    h = Harness(args.model, per_class=args.per_class, steps=args.steps, guidance=args.guidance,
                seed=args.seed)
    rows = [h.fp_row()]
    print(f"fp: {rows[-1]}", flush=True)
    grid = {"fp": h.fp_samples}
    for meth in args.methods.split(","):
        for w in args.widths.split(","):
            row, s = h.run(load_recipe(f"dit_{meth}_{w}"), method=meth, width=w)
            rows.append(row)
            grid[f"{meth} {w}"] = s
            print(f"{meth} {w}: {rows[-1]}", flush=True)
            with open(out, "w") as f:
                json.dump({"date": date, "model": args.model, "classifier": h.cmeta,
                           "per_class": args.per_class, "steps": args.steps,
                           "guidance": args.guidance, "seed": args.seed, "rows": rows}, f,
                          indent=1)
    plot_grid(grid, h.labels, os.path.splitext(out)[0] + ".png")
    print_table(rows)


def with_act_mode(tree, mode: str):
    """``tree`` with every linear's ActQuant switched to ``mode`` ("int" / "fake")."""
    from jaxquant.nn.linear import ActQuant

    if isinstance(tree, ActQuant):
        return ActQuant(tree.bits, tree.clip_ratio, mode, tree.rotate)
    if isinstance(tree, dict):
        return {k: with_act_mode(v, mode) for k, v in tree.items()}
    if isinstance(tree, list):
        return [with_act_mode(v, mode) for v in tree]
    return tree


def plot_grid(grid: dict, labels: np.ndarray, path: str) -> None:
    """One row per model, one column per class (the first sample of each class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(set(labels.tolist()))
    idx = [int(np.argmax(labels == c)) for c in classes]
    fig, axes = plt.subplots(len(grid), len(classes),
                             figsize=(len(classes) * 0.9, len(grid) * 0.95))
    for r, (name, s) in enumerate(grid.items()):
        for c, i in enumerate(idx):
            ax = axes[r, c]
            ax.imshow(s[i, 0], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("Fashion-MNIST DiT: same noise, same classes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
