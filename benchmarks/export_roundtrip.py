"""Export round trip on the real model (issue 17, item 1): SmolLM2-135M quantized with GPTQ W4 g64
(`gptq_w4_g64`, the protocol's 32 x 512 WikiText-2 calibration windows), exported

* as compressed-tensors pack-quantized (float32 dense tensors and scales), loaded by transformers
  on CPU with the `compressed-tensors` package (`CompressedTensorsConfig(dequantize=True)`): its
  logits against jaxquant's quantized model on held-out WikiText-2 tokens;
* as GPTQ v1 (fp16 scales), re-imported by `jaxquant.load`: codes, zero points and scales
  against the exporting model, and the re-imported model's logits;

plus file sizes and seconds. Writes ``benchmarks/results/export_roundtrip_<date>.json``.

    JAXQUANT_DATA=../shared/data .venv/bin/python benchmarks/export_roundtrip.py
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _size(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    import jaxquant
    from jaxquant import data as jdata
    from jaxquant.core.qarray import dequantize
    from jaxquant.export import export
    from jaxquant.models.common.decoder import layer_params

    t0 = time.perf_counter()
    m = jaxquant.load("smollm2-135m")
    q = jaxquant.quantize_model(m, "gptq_w4_g64", "wikitext2", progress=False)
    calib_s = time.perf_counter() - t0
    toks = jdata.eval_windows(m.tokenizer, 2, 128)[:2]
    ref = np.asarray(q(toks))
    res = {"date": datetime.date.today().isoformat(), "model": "smollm2-135m",
           "recipe": "gptq_w4_g64", "quantize_seconds": round(calib_s, 1),
           "eval_tokens": list(np.asarray(toks).shape)}
    with tempfile.TemporaryDirectory() as d:
        t1 = time.perf_counter()
        ct = export(q, "compressed-tensors", os.path.join(d, "ct"), dtype="float32")
        res["ct_export_seconds"] = round(time.perf_counter() - t1, 2)
        res["ct_bytes"] = _size(ct)
        tm = AutoModelForCausalLM.from_pretrained(
            ct, quantization_config=CompressedTensorsConfig(dequantize=True),
            dtype=torch.float32)
        with torch.no_grad():
            hf = tm(torch.as_tensor(np.asarray(toks), dtype=torch.long)).logits.numpy()
        res["ct_transformers_max_abs_logit_diff"] = float(np.abs(hf - ref).max())
        res["ct_transformers_same_argmax"] = float(np.mean(hf.argmax(-1) == ref.argmax(-1)))
        t1 = time.perf_counter()
        g = export(q, "gptq", os.path.join(d, "gptq"), dtype="float32")
        res["gptq_export_seconds"] = round(time.perf_counter() - t1, 2)
        res["gptq_bytes"] = _size(g)
        back = jaxquant.load(g)
        same_codes, max_scale_rel = True, 0.0
        for i in range(q.config.num_layers):
            a, b = layer_params(q.params, i), layer_params(back.params, i)
            for grp, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                               ("mlp", ("gate_proj", "up_proj", "down_proj"))):
                for n in names:
                    ka, kb = a[grp][n]["kernel"], b[grp][n]["kernel"]
                    same_codes &= bool(np.array_equal(np.asarray(ka.codes()),
                                                      np.asarray(kb.codes())))
                    same_codes &= bool(np.array_equal(np.asarray(ka.zero_point()),
                                                      np.asarray(kb.zero_point())))
                    sa, sb = np.asarray(ka.scale, np.float32), np.asarray(kb.scale, np.float32)
                    max_scale_rel = max(max_scale_rel,
                                        float(np.max(np.abs(sb - sa) / np.abs(sa))))
                    # the re-import is exact against the GPTQ file: fp16 scales times codes
                    want = (sa.astype(np.float16).astype(np.float32)[:, None, :]
                            * (np.asarray(ka.codes(), np.float32).reshape(
                                sa.shape[0], -1, sa.shape[1])
                               - np.asarray(ka.zero_point(), np.float32)[:, None, :]))
                    got = np.asarray(dequantize(kb)).reshape(want.shape)
                    same_codes &= bool(np.array_equal(got, want))
        res["gptq_reimport_codes_zeros_and_dequant_bit_exact"] = same_codes
        res["gptq_fp16_scale_max_rel_change"] = max_scale_rel
        res["gptq_reimport_max_abs_logit_diff"] = float(np.abs(np.asarray(back(toks))
                                                               - ref).max())
    res["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"export_roundtrip_{res['date']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    for k, v in res.items():
        print(f"  {k}: {v}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
