"""`jaxquant quantize --offload` of the Llama-3-8B-shaped checkpoint in bounded memory (issue 18).

    .venv/bin/python benchmarks/make_llama8b_shaped.py --out /work/llama8b-shaped
    .venv/bin/python benchmarks/bench_8b_bounded.py --model /work/llama8b-shaped \
        --recipe rtn_w4_g128 --kill-at 12 --json benchmarks/results/bench_8b_rtn.json
    .venv/bin/python benchmarks/bench_8b_bounded.py --model /work/llama8b-shaped \
        --recipe gptq_w4_g128 --stop-after 6 --json benchmarks/results/bench_8b_gptq.json

Runs the real command line in a child process on 8 x 512 random token ids and records, for the
whole child process as the OS measures it: wall time, the per-phase seconds the command prints,
peak RSS (``getrusage`` of the child, and the RSS sampled every 0.5 s with the block it was in,
to show it does not grow with depth), and the ETA the progress bar showed after each block
against the time actually left. ``--kill-at B`` SIGKILLs a run once block B is checkpointed,
resumes it with ``--resume`` and checks the result is bit-identical to an uninterrupted run.
``--stop-after B`` ends a long run after block B (the numbers then cover B + 1 blocks). The
result reloads (``jaxquant.load``) and a forward on 16 tokens must give finite logits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ETA = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")


def _secs(t: str) -> float | None:
    if "?" in t:
        return None
    parts = [int(p) for p in t.split(":")]
    return float(sum(p * 60**i for i, p in enumerate(reversed(parts))))


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(cmd, out_dir, *, kill_at=None, stop_after=None, env=None):
    """Run ``cmd``; returns (rc, wall, stdout, etas [(block, shown_left, t)], rss samples)."""
    state = os.path.join(out_dir, "progress", "state.json")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    etas, samples, err = [], [], []

    def read_err():
        buf = ""
        while True:
            ch = p.stderr.read(1)
            if not ch:
                break
            if ch in "\r\n":
                m = ETA.search(buf)
                if m:
                    etas.append((int(m.group(1)), _secs(m.group(4)), time.perf_counter() - t0))
                err.append(buf)
                buf = ""
            else:
                buf += ch

    th = threading.Thread(target=read_err, daemon=True)
    th.start()
    killed = False
    while p.poll() is None:
        nb = -1
        if os.path.isfile(state):
            try:
                with open(state) as f:
                    nb = json.load(f)["next_block"]
            except (json.JSONDecodeError, OSError):
                pass
        samples.append((round(time.perf_counter() - t0, 1), nb, round(_rss_mb(p.pid), 1)))
        if (kill_at is not None and nb > kill_at) or (stop_after is not None and nb > stop_after):
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.5)
    out = p.stdout.read()
    p.wait()
    th.join(timeout=5)
    return p.returncode, time.perf_counter() - t0, out, etas, samples, killed, err


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--recipe", default="gptq_w4_g128")
    ap.add_argument("--work", default="/work/bench8b")
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    calib = os.path.join(a.work, "calib_8x512.npy")
    np.save(calib, np.random.default_rng(0).integers(0, 128256, (8, 512)).astype(np.int32))
    exe = os.path.join(os.path.dirname(sys.executable), "jaxquant")

    def cmd(out, *extra):
        return [exe, "quantize", "--model", a.model, "--recipe", a.recipe, "--calib", calib,
                "--n-samples", "8", "--seqlen", "512", "--out", out, "--offload", *extra]

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rows = {"recipe": a.recipe, "model": a.model, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores, {mem_gib:.0f} GiB"}
    out = os.path.join(a.work, a.recipe)
    shutil.rmtree(out, ignore_errors=True)
    rc, wall, stdout, etas, samples, killed, err = run(cmd(out), out, stop_after=a.stop_after)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if rc != 0 and not killed:
        print("".join(err[-20:]), file=sys.stderr)
        raise SystemExit(f"quantize failed (rc {rc})")
    last = json.loads(stdout.strip().splitlines()[-1]) if not killed else None
    done = max((s[1] for s in samples), default=0)
    per_block_rss = {}
    for _, nb, rss in samples:
        per_block_rss[nb] = max(per_block_rss.get(nb, 0.0), rss)
    rows.update(wall_s=round(wall, 1), blocks_done=done if killed else "all",
                peak_rss_mb=round(peak, 1), phase_seconds=last and last["phase_seconds"],
                rss_by_block=per_block_rss,
                eta=[{"block": b, "shown_left_s": s, "at_s": round(t, 1),
                      "actual_left_s": round(wall - t, 1) if not killed else None}
                     for b, s, t in etas][::max(1, len(etas) // 16)])
    if a.kill_at is not None and not killed:
        out_k = out + "_killed"
        shutil.rmtree(out_k, ignore_errors=True)
        _, wk, *_ = run(cmd(out_k), out_k, kill_at=a.kill_at)
        rc2, wr, *_ = run(cmd(out_k, "--resume"), out_k)
        import jax

        from jaxquant.models.quantized import load_quantized
        pa = jax.tree.leaves(load_quantized(out)[1])
        pb = jax.tree.leaves(load_quantized(out_k)[1])
        same = len(pa) == len(pb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                          for x, y in zip(pa, pb, strict=True))
        rows.update(kill_at_block=a.kill_at, killed_run_s=round(wk, 1),
                    resumed_run_s=round(wr, 1), resume_rc=rc2, resume_bit_identical=bool(same))
        del pa, pb
    if not killed:
        import jaxquant as jq

        t0 = time.perf_counter()
        m = jq.load(out)
        logits = np.asarray(m(np.arange(16, dtype=np.int32)[None] * 1000))
        rows.update(reload_forward_s=round(time.perf_counter() - t0, 1),
                    logits_finite=bool(np.all(np.isfinite(logits))),
                    out_bytes=sum(os.path.getsize(os.path.join(d, f))
                                  for d, _, fs in os.walk(out) for f in fs))
    print(json.dumps(rows, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
