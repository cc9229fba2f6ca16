"""Gather every D²Quant run of ``bench_d2quant.py`` (the JSONs named on the command line) into one
Markdown table (mean and spread over the calibration draws of each method) and one plot.

    .venv/bin/python benchmarks/summarize_d2quant.py benchmarks/results/d2quant_2026-12-02.json \
        benchmarks/results/d2quant_*_2026-12-03.json --out benchmarks/results/d2quant_summary_2026-12-03

Writes ``<out>.json`` (the grouped rows) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ORDER = ("d2quant", "gptq", "gptq_rot", "gptaq", "gptaq_rot", "awq", "mse_gptq", "no_dsq",
         "no_dac", "no_rot", "no_gar", "uniform_dsq")


def main() -> None:
    from bench_d2quant import VARIANTS

    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for f in args.files:
        with open(f) as fh:
            for r in json.load(fh)["rows"]:
                rows.append(r | {"file": os.path.basename(f)})
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["bits"], r["variant"]), []).append(r)
    summary = []
    for bits in sorted({b for b, _ in groups}, reverse=True):
        for v in ORDER:
            rs = groups.get((bits, v))
            if not rs:
                continue
            ppl = np.array([r["ppl"] for r in rs])
            kl = np.array([r["kl"] for r in rs])
            val = np.array([r["ppl_heldout_valid"] for r in rs])
            summary.append({"bits": bits, "variant": v, "name": VARIANTS[v],
                            "seeds": [r.get("seed", 0) for r in rs],
                            "ppl": [float(x) for x in ppl], "ppl_mean": float(ppl.mean()),
                            "ppl_min": float(ppl.min()), "ppl_max": float(ppl.max()),
                            "kl_mean": float(kl.mean()), "valid_ppl_mean": float(val.mean()),
                            "calib_seconds_mean": float(np.mean([r["calib_seconds"]
                                                                 for r in rs])),
                            "files": sorted({r["file"] for r in rs})})
    with open(args.out + ".json", "w") as fh:
        json.dump({"rows": summary}, fh, indent=1)
    print("| scheme | method | draws (seeds) | test PPL mean [min, max] | KL(fp‖q) mean | "
          "held-out valid PPL mean | calib s |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        spread = f" [{s['ppl_min']:,.2f}, {s['ppl_max']:,.2f}]" if len(s["ppl"]) > 1 else ""
        print(f"| W{s['bits']}g64 | {s['name']} | {len(s['ppl'])} ({','.join(map(str, s['seeds']))})"
              f" | {s['ppl_mean']:,.2f}{spread} | {s['kl_mean']:.3f} | {s['valid_ppl_mean']:,.2f} |"
              f" {s['calib_seconds_mean']:.0f} |")
    plot(summary, args.out + ".png")


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = sorted({s["bits"] for s in summary}, reverse=True)
    fig, axes = plt.subplots(1, len(bits), figsize=(7 * len(bits), 4.2))
    axes = np.atleast_1d(axes)
    for ax, b in zip(axes, bits, strict=True):
        ss = [s for s in summary if s["bits"] == b]
        x = np.arange(len(ss))
        mean = [s["ppl_mean"] for s in ss]
        err = [[s["ppl_mean"] - s["ppl_min"] for s in ss], [s["ppl_max"] - s["ppl_mean"]
                                                             for s in ss]]
        colors = ["#d62728" if s["variant"] == "d2quant" else
                  "#1f77b4" if s["variant"] in ("no_dsq", "no_dac", "no_rot", "no_gar",
                                                "uniform_dsq") else "#7f7f7f" for s in ss]
        ax.bar(x, mean, yerr=err, color=colors, capsize=3)
        ax.set_xticks(x, [s["name"] for s in ss], rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"SmolLM2-135M W{b}g64: test PPL (64×512), mean and range over draws")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
