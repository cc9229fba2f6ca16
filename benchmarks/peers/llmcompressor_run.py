"""The peer: llm-compressor (CPU, torch) on the same protocol. Runs in its OWN virtual environment
(llm-compressor pins transformers <= 5.17; jaxquant pins 5.24): see `make peer-venv`.

One scheme per process, so wall time and peak RSS are the calibration's own:

    .venv-peer/bin/python benchmarks/peers/llmcompressor_run.py --algo gptq --bits 3 --group 64 \
        --gguf PATH --data DIR

Prints one JSON line: algo, bits, group, calib_seconds, peak_rss_mib (after calibration), ppl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", choices=["rtn", "gptq", "awq"], required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib", default=None, help=".npy of calibration windows (default: the "
                    "protocol's seed-0 file)")
    ap.add_argument("--observer", choices=["minmax", "mse"], default="minmax",
                    help="mse: maxshrink 0.2, grid 100, norm 2.4 (protocol.md's like-for-like)")
    ap.add_argument("--actorder", choices=["none", "static"], default="none")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)

    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot

    # llm-compressor re-reads the config from the model's path, which a GGUF is not: convert the
    # dequantized model to an HF safetensors dir first (not timed)
    hf_dir = os.path.join(tempfile.gettempdir(), "smollm2-135m-f32-hf")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        m = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf),
            dtype=torch.float32)
        t = transformers.AutoTokenizer.from_pretrained(
            os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf))
        m.hf_quantizer = None  # the weights are dequantized f32 already
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        m.save_pretrained(hf_dir)
        t.save_pretrained(hf_dir)
        del m
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    calib = np.load(args.calib or os.path.join(args.data, "smollm2_wikitext2_valid_calib_32x512.npy"))
    ds = Dataset.from_dict({"input_ids": calib.tolist(),
                            "attention_mask": np.ones_like(calib).tolist()})
    weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": args.group}
    if args.observer == "mse":
        weights |= {"observer": "mse",
                    "observer_kwargs": {"maxshrink": 0.2, "grid": 100, "norm": 2.4}}
    if args.actorder == "static":
        weights |= {"actorder": "static"}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if args.algo == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128,
                              dampening_frac=0.01)
    elif args.algo == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups=groups, ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], pipeline="sequential" if args.algo != "rtn" else
            "datafree")
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    windows = np.load(os.path.join(args.data, "smollm2_wikitext2_test_eval_64x512.npy"))
    windows = windows[: args.windows]
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for w in windows:
            t = torch.as_tensor(w[None], dtype=torch.long)
            lg = model(t).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(
                lg.reshape(-1, lg.shape[-1]), t[:, 1:].reshape(-1), reduction="sum"))
            count += t.shape[1] - 1
    print(json.dumps({"engine": "llm-compressor", "algo": args.algo, "bits": args.bits,
                      "group": args.group, "observer": args.observer, "actorder": args.actorder,
                      "calib_seconds": round(secs, 1),
                      "peak_rss_mib": round(rss, 1), "ppl": float(np.exp(total / count))}))


if __name__ == "__main__":
    main()
