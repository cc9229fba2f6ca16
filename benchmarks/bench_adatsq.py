"""AdaTSQ on the trained Fashion-MNIST DiT at average budgets of 4 and 3 bits per step, against
uniform-bit GPTQ (RTN activations) and CLQ at equal average bits, with each component's
contribution:

* ``uniform``      the budget's uniform GPTQ model (plain Hessians) at every step;
* ``fisher only``  the same uniform policy, options calibrated on the Fisher-weighted Hessian;
* ``search only``  the searched policy over plain-Hessian options;
* ``adatsq``       the searched policy over Fisher-weighted options (both parts);
* ``clq``          CLQ at the budget's uniform width.

Samples from the same noise and classes as the fp model (the ``bench_dit.py`` harness): PSNR /
MSE against them, classifier accuracy, Fréchet distance; calibration and search seconds. The
search runs on its own noise (seed 7); ``--split val`` (noise seed 1000) is where settings are
chosen, ``--split test`` (seed 0) is reported. Writes ``results/adatsq_<split>_<date>.json``,
the Pareto fronts (``..._pareto_b<budget>.png``) and a sample grid.

    JAXQUANT_DATA=../shared/data .venv/bin/python benchmarks/bench_adatsq.py --split test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BUDGETS = {4.0: {"options": [("w8a8", "dit_gptq_w8a8", 8.0), ("w4a4", "dit_gptq_w4a4", 4.0),
                             ("w3a3", "dit_gptq_w3a3", 3.0)], "uniform": "w4a4",
                 "clq": "clq_w4a4",
                 "clq_options": [("w8a8", "dit_gptq_w8a8", 8.0), ("clq_w4a4", "clq_w4a4", 4.0),
                                 ("clq_w3a3", "clq_w3a3", 3.0)]},
           3.0: {"options": [("w4a4", "dit_gptq_w4a4", 4.0), ("w3a3", "dit_gptq_w3a3", 3.0),
                             ("w2a3", "dit_gptq_w2a3", 2.5)], "uniform": "w3a3",
                 "clq": "clq_w3a3",
                 "clq_options": [("clq_w4a4", "clq_w4a4", 4.0), ("clq_w3a3", "clq_w3a3", 3.0),
                                 ("w2a3", "dit_gptq_w2a3", 2.5)]}}


def main() -> None:
    sys.path.insert(0, HERE)
    from bench_clq import SPLITS  # the same validation / test noise as the CLQ benchmark
    from bench_dit import Harness, param_bytes, plot_grid, print_table

    from jaxquant.algorithms.adatsq import fisher_weights
    from jaxquant.calibration.engine import calibrate
    from jaxquant.diffusion.calibration import sample_dit, sample_dit_policy
    from jaxquant.diffusion.fisher import temporal_fisher
    from jaxquant.diffusion.policy_search import plot_front, policy_error, search_policy
    from jaxquant.diffusion.train_fmnist import default_dir
    from jaxquant.models.loading import adapter_for
    from jaxquant.recipes import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_dir())
    ap.add_argument("--split", choices=tuple(SPLITS), default="test")
    ap.add_argument("--budgets", default="4,3")
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--rollout", default="budget", help="budget | fp")
    ap.add_argument("--fisher-check", default="",
                    help="comma list of DiT recipes: each calibrated with plain and with "
                         "Fisher-weighted Hessians, uniform at every step (where weights, not "
                         "activations, dominate the error)")
    ap.add_argument("--with-clq-options", action="store_true",
                    help="also search over CLQ option models (the two methods composed)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--search-per-class", type=int, default=2)
    ap.add_argument("--search-seed", type=int, default=7)
    ap.add_argument("--fisher-per-step", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sp = SPLITS[args.split]
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"adatsq_{args.split}_{date}.json")
    stem = os.path.splitext(out)[0]
    h = Harness(args.model, per_class=sp["per_class"], steps=args.steps, guidance=args.guidance,
                seed=sp["seed"], calib_seed=sp["calib_seed"])
    m, cfg, sched = h.m, h.cfg, h.sched
    steps, g = args.steps, args.guidance
    rows = [h.fp_row()]
    grid = {"fp": h.fp_samples}

    # the search's own noise and classes, and the Fisher scores on the fp model's samples of it
    labels_s = np.repeat(np.arange(cfg.num_classes, dtype=np.int32), args.search_per_class)
    x_s = np.asarray(jax.random.normal(jax.random.PRNGKey(args.search_seed),
                                       (len(labels_s), cfg.in_channels, cfg.sample_size,
                                        cfg.sample_size)))
    t0 = time.perf_counter()
    x0 = np.asarray(jax.jit(lambda: sample_dit(cfg, m.params, sched, labels_s, steps=steps,
                                               guidance=g, x_T=x_s))())
    I = temporal_fisher(cfg, m.params, sched, x0, labels_s, steps=steps,
                        n_per_step=args.fisher_per_step)
    paths = list(I)
    a = np.asarray(fisher_weights(np.stack([I[p] for p in paths]),
                                  temperature=args.temperature))
    alpha = {p: a[i] for i, p in enumerate(paths)}
    fisher_secs = time.perf_counter() - t0
    print(f"Fisher: {fisher_secs:.1f} s; α range [{a.min():.2f}, {a.max():.2f}]", flush=True)

    cache: dict = {}

    def option(rname, fisher):
        key = (rname, fisher)
        if key not in cache:
            t = time.perf_counter()
            res = calibrate(adapter_for(m), load_recipe(rname), h.calib, progress=False,
                            group_weights=alpha if fisher else None)
            cache[key] = (res.params, time.perf_counter() - t)
        return cache[key]

    def draw_policy(params_list, policy):
        t = time.perf_counter()
        outs = []
        for i in range(0, len(h.labels), 100):
            f = jax.jit(lambda xt, y: sample_dit_policy(cfg, params_list, sched, y,
                                                        np.asarray(policy), steps=steps,
                                                        guidance=g, x_T=xt))
            outs.append(np.asarray(f(h.x_T[i:i + 100], h.labels[i:i + 100])))
        return np.clip(np.concatenate(outs), -1.0, 1.0), time.perf_counter() - t

    fronts, uni_mse = {}, {}
    for rname in [r for r in args.fisher_check.split(",") if r]:
        for fisher in (False, True):
            params, cal_s = option(rname, fisher)
            s, secs = draw_policy([params], [0] * steps)
            row = {"method": f"fisher check {'fisher' if fisher else 'plain'}",
                   "width": rname.replace("dit_gptq_", ""), "recipe": rname,
                   **h.score(s, h.fp_samples), "search_mse": policy_error(
                       cfg, [params], [0] * steps, m.params, sched, labels_s, x_s,
                       steps=steps, guidance=g),
                   "calib_seconds": round(cal_s, 1), "sample_seconds": round(secs, 1),
                   "param_bytes": param_bytes(params)}
            rows.append(row)
            print(f"fisher check {rname} fisher={fisher}: psnr {row['psnr']:.2f} fd "
                  f"{row['fd']:.2f} mse {row['search_mse']:.3g}", flush=True)
            _dump(out, date, args, sp, h, alpha, I, rows)
    for budget in [float(b) for b in args.budgets.split(",") if b]:
        spec = BUDGETS[budget]
        names = [o[0] for o in spec["options"]]
        costs = [o[2] for o in spec["options"]]
        u = names.index(spec["uniform"])
        for fisher in (False, True):
            params = [option(r, fisher)[0] for _, r, _ in spec["options"]]
            cal_s = sum(option(r, fisher)[1] for _, r, _ in spec["options"])
            variants = [("fisher only" if fisher else "uniform", [u] * steps, 0.0, None)]
            t = time.perf_counter()
            res = search_policy(cfg, params, costs, budget, m.params, sched, labels_s, x_s,
                                steps=steps, guidance=g, beam_width=args.beam_width,
                                rollout=args.rollout, names=names, progress=False)
            search_s = time.perf_counter() - t
            variants.append(("adatsq" if fisher else "search only", list(res.policy), search_s,
                             res))
            for label, pol, ssec, r in variants:
                s, secs = draw_policy(params, pol)
                row = {"method": label, "width": f"avg{budget:g}", "budget": budget,
                       "policy": [names[k] for k in pol],
                       "avg_bits": float(np.mean([costs[k] for k in pol])),
                       **h.score(s, h.fp_samples), "search_mse": policy_error(
                           cfg, params, pol, m.params, sched, labels_s, x_s, steps=steps,
                           guidance=g),
                       "calib_seconds": round(cal_s + (fisher_secs if fisher else 0.0), 1),
                       "search_seconds": round(ssec, 1), "sample_seconds": round(secs, 1),
                       "param_bytes": sum(param_bytes(p) for p in params)}
                if r is not None:
                    row |= {"search_evaluated": r.evaluated, "search_front": [
                        {"avg_bits": b, "error": e, "policy": [names[k] for k in p]}
                        for b, e, p in r.front]}
                    fronts[(budget, fisher)] = r
                else:
                    uni_mse[fisher] = (row["avg_bits"], row["search_mse"])
                rows.append(row)
                grid[f"{label} {budget:g}"] = s
                print(f"budget {budget:g} {label}: psnr {row['psnr']:.2f} acc {row['acc']:.3f} "
                      f"fd {row['fd']:.2f} avg bits {row['avg_bits']:.2f} search mse "
                      f"{row['search_mse']:.3g} policy {' '.join(row['policy'])}", flush=True)
                _dump(out, date, args, sp, h, alpha, I, rows)
        crow, cs = h.run(load_recipe(spec["clq"]), method="clq", width=f"avg{budget:g}",
                         budget=budget, avg_bits=budget)
        rows.append(crow)
        grid[f"clq {budget:g}"] = cs
        print(f"budget {budget:g} clq: psnr {crow['psnr']:.2f} fd {crow['fd']:.2f}", flush=True)
        _dump(out, date, args, sp, h, alpha, I, rows)
        if args.with_clq_options:  # the search on top of CLQ's option models
            co = spec["clq_options"]
            cparams = [option(r, False)[0] for _, r, _ in co]
            cnames, ccosts = [o[0] for o in co], [o[2] for o in co]
            t = time.perf_counter()
            r = search_policy(cfg, cparams, ccosts, budget, m.params, sched, labels_s, x_s,
                              steps=steps, guidance=g, beam_width=args.beam_width,
                              rollout=args.rollout, names=cnames, progress=False)
            ssec = time.perf_counter() - t
            s, secs = draw_policy(cparams, list(r.policy))
            row = {"method": "adatsq search over clq options", "width": f"avg{budget:g}",
                   "budget": budget, "policy": [cnames[k] for k in r.policy],
                   "avg_bits": r.avg_bits, **h.score(s, h.fp_samples), "search_mse": r.error,
                   "calib_seconds": round(sum(option(rn, False)[1] for _, rn, _ in co), 1),
                   "search_seconds": round(ssec, 1), "sample_seconds": round(secs, 1),
                   "param_bytes": sum(param_bytes(p) for p in cparams),
                   "search_evaluated": r.evaluated}
            rows.append(row)
            grid[f"adatsq+clq {budget:g}"] = s
            print(f"budget {budget:g} adatsq over clq: psnr {row['psnr']:.2f} fd {row['fd']:.2f} "
                  f"policy {' '.join(row['policy'])}", flush=True)
            _dump(out, date, args, sp, h, alpha, I, rows)
            plot_front(r, f"{stem}_pareto_b{budget:g}_clq.png", budget=budget, names=cnames,
                       costs=ccosts)
        for fisher in (False, True):
            tag = "fisher" if fisher else "plain"
            plot_front(fronts[(budget, fisher)], f"{stem}_pareto_b{budget:g}_{tag}.png",
                       budget=budget, names=names, costs=costs,
                       extra={f"uniform {spec['uniform']}": uni_mse[fisher]})
    plot_grid(grid, h.labels, stem + ".png")
    plot_alpha(alpha, I, stem + "_fisher.png")
    print_table(rows)


def _dump(out, date, args, sp, h, alpha, I, rows):
    with open(out, "w") as f:
        json.dump({"date": date, "split": args.split, **sp, "model": args.model,
                   "classifier": h.cmeta, "steps": args.steps, "guidance": args.guidance,
                   "beam_width": args.beam_width, "rollout": args.rollout,
                   "temperature": args.temperature,
                   "search_per_class": args.search_per_class, "search_seed": args.search_seed,
                   "fisher_per_step": args.fisher_per_step,
                   "fisher_mean_over_layers": np.mean(np.stack(list(I.values())), 0).tolist(),
                   "alpha_mean_over_layers": np.mean(np.stack(list(alpha.values())),
                                                     0).tolist(),
                   "rows": rows}, f, indent=1)


def plot_alpha(alpha: dict, I: dict, path: str) -> None:
    """The Fisher weights α_{t,l} per sampler step (one line per block linear; mean in black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = np.stack(list(alpha.values()))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(A.T, color="tab:gray", lw=0.6, alpha=0.5)
    ax.plot(A.mean(0), color="k", lw=2, label="mean over linears")
    ax.set_xlabel("sampler step (0 = pure noise)")
    ax.set_ylabel("α_t (Fisher weight, mean 1)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
