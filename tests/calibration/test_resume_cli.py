"""`jaxquant quantize`: killed by a signal mid-run, resumed, bit-identical to an uninterrupted run;
its outputs (JSON line, table, CSV, plot) and `jaxquant eval` on the quantized checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxquant import models
from jaxquant.models.quantized import load_tree
from tests.models.hf_tiny import make_hf_model

RECIPE = """name: gptq_tiny
rules:
  - pattern: 'layers/\\d+/(self_attn|mlp)/\\w+_proj'
    algorithm: gptq
    spec: {bits: 3, group_size: 32}
calibration: {n_samples: 8, seqlen: 64, batch_size: 4, seed: 0}
"""


def _cli(*args):
    return [sys.executable, "-m", "jaxquant.cli.main", *args]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch  # noqa: F401  (the oracle model is built with torch)

    d = tmp_path_factory.mktemp("cli")
    model = d / "model"
    hf = make_hf_model("qwen3", "gqa", False, seed=21)
    hf.save_pretrained(model)
    tokens = np.random.default_rng(2).integers(0, 96, size=(8, 64)).astype(np.int32)
    np.save(d / "calib.npy", tokens)
    (d / "recipe.yaml").write_text(RECIPE)
    return d


def _params(out):
    return jax.tree.leaves(load_tree(os.path.join(out, "params")))


def test_killed_run_resumes_bit_identical(setup):
    d = setup
    common = ["quantize", "--model", str(d / "model"), "--recipe", str(d / "recipe.yaml"),
              "--calib", str(d / "calib.npy")]
    ref = d / "ref"
    subprocess.run(_cli(*common, "--out", str(ref)), check=True, capture_output=True, timeout=600)

    out = d / "killed"
    state = out / "progress" / "state.json"
    proc = subprocess.Popen(_cli(*common, "--out", str(out)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    killed_at = None
    while time.time() - t0 < 600:
        if state.exists():
            try:
                nb = json.loads(state.read_text())["next_block"]
            except (json.JSONDecodeError, KeyError):
                nb = 0
            if nb >= 1:
                proc.send_signal(signal.SIGKILL)
                killed_at = nb
                break
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None and killed_at < 3, "the run finished before it could be killed"
    assert not (out / "jaxquant.json").exists()
    # without --resume the half-done directory is refused
    r = subprocess.run(_cli(*common, "--out", str(out)), capture_output=True, text=True)
    assert r.returncode != 0 and "--resume" in r.stderr
    r = subprocess.run(_cli(*common, "--out", str(out), "--resume"), check=True,
                       capture_output=True, text=True, timeout=600)
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["resumed_from_block"] == killed_at
    assert set(last["phase_seconds"]) == {"read", "statistics", "algorithm", "propagation",
                                          "checkpoint"}
    for a, b in zip(_params(ref), _params(out), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_outputs_and_eval_of_quantized_checkpoint(setup):
    d = setup
    out = d / "ref"
    if not (out / "jaxquant.json").exists():
        pytest.skip("depends on the reference run of the resume test")
    assert (out / "layers.csv").read_text().startswith("layer,algorithm,bits,rel_output_error")
    assert (out / "layers.png").stat().st_size > 1000
    # the per-block phases: one row per block, seconds that add up to no more than the run
    rows = (out / "blocks.csv").read_text().splitlines()
    assert rows[0] == "block,read,statistics,algorithm,propagation,checkpoint,passes"
    assert [int(r.split(",")[0]) for r in rows[1:]] == [0, 1, 2]
    assert all(float(x) >= 0 for r in rows[1:] for x in r.split(",")[1:6])
    assert all(r.split(",")[6] == "1" for r in rows[1:])  # one forward per block
    assert not (out / "progress").exists()
    m = models.load(out)
    assert m.quantized
    r = subprocess.run(_cli("eval", "--model", str(out), "--data", str(d / "calib.npy"),
                            "--windows", "4", "--seqlen", "64"),
                       check=True, capture_output=True, text=True, timeout=600)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 4 * 63 and np.isfinite(res["ppl"])
    # a finished model directory is never overwritten
    r = subprocess.run(_cli("quantize", "--model", str(d / "model"), "--recipe",
                            str(d / "recipe.yaml"), "--calib", str(d / "calib.npy"),
                            "--out", str(out)), capture_output=True, text=True)
    assert r.returncode != 0 and "refusing to overwrite" in r.stderr
