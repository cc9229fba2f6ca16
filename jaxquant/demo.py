"""`make demo`: quantize the real model (SmolLM2-135M) with GPTQ W4 g64 and compare perplexities.

Calibration: the protocol's 32 x 512 WikiText-2 validation windows. Evaluation: the protocol's
quick eval (WikiText-2 test, 64 x 512 windows by default). Rows: fp, RTN (same spec, no data) and
the recipe's method.
"""

from __future__ import annotations

import time

from jaxquant import eval as jeval
from jaxquant import models
from jaxquant.calibration.driver import calibrate
from jaxquant.calibration.weight_only import quantize_linears_rtn
from jaxquant.data import calib_windows, eval_windows
from jaxquant.models.assets import resolve_model_path
from jaxquant.recipes import load_recipe


def run_demo(*, model: str = "smollm2-135m", recipe: str = "gptq_w4_g64",
             windows: int = 64) -> dict:
    t0 = time.perf_counter()
    path = resolve_model_path(model)
    m = models.load(path)
    rec = load_recipe(recipe)
    spec = rec.rules[0].spec
    # the RTN baseline row: plain min-max RTN at the recipe's width (as the rtn_* recipes), not
    # the recipe's own scale search
    rtn_spec = spec.replace(scale_method="minmax", clip_ratio=1.0)
    calib = calib_windows(m.tokenizer, rec.calib["n_samples"], rec.calib["seqlen"],
                          seed=rec.calib["seed"])
    res = calibrate(path, rec, calib)
    w = eval_windows(m.tokenizer, windows, 512)
    rows = []
    for name, params in (("fp (f32)", m.params),
                         (f"RTN W{spec.bits}g{spec.group_size}", quantize_linears_rtn(m.params,
                                                                                       rtn_spec)),
                         (rec.name, res.params)):
        r = jeval.perplexity(jeval.model_logits_fn(m.config, params), w, batch_size=1,
                             vocab_size=m.config.vocab_size)
        rows.append((name, r["ppl"]))
    print(f"\n{m.name}: WikiText-2 test, {len(w)}x512 windows; calibration "
          f"{calib.shape[0]}x{calib.shape[1]} WikiText-2 valid, {res.seconds:.0f} s")
    print("caveat: the GGUF's linears are Q4_1 already, so W4 results are optimistic\n")
    print(f"  {'model':<16} {'PPL':>10}")
    for name, ppl in rows:
        print(f"  {name:<16} {ppl:>10.3f}")
    return {"model": m.name, "recipe": rec.name, "windows": len(w),
            "ppl": {name: ppl for name, ppl in rows}, "calib_seconds": round(res.seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1)}
