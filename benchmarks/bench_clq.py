"""CLQ on the trained Fashion-MNIST DiT against the DiT baselines (RTN, SmoothQuant, QuaRot,
GPTQ + RTN activations) at W4A4 and W4A8, and CLQ's ablation (without cross-block calibration,
without orthogonal smoothing, without the permutation, without the parameter search, the search
scored at the nearest point instead of the most sensitive one).

Same harness as ``bench_dit.py`` (samples from the same noise and classes as the fp model; PSNR /
MSE against them, classifier accuracy, Fréchet distance, calibration seconds). Two splits:

* ``--split val``: held-out noise seeds (sampling noise seed 1000, calibration draw 1001, 10 per
  class): where CLQ's settings are chosen (``--variants 'clq_w4a4@block=16,clq_w4a4@algo=rtn'``:
  a recipe with overrides ``block`` (the Hadamard order), ``algo`` (the weight algorithm),
  ``grid_a`` (the largest activation clip cut, e.g. 0.7), ``downstream``);
* ``--split test``: the benchmark's noise (seed 0, 30 per class, calibration draw 1), the one
  reported; ``--calib-seeds`` repeats every recipe over several calibration draws.

Writes ``benchmarks/results/clq_<split>_<date>.json``, a sample grid and a bar plot beside it.

    JAXQUANT_DATA=../shared/data .venv/bin/python benchmarks/bench_clq.py --split test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINES = [f"dit_{m}_{w}" for w in ("w4a4", "w4a8") for m in ("rtn", "smoothquant", "quarot",
                                                                 "gptq")]
CLQ = ["clq_w4a4", "clq_w4a8"]
ABLATION = ["clq_w4a4_no_cbc", "clq_w4a4_no_obs", "clq_w4a4_no_perm", "clq_w4a4_no_clps",
            "clq_w4a4_clps_local"]
SPLITS = {"val": {"seed": 1000, "calib_seed": 1001, "per_class": 10},
          "test": {"seed": 0, "calib_seed": 1, "per_class": 30}}


def variant(name: str):
    """A recipe by name, with ``@key=value;key=value`` overrides of a CLQ recipe."""
    from jaxquant.recipes import load_recipe

    base, _, over = name.partition("@")
    r = load_recipe(base)
    if not over:
        return r
    d = r.to_dict()
    for kv in over.split(";"):
        k, _, v = kv.partition("=")
        body = d["rules"][-1]
        if k == "block":
            body["transform"]["block"] = int(v)
        elif k == "algo":
            body["algorithm"] = v
            if v == "rtn":
                body.pop("options", None)
        elif k == "grid_a":
            lo = float(v)
            n = round((1.0 - lo) / 0.05)
            d["clps"]["grid_a"] = [round(1.0 - 0.05 * i, 2) for i in range(n + 1)]
        elif k == "downstream":
            d["clps"]["downstream"] = v
        else:
            raise SystemExit(f"unknown override {k!r} in {name!r} (block, algo, grid_a, "
                             "downstream)")
    d["name"] = name
    return load_recipe(d)


def label(name: str) -> tuple[str, str]:
    """``(method, width)`` of a recipe name."""
    base, _, over = name.partition("@")
    parts = base.split("_")
    w = next(p for p in parts if p.startswith("w") and "a" in p)
    meth = base.replace(f"_{w}", "").replace("dit_", "")
    return meth + (f"@{over}" if over else ""), w


def main() -> None:
    import sys

    sys.path.insert(0, HERE)
    from bench_dit import Harness, plot_grid, print_table

    from jaxquant.diffusion.train_fmnist import default_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_dir())
    ap.add_argument("--split", choices=tuple(SPLITS), default="test")
    ap.add_argument("--variants", default=",".join(BASELINES + CLQ + ABLATION))
    ap.add_argument("--calib-seeds", default=None,
                    help="comma list of calibration draws (default: the split's one)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sp = SPLITS[args.split]
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"clq_{args.split}_{date}.json")
    seeds = [int(s) for s in args.calib_seeds.split(",")] if args.calib_seeds \
        else [sp["calib_seed"]]
    rows, grid = [], {}
    names = [v for v in args.variants.split(",") if v]
    for cs in seeds:
        h = Harness(args.model, per_class=sp["per_class"], steps=args.steps,
                    guidance=args.guidance, seed=sp["seed"], calib_seed=cs)
        if not rows:
            rows.append(h.fp_row())
            grid["fp"] = h.fp_samples
        for name in names:
            meth, w = label(name)
            row, s = h.run(variant(name), method=meth, width=w, recipe=name, calib_seed=cs)
            rows.append(row)
            if cs == seeds[0]:
                grid[f"{meth} {w}"] = s
            print(f"{name} (calib draw {cs}): psnr {row['psnr']:.2f} acc {row['acc']:.3f} "
                  f"fd {row['fd']:.2f} eps {row['eps_rel_err_vs_fp']:.4f} "
                  f"calib {row['calib_seconds']} s", flush=True)
            with open(out, "w") as f:
                json.dump({"date": date, "split": args.split, **sp, "calib_seeds": seeds,
                           "model": args.model, "classifier": h.cmeta, "steps": args.steps,
                           "guidance": args.guidance, "rows": rows}, f, indent=1)
    stem = os.path.splitext(out)[0]
    plot_grid({k: v for k, v in grid.items() if "@" not in k}, h.labels, stem + ".png")
    plot_bars(rows, stem + "_bars.png")
    print_table(summarize(rows))


def summarize(rows: list[dict]) -> list[dict]:
    """One row per recipe: means over calibration draws (``n_draws``; ``psnr_min/max``)."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("recipe", r["method"]), []).append(r)
    summ = []
    for rs in out.values():
        keys = [k for k, v in rs[0].items() if isinstance(v, int | float)]
        m = {k: float(np.mean([r[k] for r in rs])) for k in keys}
        m |= {"method": rs[0]["method"], "width": rs[0]["width"], "n_draws": len(rs)}
        if "psnr" in rs[0]:
            m |= {"psnr_min": min(r["psnr"] for r in rs), "psnr_max": max(r["psnr"] for r in rs)}
        summ.append(m)
    return summ


def plot_bars(rows: list[dict], path: str) -> None:
    """PSNR vs the fp samples and Fréchet distance per recipe (mean over draws, min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = [r for r in summarize(rows) if r["method"] != "fp"]
    names = [f"{r['method']}\n{r['width']}" for r in summ]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.7 * len(summ)) * 1.6, 4.2))
    colors = ["tab:red" if r["method"].startswith("clq") else "tab:gray" for r in summ]
    psnr = np.array([r["psnr"] for r in summ])
    err = np.array([[r["psnr"] - r["psnr_min"], r["psnr_max"] - r["psnr"]] for r in summ]).T
    axes[0].bar(range(len(summ)), psnr, yerr=err, color=colors)
    axes[0].set_ylabel("PSNR vs fp samples (dB), higher is better")
    fd_fp = next(r["fd"] for r in rows if r["method"] == "fp")
    axes[1].bar(range(len(summ)), [r["fd"] for r in summ], color=colors)
    axes[1].axhline(fd_fp, color="k", ls="--", lw=1, label=f"fp model {fd_fp:.1f}")
    axes[1].set_ylabel("Fréchet distance to real images, lower is better")
    axes[1].legend(fontsize=8)
    lo = min(r["fd"] for r in summ)
    axes[1].set_ylim(lo - 0.1 * (max(r["fd"] for r in summ) - lo) - 1, None)
    for ax in axes:
        ax.set_xticks(range(len(summ)), names, rotation=60, ha="right", fontsize=7)
    fig.suptitle("Fashion-MNIST DiT: CLQ (red) against the baselines and its ablation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
