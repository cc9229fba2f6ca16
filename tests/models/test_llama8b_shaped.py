"""benchmarks/make_llama8b_shaped.py writes what transformers reads as a LlamaForCausalLM (its own
loader: no missing or unexpected tensor; logits equal jaxquant's on the same files), and the
loading path refuses a shard missing from the index (named), a checkpoint of another
architecture and a truncated one, before any calibration work."""

import importlib.util
import json
import os

import numpy as np
import pytest

from jaxquant.models.loading import adapter_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _maker():
    spec = importlib.util.spec_from_file_location(
        "make_llama8b_shaped", os.path.join(ROOT, "benchmarks", "make_llama8b_shaped.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, num_hidden_layers=3)


@pytest.fixture
def ckpt(tmp_path):
    m = _maker()
    cfg = dict(m.CONFIG, **TINY)
    # small shards and chunks: several shards, tensors written in several row chunks
    m.write_checkpoint(str(tmp_path), cfg, shard_bytes=60_000, chunk_bytes=4096, log=lambda s: 0)
    return tmp_path


def test_the_llama8b_config_is_llama3_8b():
    c = _maker().CONFIG
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"],
            c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == (
        32, 4096, 14336, 32, 8, 128256)
    plan = _maker().tensor_plan(c)
    assert len(plan) == 2 + 32 * 9 + 1
    n = sum(int(np.prod(s)) for _, s, _ in plan)
    assert abs(n * 2 / 2**30 - 14.96) < 0.05  # 8.03e9 parameters in bf16 (~16.1 GB)


def test_transformers_loads_it_and_agrees(ckpt):
    import torch
    import transformers as tf

    import jaxquant as jq

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    hf, info = tf.LlamaForCausalLM.from_pretrained(ckpt, output_loading_info=True,
                                                   torch_dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    w = hf.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert 0.015 < w.std() < 0.025  # the realistic scale
    tokens = np.random.default_rng(0).integers(0, 300, size=(2, 12))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(jq.load(ckpt)(tokens.astype(np.int32)))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_a_missing_shard_is_named(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    os.remove(ckpt / shard)
    with pytest.raises(FileNotFoundError, match=f"shard '{shard}'.*is missing"):
        adapter_for(str(ckpt))


def _rename(ckpt, fn):
    index_p = ckpt / "model.safetensors.index.json"
    index = json.loads(index_p.read_text())
    for shard in set(index["weight_map"].values()):
        p = ckpt / shard
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        new = {fn(k) if k != "__metadata__" else k: v for k, v in header.items()}
        h = json.dumps(new).encode()
        h += b" " * (-len(h) % 8)
        p.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    index["weight_map"] = {fn(k): v for k, v in index["weight_map"].items()}
    index_p.write_text(json.dumps(index))


def test_another_architecture_is_refused(ckpt):
    _rename(ckpt, lambda k: k.replace("model.layers.", "transformer.h.")
            .replace("model.embed_tokens", "transformer.wte"))
    with pytest.raises(ValueError, match=r"another architecture.*transformer"):
        adapter_for(str(ckpt)).check()


def test_a_truncated_checkpoint_is_refused_before_calibrating(ckpt):
    _rename(ckpt, lambda k: k.replace("model.layers.2.mlp.up_proj", "model.layers.2.mlp.upp"))
    with pytest.raises(ValueError, match=r"missing 1 block tensor.*layers\.2\.mlp\.up_proj"):
        adapter_for(str(ckpt)).check()
