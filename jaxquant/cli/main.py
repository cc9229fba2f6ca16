"""``jaxquant`` command line: ``eval``, ``generate`` and ``demo``.

Every command prints a short human table, then one final JSON line for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np


def _load(path: str):
    from jaxquant import models
    from jaxquant.models.assets import resolve_model_path

    return models.load(resolve_model_path(path))


def _windows(model, data: str, n_windows: int | None, seqlen: int) -> np.ndarray:
    from jaxquant import data as jdata

    if data == "wikitext2":
        return jdata.eval_windows(model.tokenizer, n_windows, seqlen)
    if data.endswith(".npy"):
        arr = np.load(data, allow_pickle=False)
        if arr.ndim == 1:
            return jdata.windows_from_tokens(arr, n_windows, seqlen)
        return arr[:n_windows] if n_windows else arr
    raise SystemExit(f"--data must be 'wikitext2' or a .npy file of token ids, got {data!r}")


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def cmd_eval(args) -> dict:
    from jaxquant import eval as jeval

    t0 = time.perf_counter()
    m = _load(args.model)
    windows = _windows(m, args.data, args.windows, args.seqlen)
    r = jeval.perplexity(
        jeval.model_logits_fn(m.config, m.params), windows, batch_size=args.batch_size,
        vocab_size=m.config.vocab_size,
    )
    out = {"model": m.name, "data": args.data, "tokens": r["tokens"], "ppl": r["ppl"],
           "seconds": round(time.perf_counter() - t0, 2)}
    print(_table([("model", m.name), ("data", f"{args.data} {windows.shape[0]}x{windows.shape[1]}"),
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


def cmd_demo(args) -> dict:
    from jaxquant.demo import run_demo

    return run_demo(model=args.model, windows=args.windows, schemes=args.schemes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxquant", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="perplexity of a model on token windows")
    e.add_argument("--model", required=True, help="HF dir, .gguf file, or 'smollm2-135m'")
    e.add_argument("--data", default="wikitext2", help="'wikitext2' or a .npy of token ids")
    e.add_argument("--windows", type=int, default=64, help="number of windows (0 = all)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=1)
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

    d = sub.add_parser("demo", help="quantize the real model and compare perplexities")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--windows", type=int, default=16)
    d.add_argument("--schemes", default="w4g64,w3g64,w2g64")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if getattr(args, "windows", None) == 0:
        args.windows = None
    result = args.fn(args)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
