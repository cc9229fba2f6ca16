"""GGUF loading across tensor types, on a tiny Llama written in-process with the `gguf` writer
(llama.cpp's q/k row permutation included). Oracle: transformers reading the same file."""

import numpy as np
import pytest

from jaxquant import models
from tests.models.hf_tiny import hf_logits, make_hf_model

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def _permute(w, n_head):
    """llama.cpp's converter permutation of q/k rows (the inverse of what loaders undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _write_gguf(path, hf, qtype):
    c = hf.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)

    def put(name, arr, quantize=True):
        if quantize and qtype not in (T.F32,) and arr.ndim == 2:
            if qtype == T.F16:
                w.add_tensor(name, arr.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"], quantize=False)
    put("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
             "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf_name, g in names.items():
            arr = sd[f"{p}{hf_name}.weight"]
            if g == "attn_q":
                arr = _permute(arr, c.num_attention_heads)
            elif g == "attn_k":
                arr = _permute(arr, c.num_key_value_heads)
            put(f"blk.{i}.{g}.weight", np.ascontiguousarray(arr))
        put(f"blk.{i}.attn_norm.weight", sd[f"{p}input_layernorm.weight"], quantize=False)
        put(f"blk.{i}.ffn_norm.weight", sd[f"{p}post_attention_layernorm.weight"], quantize=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_gguf_types_match_transformers(tmp_path, qtype):
    import torch
    import transformers

    hf = make_hf_model("llama", "gqa", False, seed=31)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf, qtype)
    m = models.load(path)
    assert m.config.num_kv_heads == 2 and not m.config.tie_word_embeddings
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 96, size=(2, 40)).astype(np.int32)
    ours, _ = models.forward(m.config, m.params, tokens)
    ref = hf_logits(ref_model, tokens)
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-4
    if qtype == T.F32:  # lossless: must also equal the original HF model
        assert np.max(np.abs(np.asarray(ours) - hf_logits(hf, tokens))) <= 1e-4


def test_gguf_reads_release_pages_and_reread_identically(tmp_path, monkeypatch):
    """Streaming drops a tensor's mapped pages once it is read; reading it again gives the same
    values (the file is paged back in), for every tensor."""
    from jaxquant.models.common import gguf_io

    hf = make_hf_model("llama", "gqa", False, seed=32)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf, T.Q4_1)
    src = gguf_io.GGUFSource(path)
    released = []
    orig = gguf_io._Header.release
    monkeypatch.setattr(gguf_io._Header, "release",
                        lambda self, name: (released.append(name), orig(self, name)))
    first = {k: src.get(k) for k in src.keys()}
    assert len(released) == len(first)
    for k, v in first.items():
        np.testing.assert_array_equal(src.get(k), v)
