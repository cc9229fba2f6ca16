"""`make demo`: quantize the real model (SmolLM2-135M) and compare perplexity and KL with fp.

Until the calibration engine lands, the quantizer is round-to-nearest (asymmetric, group-wise,
every block linear; embeddings and head stay fp).
"""

from __future__ import annotations

import re
import time

from jaxquant import eval as jeval
from jaxquant import models
from jaxquant.calibration.weight_only import quantize_linears_rtn
from jaxquant.core.spec import QuantSpec
from jaxquant.data import eval_windows
from jaxquant.models.assets import resolve_model_path


def parse_scheme(s: str) -> QuantSpec:
    """``"w4g64"`` -> 4-bit asymmetric, group 64; ``"w8"`` -> per output channel."""
    m = re.fullmatch(r"w(\d)(?:g(\d+))?", s.strip().lower())
    if not m:
        raise ValueError(f"scheme must look like 'w4g64' or 'w8', got {s!r}")
    return QuantSpec(bits=int(m.group(1)), group_size=int(m.group(2) or -1))


def run_demo(*, model: str = "smollm2-135m", windows: int = 16, schemes: str = "w4g64") -> dict:
    t0 = time.perf_counter()
    m = models.load(resolve_model_path(model))
    w = eval_windows(m.tokenizer, windows, 512)
    fp_fn = jeval.model_logits_fn(m.config, m.params)
    rows = [("fp (f32)", jeval.perplexity(fp_fn, w, vocab_size=m.config.vocab_size)["ppl"], 0.0)]
    for s in schemes.split(","):
        qparams = quantize_linears_rtn(m.params, parse_scheme(s))
        q_fn = jeval.model_logits_fn(m.config, qparams)
        ppl = jeval.perplexity(q_fn, w, vocab_size=m.config.vocab_size)["ppl"]
        kl = jeval.kl_divergence(fp_fn, q_fn, w)["kl"]
        rows.append((f"RTN {s.upper()}", ppl, kl))
    print(f"\n{m.name}: WikiText-2 test, {len(w)}x512 windows (protocol quick eval = 64)")
    print("caveat: the GGUF's linears are Q4_1 already, so W4 results are optimistic\n")
    print(f"  {'scheme':<12} {'PPL':>12} {'KL to fp':>10}")
    for name, ppl, kl in rows:
        print(f"  {name:<12} {ppl:>12.3f} {kl:>10.4f}")
    return {"model": m.name, "windows": len(w),
            "results": {name: {"ppl": ppl, "kl": kl} for name, ppl, kl in rows},
            "seconds": round(time.perf_counter() - t0, 1)}
