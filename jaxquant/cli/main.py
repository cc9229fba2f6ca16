"""``jaxquant`` command line: ``eval``, ``generate``, ``quantize``, ``sample`` and ``demo`` (on the
front door: ``jaxquant.load``, ``quantize_model``, ``evaluate``).

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

log = logging.getLogger(__name__)


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


def _calib_mesh(args):
    """The calibration mesh: ``("data", "model")`` over every process's devices for a
    multi-process job or ``--model-parallel`` > 1 (``model`` within a host), else the 1-D data
    mesh of ``--data-parallel``."""
    import jax
    from jax.sharding import Mesh

    m = int(args.model_parallel)
    if not args.distributed and m <= 1:
        return _data_mesh(args.data_parallel), None
    local = jax.local_device_count()
    if m < 1 or local % m:
        raise ValueError(f"--model-parallel {m}: must divide the {local} devices of each host")
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs).reshape(-1, m), ("data", "model")), ("model" if m > 1 else None)


def init_distributed(args) -> None:
    """``jax.distributed.initialize`` for a multi-process job: explicit coordinator flags, or
    the cluster's own discovery (TPU pod slices, SLURM) when they are absent."""
    import jax

    kw = {}
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id")
        kw = {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
              "process_id": args.process_id}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def cmd_eval(args) -> dict:
    import jaxquant as jq

    t0 = time.perf_counter()
    m = _load(args.model)
    from jaxquant.models.dit import DiffusionTransformer

    if isinstance(m, DiffusionTransformer):
        return _eval_dit(args, m)
    mesh = _data_mesh(args.data_parallel)
    r = jq.evaluate(m, args.data, args.windows, seqlen=args.seqlen, batch_size=args.batch_size,
                    mesh=mesh)
    out = {"model": m.name, "data": args.data, "tokens": r["tokens"], "ppl": r["ppl"],
           "seconds": round(time.perf_counter() - t0, 2)}
    print(_table([("model", m.name), ("data", f"{args.data} {r['windows']}x{r['seqlen']}"),
                  ("tokens", str(r["tokens"])), ("ppl", f"{r['ppl']:.4f}"),
                  ("seconds", f"{out['seconds']:.1f}")]))
    return out


def _eval_dit(args, m) -> dict:
    """``jaxquant eval`` of a quantized DiT: against its fp source (``--reference``, default: the
    source recorded in its ``jaxquant.json``), same noise and classes."""
    from jaxquant.eval.dit import evaluate_dit
    from jaxquant.models import dit

    ref_path = args.reference
    if ref_path is None:
        meta = os.path.join(args.model, "jaxquant.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                ref_path = json.load(f).get("source")
    if ref_path is None:
        raise ValueError(f"{args.model}: a DiT is evaluated against its fp model; pass --reference")
    ref = dit.load_diffusers(ref_path)
    cdir = args.classifier
    if cdir is None:
        guesses = [os.path.join(d, "classifier") for d in
                   (ref_path, os.path.dirname(os.path.normpath(ref_path)))]
        cdir = next((g for g in guesses if os.path.isfile(os.path.join(g, "classifier.json"))),
                    None)
    r = evaluate_dit(m, ref, classifier_dir=cdir, per_class=args.per_class, steps=args.steps,
                     seed=args.seed)
    rows = [("model", args.model), ("reference", ref_path), ("samples", str(r["samples"])),
            ("PSNR vs fp", f"{r['psnr']:.2f} dB"), ("MSE vs fp", f"{r['mse']:.6f}")]
    if "acc" in r:
        rows += [("class accuracy", f"{r['acc']:.3f} (fp {r['acc_ref']:.3f})"),
                 ("Fréchet distance", f"{r['fd']:.2f} (fp {r['fd_ref']:.2f})")]
    print(_table(rows))
    return {"model": args.model, "reference": ref_path, **r}


def _dllm_prompt(m, args) -> tuple[np.ndarray, object]:
    """The prompt ids ``[1, P]`` of a masked-diffusion LM from ``--prompt-ids`` or ``--prompt``
    (with the tokenizer beside the model), and the tokenizer (or None)."""
    tok = None
    if m.path and os.path.isfile(os.path.join(m.path, "tokenizer.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(m.path)
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated "
                             "integer token ids") from None
    else:
        if tok is None:
            raise ValueError(f"--prompt: {m.path} has no tokenizer.json; pass --prompt-ids")
        ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [i for i in ids if not 0 <= i < m.config.embedding_size]
    if bad:
        raise ValueError(f"--prompt-ids: ids {bad[:4]} outside the embedding [0, "
                         f"{m.config.embedding_size})")
    return np.asarray([ids], np.int32), tok


def cmd_generate_dllm(m, args) -> dict:
    """Masked-diffusion decoding of a LLaDA model (semi-autoregressive blocks; Elastic-dLLM
    compression with --keep-far / --terminal-mask / --fold-window; block diffusion with a KV
    cache with --block-diffusion)."""
    import jax

    from jaxquant.diffusion.block import generate_block
    from jaxquant.diffusion.elastic import generate_compressed
    from jaxquant.diffusion.masked import generate

    mask_id = m.config.mask_token_id if args.mask_id is None else args.mask_id
    if not 0 <= mask_id < m.config.embedding_size:
        raise ValueError(f"--mask-id {mask_id} is not a row of the embedding "
                         f"(embedding_size {m.config.embedding_size})")
    prompt, tok = _dllm_prompt(m, args)
    gen, bl = args.gen_length, args.block_length
    steps = args.steps if args.steps is not None else gen
    n_blocks = gen // bl if bl > 0 and gen % bl == 0 else 0
    t_start = [time.perf_counter()]

    def progress(b):
        el = time.perf_counter() - t_start[0]
        print(f"block {b + 1}/{n_blocks} ({el:.1f} s, ETA {el / (b + 1) * (n_blocks - b - 1):.1f}"
              " s)", file=sys.stderr, flush=True)

    kw = dict(gen_length=gen, block_length=bl, steps=steps, remasking=args.remasking,
              temperature=args.temperature, mask_id=mask_id, key=jax.random.key(args.seed),
              max_length=m.config.max_sequence_length, progress=progress)
    compressed = args.keep_far is not None or args.terminal_mask or args.fold_window is not None
    if args.block_diffusion:
        if args.keep_far is not None or args.fold_window is not None:
            raise ValueError("--block-diffusion takes --terminal-mask, not --keep-far / "
                             "--fold-window (its KV cache already skips the far masks)")
        mode = "block_diffusion"

        def run():
            return generate_block(m.logits_fn, m.params, prompt, terminal_mask=args.terminal_mask,
                                  **kw), None
    elif compressed:
        mode = "elastic"

        def run():
            return generate_compressed(m.logits_fn, m.params, prompt, keep_far=args.keep_far,
                                       terminal_mask=args.terminal_mask,
                                       fold_window=args.fold_window, return_stats=True, **kw)
    else:
        mode = "baseline"

        def run():
            return generate(m.logits_fn, m.params, prompt, **kw), None

    if args.warmup:  # compile (and run) once, then time a second decode
        run()
    t_start[0] = time.perf_counter()
    out, stats = run()
    out = np.asarray(jax.block_until_ready(out))
    secs = time.perf_counter() - t_start[0]
    p = prompt.shape[1]
    ids = out[0, : p + gen].tolist()  # the prompt and the generation (no terminal [MASK])
    spb = steps // max(n_blocks, 1)
    if stats is not None:
        kept = [int(k) for k in stats["tokens_per_step"]]
    elif mode == "block_diffusion":
        kept = [bl + int(args.terminal_mask)] * steps
    else:
        kept = [p + gen] * steps
    text = None
    if tok is not None:
        text = tok.decode(ids[p:])
        print(tok.decode(ids[:p]) + text)
    return {"model": m.name, "mode": mode, "output_ids": ids, "gen_length": gen,
            "block_length": bl, "steps": steps, "steps_per_block": spb,
            "remasking": args.remasking, "mask_id": mask_id, "keep_far": args.keep_far,
            "terminal_mask": bool(args.terminal_mask), "fold_window": args.fold_window,
            "seconds": round(secs, 3), "tokens_per_s": round(gen / secs, 2),
            "includes_compile": not args.warmup, "kept_per_step": kept,
            "completion": text}


def cmd_generate(args) -> dict:
    import jax

    from jaxquant.models import llada
    from jaxquant.models.common.generate import generate

    m = _load(args.model)
    if isinstance(m, llada.LLaDAModel):
        return cmd_generate_dllm(m, args)
    if args.prompt is None:
        raise ValueError("--prompt is required for an autoregressive model")
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


def cmd_export(args) -> dict:
    from jaxquant.export import export

    t0 = time.perf_counter()
    out = export(args.model, args.format, args.out, dtype=args.dtype)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"exported {args.model} as {args.format} to {out} ({size / 2**20:.1f} MiB)")
    return {"model": args.model, "format": args.format, "out": out, "dtype": args.dtype,
            "bytes": size, "seconds": round(time.perf_counter() - t0, 2)}


def cmd_quantize(args) -> dict:
    import resource

    import jaxquant as jq
    from jaxquant.calibration import report
    from jaxquant.diffusion.adatsq import is_adatsq
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.recipes import load_recipe

    if is_adatsq(args.recipe):
        return _quantize_adatsq(args)
    recipe = load_recipe(args.recipe)
    path = resolve_model_path(args.model)
    # the command line overrides the recipe's calibration sizes
    sizes = {k: v for k, v in (("n_samples", args.n_samples), ("seqlen", args.seqlen)) if v}
    if sizes:
        recipe = recipe.with_calib(**sizes)
    mesh, model_axis = _calib_mesh(args)
    gb = 2**30
    qm = jq.quantize_model(
        path, recipe, args.calib, out=args.out, resume=args.resume, mesh=mesh,
        model_axis=model_axis, offload=args.offload,
        act_budget=None if args.act_budget_gb is None else int(args.act_budget_gb * gb),
        disk_budget=None if args.disk_budget_gb is None else int(args.disk_budget_gb * gb))
    res = qm.calibration
    import jax

    if jax.process_index() == 0:
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


def _dit_scheduler(model_dir: str):
    from jaxquant.diffusion.schedules import NoiseSchedule
    from jaxquant.eval.dit import find_scheduler

    f = find_scheduler(model_dir)
    if f is None:
        raise FileNotFoundError(f"{model_dir}: no scheduler/scheduler_config.json beside the "
                                "transformer (a diffusers pipeline directory has one)")
    with open(f) as fh:
        return f, NoiseSchedule.from_config(json.load(fh), ignore_unknown=True)


def _quantize_adatsq(args) -> dict:
    """``jaxquant quantize --recipe adatsq_*``: Fisher weights, option models, policy search."""
    from jaxquant.diffusion.adatsq import load_adatsq_recipe, run_adatsq, save_adatsq
    from jaxquant.models import dit

    rec = load_adatsq_recipe(args.recipe)
    m = dit.load_diffusers(args.model)
    if m.config.kind != "dit":
        raise ValueError(f"{args.model}: AdaTSQ recipes search per-step policies of a "
                         f"class-conditional DiT; this is a {m.config.kind!r} transformer")
    sched_file, sched = _dit_scheduler(args.model)
    res = run_adatsq(m, rec, sched, progress=True, out_dir=args.out, resume=args.resume)
    save_adatsq(args.out, m, res, scheduler_file=sched_file)
    s = res.search
    print(_table([("recipe", rec.name), ("policy", " ".join(rec.names[k] for k in s.policy)),
                  ("average bits", f"{s.avg_bits:.3f} (budget {rec.budget:g})"),
                  ("search MSE", f"{s.error:.3g}"), ("prefixes scored", str(s.evaluated)),
                  ("seconds", ", ".join(f"{k} {v:.1f}" for k, v in res.seconds.items())),
                  ("saved", args.out)]))
    return {"model": args.model, "recipe": rec.name, "out": args.out,
            "policy": [rec.names[k] for k in s.policy], "avg_bits": s.avg_bits,
            "search_error": s.error, "seconds": {k: round(v, 2) for k, v in res.seconds.items()}}


def cmd_sample(args) -> dict:
    """Class-conditional DDIM samples of a diffusers DiT (optionally quantized in memory with a
    recipe, calibrated on the fp model's own trajectories) saved as a grid PNG."""
    import jax

    from jaxquant.calibration.engine import calibrate
    from jaxquant.diffusion.adatsq import POLICY_FILE, load_adatsq
    from jaxquant.diffusion.calibration import sample_dit, trajectory_batch
    from jaxquant.models import dit
    from jaxquant.models.loading import adapter_for
    from jaxquant.models.quantized import is_quantized_dir
    from jaxquant.recipes import load_recipe

    policy = None
    if os.path.isfile(os.path.join(args.model, POLICY_FILE)):  # an AdaTSQ result
        cfg, options, policy, _ = load_adatsq(args.model)
        if args.steps != len(policy):
            raise ValueError(f"{args.model}/{POLICY_FILE}: the policy has {len(policy)} steps; "
                             f"sample with --steps {len(policy)} (got --steps {args.steps})")
        if args.recipe:
            raise ValueError("--recipe: an AdaTSQ result is already quantized")
        m = None
    else:
        m = _load(args.model) if is_quantized_dir(args.model) \
            else dit.load_diffusers(args.model)
        cfg = m.config
    if cfg.kind != "dit":
        raise ValueError(f"{args.model}: 'sample' draws class-conditional DiT samples; this is a "
                         f"{cfg.kind!r} transformer")
    _, sched = _dit_scheduler(args.model)
    classes = list(range(cfg.num_classes)) if args.classes == "all" else \
        [int(c) for c in args.classes.split(",")]
    bad = [c for c in classes if not 0 <= c < cfg.num_classes]
    if bad:
        raise ValueError(f"--classes: {bad} outside the model's classes [0, {cfg.num_classes})")
    params, calib_s = (m.params if m is not None else None), 0.0
    if args.recipe:
        recipe = load_recipe(args.recipe)
        t0 = time.perf_counter()
        calib = trajectory_batch(cfg, m.params, sched, n_per_class=args.calib_per_class,
                                 steps=args.steps, guidance=args.guidance, seed=args.seed + 1)
        params = calibrate(adapter_for(m), recipe, calib, progress=True).params
        calib_s = time.perf_counter() - t0
    labels = np.repeat(np.asarray(classes, np.int32), args.per_class)
    t0 = time.perf_counter()
    if policy is not None:
        from jaxquant.diffusion.calibration import sample_dit_policy

        samples = np.asarray(jax.jit(lambda y: sample_dit_policy(
            cfg, options, sched, y, np.asarray(policy), steps=args.steps,
            guidance=args.guidance, seed=args.seed))(labels))
    else:
        samples = np.asarray(jax.jit(lambda y: sample_dit(
            cfg, params, sched, y, steps=args.steps, guidance=args.guidance,
            seed=args.seed))(labels))
    secs = time.perf_counter() - t0
    _save_grid(samples, len(classes), args.out)
    print(_table([("model", args.model), ("recipe", args.recipe or "fp"),
                  ("samples", f"{len(labels)} ({len(classes)} classes x {args.per_class})"),
                  ("steps", str(args.steps)), ("seconds", f"{secs:.1f}"), ("grid", args.out)]))
    return {"model": args.model, "recipe": args.recipe, "classes": classes,
            "per_class": args.per_class, "steps": args.steps, "seed": args.seed,
            "sample_seconds": round(secs, 2), "calib_seconds": round(calib_s, 2),
            "out": args.out}


def _save_grid(samples: np.ndarray, n_cols: int, path: str) -> None:
    """``samples`` ``[B, C, H, W]`` in [-1, 1], class-major, as a PNG grid (a column per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = len(samples) // n_cols
    img = np.clip((samples + 1.0) / 2.0, 0.0, 1.0)
    _, c, h, w = img.shape
    grid = img.reshape(n_cols, per, c, h, w).transpose(1, 3, 0, 4, 2)
    grid = grid.reshape(per * h, n_cols * w, c)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plt.imsave(path, grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None)


def cmd_demo(args) -> dict:
    from jaxquant.demo import run_demo

    return run_demo(model=args.model, recipe=args.recipe, windows=args.windows)


def _enable_compilation_cache() -> None:
    """Reuse compiled XLA programs across CLI runs ($JAXQUANT_XLA_CACHE, '' to disable)."""
    import jax

    d = os.environ.get("JAXQUANT_XLA_CACHE", os.path.expanduser("~/.cache/jaxquant/xla"))
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
    e.add_argument("--reference", default=None,
                   help="DiT: the fp diffusers model to compare samples with (default: the source)")
    e.add_argument("--classifier", default=None, help="DiT: a classifier dir (accuracy, FD)")
    e.add_argument("--per-class", type=int, default=10, help="DiT: samples per class")
    e.add_argument("--steps", type=int, default=25, help="DiT: DDIM steps")
    e.add_argument("--seed", type=int, default=0, help="DiT: the noise seed")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="generate text: autoregressive with a KV cache, or "
                       "masked diffusion for a LLaDA model (Elastic-dLLM compression)")
    g.add_argument("--model", required=True)
    pg = g.add_mutually_exclusive_group(required=True)
    pg.add_argument("--prompt", default=None)
    pg.add_argument("--prompt-ids", default=None, help="dLLM: comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gen-length", type=int, default=128, help="dLLM: generated positions")
    g.add_argument("--block-length", type=int, default=32, help="dLLM: semi-AR block")
    g.add_argument("--steps", type=int, default=None, help="dLLM: denoising steps "
                   "(default: gen length, one token per step)")
    g.add_argument("--remasking", default="low_confidence", choices=("low_confidence", "random"))
    g.add_argument("--mask-id", type=int, default=None,
                   help="dLLM: [MASK] id (default: the config's mask_token_id)")
    g.add_argument("--keep-far", type=int, default=None,
                   help="dLLM: Elastic-dLLM compression, far [MASK]s kept (incl. the last)")
    g.add_argument("--terminal-mask", action="store_true",
                   help="dLLM: a protected terminal [MASK] after the generation")
    g.add_argument("--fold-window", type=int, default=None,
                   help="dLLM: context folding, at most this many tokens per forward")
    g.add_argument("--block-diffusion", action="store_true",
                   help="dLLM: causal across blocks with a KV cache of finished blocks")
    g.add_argument("--warmup", action="store_true",
                   help="dLLM: decode once to compile, then time a second decode")
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("export", help="write a quantized model as compressed-tensors, GPTQ or "
                       "orbax (what vLLM / transformers load)")
    x.add_argument("--model", required=True, help="a jaxquant quantized directory")
    x.add_argument("--format", required=True, choices=("compressed-tensors", "gptq", "orbax"))
    x.add_argument("--out", required=True)
    x.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="dense tensors and (compressed-tensors) scales; GPTQ scales are fp16")
    x.set_defaults(fn=cmd_export)

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
    q.add_argument("--model-parallel", type=int, default=1,
                   help="split every weight's output columns over this many devices of a host "
                        "while it is quantized (a 'model' mesh axis)")
    q.add_argument("--offload", action="store_true",
                   help="for models larger than memory: keep no quantized block in memory, "
                        "each is written to --out as it finishes")
    q.add_argument("--act-budget-gb", type=float, default=None,
                   help="carried activations larger than this live in a memory-mapped file in "
                        "--out between blocks")
    q.add_argument("--disk-budget-gb", type=float, default=None,
                   help="refuse (before calibrating) a run whose checkpoints need more disk")
    q.add_argument("--distributed", action="store_true",
                   help="one job over several processes/hosts (jax.distributed): the samples "
                        "are sharded over every device of every host; all hosts run this same "
                        "command, --out must be a directory they all see")
    q.add_argument("--coordinator", default=None,
                   help="host:port of process 0 (default: the cluster's own discovery, e.g. "
                        "on a TPU pod slice)")
    q.add_argument("--num-processes", type=int, default=None)
    q.add_argument("--process-id", type=int, default=None)
    q.set_defaults(fn=cmd_quantize)

    sm = sub.add_parser("sample", help="class-conditional DDIM samples of a DiT as a PNG grid")
    sm.add_argument("--model", required=True,
                    help="diffusers directory (pipeline with transformer/ and scheduler/)")
    sm.add_argument("--steps", type=int, default=50)
    sm.add_argument("--classes", default="all", help="'all' or comma-separated class ids")
    sm.add_argument("--per-class", type=int, default=4)
    sm.add_argument("--guidance", type=float, default=1.5)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--recipe", default=None,
                    help="quantize in memory first (a dit_* recipe), calibrated on fp trajectories")
    sm.add_argument("--calib-per-class", type=int, default=4)
    sm.add_argument("--out", required=True, help="PNG path")
    sm.set_defaults(fn=cmd_sample)

    d = sub.add_parser("demo", help="quantize the real model and compare perplexities")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--recipe", default="gptq_w4_g64")
    d.add_argument("--windows", type=int, default=64)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cpu_devices(args.cpu_devices)
    if getattr(args, "distributed", False):
        init_distributed(args)
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
