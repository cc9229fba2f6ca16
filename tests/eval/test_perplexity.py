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
