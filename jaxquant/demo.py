"""`make demo`: quantize the real model (SmolLM2-135M) with GPTQ W4 g64 and compare perplexities.

Calibration: the protocol's 32 x 512 WikiText-2 validation windows. Evaluation: the protocol's
quick eval (WikiText-2 test, 64 x 512 windows by default). Rows: fp, RTN (same spec, no data) and
the recipe's method.
"""

from __future__ import annotations

import dataclasses
import time

import jaxquant as jq
from jaxquant import eval as jeval
from jaxquant.data import eval_windows
from jaxquant.recipes import load_recipe


def run_demo(*, model: str = "smollm2-135m", recipe: str = "gptq_w4_g64",
             windows: int = 64) -> dict:
    t0 = time.perf_counter()
    m = jq.load(model)
    rec = load_recipe(recipe)
    spec = rec.rules[0].spec
    # the RTN baseline row: plain min-max RTN at the recipe's width (as the rtn_* recipes), not
    # the recipe's own scale search; data-free, so the engine runs no forward for it
    rtn_spec = dataclasses.asdict(spec.replace(scale_method="minmax", clip_ratio=1.0))
    rtn = jq.quantize_model(m, {"name": "rtn", "rules": [
        {"pattern": r.pattern, "algorithm": "rtn", "spec": rtn_spec} for r in rec.rules]}, None)
    qm = jq.quantize_model(m, rec, "wikitext2")
    res = qm.calibration
    calib_shape = (rec.calib["n_samples"], rec.calib["seqlen"])
    w = eval_windows(m.tokenizer, windows, 512)
    rows = []
    for name, params in (("fp (f32)", m.params),
                         (f"RTN W{spec.bits}g{spec.group_size}", rtn.params),
                         (rec.name, qm.params)):
        r = jeval.perplexity(jeval.model_logits_fn(m.config, params), w, batch_size=1,
                             vocab_size=m.config.vocab_size)
        rows.append((name, r["ppl"]))
    print(f"\n{m.name}: WikiText-2 test, {len(w)}x512 windows; calibration "
          f"{calib_shape[0]}x{calib_shape[1]} WikiText-2 valid, {res.seconds:.0f} s")
    print("caveat: the GGUF's linears are Q4_1 already, so W4 results are optimistic\n")
    print(f"  {'model':<16} {'PPL':>10}")
    for name, ppl in rows:
        print(f"  {name:<16} {ppl:>10.3f}")
    return {"model": m.name, "recipe": rec.name, "windows": len(w),
            "ppl": {name: ppl for name, ppl in rows}, "calib_seconds": round(res.seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1)}
