"""Perplexity and KL against independent oracles (torch cross-entropy, numpy KL)."""

import jax
import numpy as np
import pytest

from jaxquant import eval as jeval
from jaxquant import models
from tests.models.hf_tiny import hf_logits, make_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    hf = make_hf_model("llama", "gqa", True, seed=7)
    hf.save_pretrained(d)
    return hf, models.load(d)


def test_perplexity_matches_torch_cross_entropy(tiny):
    import torch

    hf, m = tiny
    windows = np.random.default_rng(0).integers(0, 96, size=(5, 33)).astype(np.int32)
    r = jeval.perplexity(jeval.model_logits_fn(m.config, m.params), windows, batch_size=2,
                         progress=False)
    lg = torch.as_tensor(hf_logits(hf, windows))
    ce = torch.nn.functional.cross_entropy(
        lg[:, :-1].reshape(-1, 96), torch.as_tensor(windows[:, 1:], dtype=torch.long).reshape(-1)
    )
    assert r["tokens"] == 5 * 32
    assert abs(r["ppl"] - float(torch.exp(ce))) / r["ppl"] < 1e-4


@pytest.mark.parametrize("n_dev", [2, 4])
def test_data_parallel_perplexity_equals_single_device(tiny, n_dev):
    """Windows sharded over a data axis (5 windows: the last batch is padded with repeats whose
    NLL must be dropped) give the single-device result."""
    from jax.sharding import Mesh

    _, m = tiny
    windows = np.random.default_rng(2).integers(0, 96, size=(5, 33)).astype(np.int32)
    fn = jeval.model_logits_fn(m.config, m.params)
    want = jeval.perplexity(fn, windows, batch_size=1, progress=False)
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    got = jeval.perplexity(fn, windows, batch_size=3, progress=False, mesh=mesh)
    assert got["tokens"] == want["tokens"] == 5 * 32
    assert abs(got["nll"] - want["nll"]) < 1e-5 * abs(want["nll"])
    with pytest.raises(ValueError, match="no axis 'batch'"):
        jeval.perplexity(fn, windows, mesh=mesh, data_axis="batch")


def test_kl_is_zero_to_itself_and_matches_numpy(tiny):
    _, m = tiny
    windows = np.random.default_rng(1).integers(0, 96, size=(3, 17)).astype(np.int32)
    fn = jeval.model_logits_fn(m.config, m.params)
    assert abs(jeval.kl_divergence(fn, fn, windows, progress=False)["kl"]) < 1e-6
    noisy = jax.tree.map(lambda a: a * 1.05, m.params)
    fn2 = jeval.model_logits_fn(m.config, noisy)
    r = jeval.kl_divergence(fn, fn2, windows, progress=False)
    p = np.asarray(jax.nn.log_softmax(fn(windows)[:, :-1], -1), np.float64)
    q = np.asarray(jax.nn.log_softmax(fn2(windows)[:, :-1], -1), np.float64)
    ref = np.mean(np.sum(np.exp(p) * (p - q), -1))
    assert r["kl"] > 0 and abs(r["kl"] - ref) < 1e-5 * max(1.0, ref)
    # the same pass scores both models exactly as perplexity() does
    for f, key in ((fn2, "ppl"), (fn, "ppl_ref")):
        want = jeval.perplexity(f, windows, progress=False)["ppl"]
        assert abs(r[key] - want) / want < 1e-5


def test_bad_windows():
    fn = lambda t: t  # noqa: E731
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        jeval.perplexity(fn, np.full((1, 4), 11, np.int32), vocab_size=10)
    with pytest.raises(ValueError, match="windows must be"):
        jeval.perplexity(fn, np.zeros((4,), np.int32))


def test_cli_eval_data_parallel_on_cpu_devices(tiny, tmp_path):
    """``jaxquant --cpu-devices 2 eval`` (its own process: the device count is fixed at start)
    shards the windows over 2 CPU devices and prints the single-device PPL."""
    import json
    import os
    import subprocess
    import sys

    hf, m = tiny
    windows = np.random.default_rng(3).integers(0, 96, size=(3, 33)).astype(np.int32)
    np.save(tmp_path / "w.npy", windows)
    d = tmp_path / "model"
    hf.save_pretrained(d)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-m", "jaxquant.cli.main", "--cpu-devices", "2", "eval", "--model",
         str(d), "--data", str(tmp_path / "w.npy"), "--windows", "0"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = jeval.perplexity(jeval.model_logits_fn(m.config, m.params), windows, progress=False)
    assert got["tokens"] == want["tokens"]
    assert abs(got["ppl"] - want["ppl"]) / want["ppl"] < 1e-5
