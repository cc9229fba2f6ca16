"""Calibration reports: per layer (table, CSV, plot) and per block (seconds per phase: table,
CSV, one JSON line per block)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Sequence

from jaxquant.calibration.engine import PHASES, BlockReport, LayerReport


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


def format_phases(blocks: Sequence[BlockReport]) -> str:
    """Seconds per phase of every block, and the totals (where the calibration time goes)."""
    head = f"  {'block':>5} " + " ".join(f"{p:>11}" for p in PHASES) + f" {'passes':>6}"
    lines = [head, "  " + "-" * (len(head) - 2)]
    for b in blocks:
        lines.append(f"  {b.block:>5} " + " ".join(f"{getattr(b, p):>11.3f}" for p in PHASES)
                     + f" {b.passes:>6}")
    tot = {p: sum(getattr(b, p) for b in blocks) for p in PHASES}
    lines.append(f"  {'total':>5} " + " ".join(f"{tot[p]:>11.3f}" for p in PHASES))
    return "\n".join(lines)


def write_phases_csv(blocks: Sequence[BlockReport], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", *PHASES, "passes"])
        for b in blocks:
            w.writerow([b.block, *(f"{getattr(b, p):.4f}" for p in PHASES), b.passes])


def phases_json_lines(blocks: Sequence[BlockReport]) -> str:
    """One JSON object per block (for log scrapers): ``{"block": 0, "read": ..., ...}``."""
    return "\n".join(json.dumps(dataclasses.asdict(b)) for b in blocks)
