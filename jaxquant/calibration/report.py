"""Per-layer calibration report: a printed table, a CSV and a plot."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence

from jaxquant.calibration.driver import LayerReport


def format_table(rows: Sequence[LayerReport]) -> str:
    head = f"  {'layer':<28} {'algorithm':<9} {'bits':>4} {'rel. output error':>18} {'s':>7}"
    lines = [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        lines.append(f"  {r.layer:<28} {r.algorithm:<9} {r.bits!s:>4} {r.rel_error:>18.5f} "
                     f"{r.seconds:>7.2f}")
    return "\n".join(lines)


def write_csv(rows: Sequence[LayerReport], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "algorithm", "bits", "rel_output_error", "seconds"])
        for r in rows:
            w.writerow([r.layer, r.algorithm, r.bits, f"{r.rel_error:.6g}", f"{r.seconds:.4f}"])


def plot(rows: Sequence[LayerReport], path: str | os.PathLike, title: str = "") -> None:
    """Relative output error per block, one line per linear kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        m = re.fullmatch(r"layers/(\d+)/(.+)", r.layer)
        if not m:
            continue
        xs, ys = series.setdefault(m.group(2).split("/")[-1], ([], []))
        xs.append(int(m.group(1)))
        ys.append(r.rel_error)
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel("block")
    ax.set_ylabel("relative output error ‖X(W−Ŵ)‖/‖XW‖")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
