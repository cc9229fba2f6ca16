"""Choose GPTQ's group-scale observer (min-max or MSE grid search) on held-out VALIDATION windows.

For each width, the protocol's GPTQ recipe (``gptq_w{b}_g64``: act-order, static groups) runs
once with ``scale_method: minmax`` (what llm-compressor's default observer does) and once with
``scale_method: mse`` (a per-group grid search of the clip ratio as in the GPTQ reference's
``Quantizer(mse=True)``: error norm 2.4, here over ratios [0.8, 1] on 100 points -- the
reference's own range is wider, 1 - i/100 for i < 80 -- fitted on the original weights before
the loop). The choice is made on 16 WikiText-2 *validation*
windows that share no token with the calibration windows (``jaxquant.data.heldout_windows``);
the protocol's test PPL is printed for the record and is not used to choose.

    .venv/bin/python benchmarks/select_gptq_observer.py --bits 2,3,4
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="minmax,mse")
    ap.add_argument("--json", default=None, help="rows are appended to this file's rows")
    args = ap.parse_args()

    import protocol_data

    from jaxquant import data as jdata
    from jaxquant import eval as jeval
    from jaxquant import models
    from jaxquant.calibration.engine import calibrate
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.models.loading import adapter_for
    from jaxquant.recipes import load_recipe

    path = resolve_model_path(args.model)
    calib = protocol_data.load(protocol_data.CALIB)
    test = protocol_data.load(protocol_data.TEST)
    held = jdata.heldout_windows(models.load(path).tokenizer, 16, 512)
    rows = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            rows = json.load(f)["rows"]
    for bits in [int(b) for b in args.bits.split(",")]:
        base = load_recipe(f"gptq_w{bits}_g64").to_dict()
        for method in args.methods.split(","):
            r = json.loads(json.dumps(base))
            for rule in r["rules"]:
                rule["spec"]["scale_method"] = method
                if method == "mse":
                    rule["spec"].update(clip_ratio=0.81, mse_grid=20, mse_norm=2.4)
            t0 = time.perf_counter()
            res = calibrate(adapter_for(path), load_recipe(r), calib, progress=False)
            secs = time.perf_counter() - t0
            fn = jeval.model_logits_fn(res.config, res.params)
            val = jeval.perplexity(fn, held, batch_size=1, progress=False)["ppl"]
            tst = jeval.perplexity(fn, test, batch_size=1, progress=False)["ppl"]
            rows.append({"bits": bits, "scale_method": method, "val_ppl": val, "test_ppl": tst,
                         "calib_seconds": round(secs, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n  {'scheme':<8} {'observer':<8} {'val PPL (16 held-out)':>22} {'test PPL':>10} "
          f"{'calib s':>8}  chosen (lower val PPL)")
    for bits in sorted({r["bits"] for r in rows}):
        rs = [r for r in rows if r["bits"] == bits]
        best = min(rs, key=lambda r: r["val_ppl"])
        for r in rs:
            print(f"  W{bits}g64   {r['scale_method']:<8} {r['val_ppl']:>22.2f} "
                  f"{r['test_ppl']:>10.2f} {r['calib_seconds']:>8.1f}  "
                  f"{'<-' if r is best else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
