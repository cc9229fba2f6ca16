"""``jaxquant`` command line: ``eval``, ``generate``, ``quantize`` and ``demo`` (on the front door:
``jaxquant.load``, ``quantize_model``, ``evaluate``).

Every command prints a short human table, then one final JSON line for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np


def _load(path: str):
    import jaxquant as jq

    return jq.load(path)


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def _data_mesh(n: int):
    """A 1-D ``data`` mesh over ``n`` local devices (0: all of them); None for one device."""
    import jax
    from jax.sharding import Mesh

    devs = jax.devices()
    n = len(devs) if n == 0 else n
    if n > len(devs):
        raise ValueError(f"--data-parallel {n}: only {len(devs)} devices (on CPU, raise "
                         "--cpu-devices)")
    return Mesh(np.array(devs[:n]), ("data",)) if n > 1 else None


def cmd_eval(args) -> dict:
    import jaxquant as jq

    t0 = time.perf_counter()
    m = _load(args.model)
    mesh = _data_mesh(args.data_parallel)
    r = jq.evaluate(m, args.data, args.windows, seqlen=args.seqlen, batch_size=args.batch_size,
                    mesh=mesh)
    out = {"model": m.name, "data": args.data, "tokens": r["tokens"], "ppl": r["ppl"],
           "seconds": round(time.perf_counter() - t0, 2)}
    print(_table([("model", m.name), ("data", f"{args.data} {r['windows']}x{r['seqlen']}"),
                  ("tokens", str(r["tokens"])), ("ppl", f"{r['ppl']:.4f}"),
                  ("seconds", f"{out['seconds']:.1f}")]))
    return out


def cmd_generate(args) -> dict:
    import jax

    from jaxquant.models.common.generate import generate

    m = _load(args.model)
    tok = m.tokenizer
    ids = np.asarray([tok(args.prompt, add_special_tokens=False)["input_ids"]], np.int32)
    eos = m.config.eos_token_id
    eos = eos[0] if isinstance(eos, tuple) else eos
    t0 = time.perf_counter()
    out = generate(m.config, m.params, ids, jax.random.key(args.seed),
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=eos)
    new = np.asarray(out)[0].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    text = tok.decode(new)
    secs = time.perf_counter() - t0
    print(args.prompt + text)
    return {"model": m.name, "prompt": args.prompt, "completion": text,
            "new_tokens": len(new), "seconds": round(secs, 2)}


def cmd_quantize(args) -> dict:
    import resource

    import jaxquant as jq
    from jaxquant.calibration import report
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    path = resolve_model_path(args.model)
    # the command line overrides the recipe's calibration sizes
    sizes = {k: v for k, v in (("n_samples", args.n_samples), ("seqlen", args.seqlen)) if v}
    if sizes:
        recipe = recipe.with_calib(**sizes)
    mesh = _data_mesh(args.data_parallel)
    qm = jq.quantize_model(path, recipe, args.calib, out=args.out, resume=args.resume, mesh=mesh)
    res = qm.calibration
    print(report.format_table(res.report))
    print()
    print(report.format_phases(res.blocks))
    if res.unmatched:
        print(f"  {len(res.unmatched)} linears matched no rule (kept fp)")
    if res.unused_rules:
        print(f"  rules matching nothing: {res.unused_rules}")
    errs = [r.rel_error for r in res.report]
    phases = {p: round(sum(getattr(b, p) for b in res.blocks), 3) for p in report.PHASES}
    return {"model": os.path.basename(path), "recipe": recipe.name, "out": args.out,
            "layers": len(res.report), "mean_rel_error": float(np.mean(errs)) if errs else 0.0,
            "calib_seconds": round(res.seconds, 2), "phase_seconds": phases,
            "resumed_from_block": res.resumed_from,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def cmd_demo(args) -> dict:
    from jaxquant.demo import run_demo

    return run_demo(model=args.model, recipe=args.recipe, windows=args.windows)


def _enable_compilation_cache() -> None:
    """Reuse compiled XLA programs across CLI runs ($JAXQUANT_CACHE, '' to disable)."""
    import jax

    d = os.environ.get("JAXQUANT_CACHE", os.path.expanduser("~/.cache/jaxquant/xla"))
    if d:
        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def configure_cpu_devices(n: int) -> None:
    """Split a CPU host into ``n`` JAX devices, one Eigen thread each (before JAX starts).

    Data-parallel work over ``n`` single-threaded devices keeps every core busy on its own
    windows instead of splitting each small matmul across threads."""
    if n <= 1:
        return
    import jax

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    jax.config.update("jax_num_cpu_devices", n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxquant", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--cpu-devices", type=int,
                   default=int(os.environ.get("JAXQUANT_CPU_DEVICES", "1")),
                   help="on CPU, split the host into this many JAX devices, each running "
                        "single-threaded, so --data-parallel can use them ($JAXQUANT_CPU_DEVICES)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="perplexity of a model on token windows")
    e.add_argument("--model", required=True, help="HF dir, .gguf file, or 'smollm2-135m'")
    e.add_argument("--data", default="wikitext2", help="'wikitext2' or a .npy of token ids")
    e.add_argument("--windows", type=int, default=64, help="number of windows (0 = all)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--data-parallel", type=int, default=0,
                   help="shard the windows over this many devices (0 = all local devices)")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="generate text with a KV cache")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

    q = sub.add_parser("quantize", help="calibrate and quantize a model with a recipe")
    q.add_argument("--model", required=True, help="HF dir, .gguf file, or 'smollm2-135m'")
    q.add_argument("--recipe", required=True, help="recipe name in configs/recipes or a YAML file")
    q.add_argument("--calib", default="wikitext2", help="'wikitext2' or a .npy of token ids")
    q.add_argument("--out", required=True, help="output directory (progress is saved here)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run")
    q.add_argument("--n-samples", type=int, default=None)
    q.add_argument("--seqlen", type=int, default=None)
    q.add_argument("--data-parallel", type=int, default=1,
                   help="shard the statistics pass over this many devices (a 'data' mesh axis)")
    q.set_defaults(fn=cmd_quantize)

    d = sub.add_parser("demo", help="quantize the real model and compare perplexities")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--recipe", default="gptq_w4_g64")
    d.add_argument("--windows", type=int, default=64)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cpu_devices(args.cpu_devices)
    _enable_compilation_cache()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if getattr(args, "windows", None) == 0:
        args.windows = None
    try:
        result = args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"jaxquant {args.command}: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
