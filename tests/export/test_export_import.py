"""Export to compressed-tensors / GPTQ and import of such checkpoints (issue 17, items 1-2).

Oracles: the compressed-tensors specification's own examples (bit order), transformers +
the ``compressed-tensors`` package loading jaxquant's export (logits vs jaxquant's quantized
model), a checkpoint written by compressed-tensors' own compressor (its fake-quantized weights
vs jaxquant's imported QArrays), and the GPTQ dequantization formula written out here from the
format's description (``W = scales[g_idx] · (((qweight >> 4·(i % 8)) & 15) - (zeros + 1))``).
"""

import json

import jax
import numpy as np
import pytest

import jaxquant
from jaxquant.core.qarray import QArray, dequantize
from jaxquant.export import UnsupportedExportError, export
from jaxquant.export.bits import pack_rows, unpack_rows
from jaxquant.models.common.decoder import layer_params
from jaxquant.recipes import load_recipe
from tests.models.hf_tiny import hf_logits, make_hf_model

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")


def _rtn(bits, sym, gs=32, algo="rtn"):
    return load_recipe({"name": "r", "rules": [{"pattern": r"layers/\d+/.*", "algorithm": algo,
                        "spec": {"bits": bits, "group_size": gs, "symmetric": sym}}],
                        "calibration": {"n_samples": 8, "seqlen": 32, "batch_size": 8}})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama")
    hf = make_hf_model("llama", "gqa", False)
    hf.save_pretrained(d)
    return jaxquant.load(d), hf


def test_pack_rows_follows_the_specification():
    # compressed-tensors: signed int4 [-8..-1] (unsigned 0..7) packs to 0x76543210
    assert pack_rows(np.arange(8)[None], 4).view(np.uint32)[0, 0] == 0x76543210
    # 3 bits: one little-endian bit stream, codes straddle words (code 10: 2 bits + 1 bit)
    rng = np.random.default_rng(0)
    u = rng.integers(0, 8, (3, 45))
    stream = [sum(int(c) << (3 * j) for j, c in enumerate(row)) for row in u]
    want = [[(s >> (32 * w)) & 0xFFFFFFFF for w in range(5)] for s in stream]  # ceil(135/32)
    np.testing.assert_array_equal(pack_rows(u, 3).view(np.uint32), np.array(want, np.uint32))
    for b in (2, 3, 4, 5, 8):
        v = rng.integers(0, 1 << b, (4, 70))
        np.testing.assert_array_equal(unpack_rows(pack_rows(v, b), b, 70), v)


@pytest.mark.parametrize("bits,sym,gs", [(4, False, 32), (3, True, 32), (2, False, 32),
                                         (4, True, -1), (8, False, 16)])
def test_compressed_tensors_export_loads_in_transformers(tiny, tmp_path, bits, sym, gs):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    m, _ = tiny
    q = jaxquant.quantize_model(m, _rtn(bits, sym, gs), None, progress=False)
    out = export(q, "compressed-tensors", tmp_path / "ct", dtype="float32")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    tm = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
    toks = np.random.default_rng(1).integers(0, 96, (2, 16))
    np.testing.assert_allclose(hf_logits(tm, toks), np.asarray(q(toks)), atol=1e-3)
    back = jaxquant.load(out)  # the importer: the same codes, bit for bit
    for i in range(3):
        a, b = layer_params(q.params, i), layer_params(back.params, i)
        for g, n in (("self_attn", "q_proj"), ("mlp", "down_proj")):
            ka, kb = a[g][n]["kernel"], b[g][n]["kernel"]
            assert isinstance(kb, QArray)
            np.testing.assert_array_equal(np.asarray(ka.codes()), np.asarray(kb.codes()))
            np.testing.assert_array_equal(np.asarray(dequantize(ka)), np.asarray(dequantize(kb)))


def test_gptq_export_matches_the_format_formula_and_reimports(tiny, tmp_path):
    from safetensors.numpy import load_file

    m, _ = tiny
    rng = np.random.default_rng(0)
    q = jaxquant.quantize_model(m, _rtn(4, False), None, progress=False)
    export(q, "gptq", tmp_path / "g", dtype="float32")
    t = load_file(str(tmp_path / "g" / "model.safetensors"))
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["checkpoint_format"]) == (4, 32, "gptq")
    p = "model.layers.1.mlp.down_proj"
    qw, qz, sc, gi = (t[f"{p}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    k, n = gi.size, qw.shape[1]
    i = np.arange(k)
    u = (qw.view(np.uint32)[i // 8] >> (4 * (i % 8))[:, None].astype(np.uint32)) & 15
    o = np.arange(n)
    z = ((qz.view(np.uint32)[:, o // 8] >> (4 * (o % 8)).astype(np.uint32)) & 15) + 1
    w = sc.astype(np.float32)[gi] * (u.astype(np.float32) - z[gi].astype(np.float32))
    want = np.asarray(dequantize(layer_params(q.params, 1)["mlp"]["down_proj"]["kernel"]))
    np.testing.assert_allclose(w, want, rtol=1e-3, atol=1e-4)  # fp16 scales
    back = jaxquant.load(tmp_path / "g")
    got = layer_params(back.params, 1)["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(dequantize(got)), w)  # bit-exact re-import
    toks = rng.integers(0, 96, (2, 12))
    assert np.isfinite(np.asarray(back(toks))).all()


def test_import_of_a_checkpoint_written_by_compressed_tensors(tmp_path):
    """compressed-tensors' own quantizer and compressor write the checkpoint; jaxquant imports
    the packed codes and dequantizes to exactly the peer's fake-quantized weights."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    hf = make_hf_model("llama", "gqa", False, seed=3)
    for sym in (False, True):
        model = make_hf_model("llama", "gqa", False, seed=3)
        model.load_state_dict(hf.state_dict())
        w = {"num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group",
             "group_size": 32, "observer": "minmax"}
        qcfg = QuantizationConfig(config_groups={"g": {"targets": ["Linear"], "weights": w}},
                                  ignore=["lm_head"], quantization_status="frozen",
                                  format="pack-quantized")
        apply_quantization_config(model, qcfg)
        ref = {}
        for name, mod in model.named_modules():
            sch = getattr(mod, "quantization_scheme", None)
            if sch is None or sch.weights is None:
                continue
            wt = mod.weight.data
            wg = wt.reshape(wt.shape[0], -1, 32)
            s, z = calculate_qparams(wg.amin(-1), wg.amax(-1), sch.weights)
            mod.weight_scale.data = s.to(mod.weight_scale.dtype)
            mod.weight_zero_point.data = z.to(mod.weight_zero_point.dtype)
            ref[name] = fake_quantize(wt, mod.weight_scale,
                                      None if sym else mod.weight_zero_point, sch.weights)
        comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
        comp.compress_model(model)
        out = tmp_path / f"ct_{sym}"
        model.save_pretrained(out)
        comp.update_config(out)
        got = jaxquant.load(out)
        assert got.quantized
        for name, r in ref.items():
            i, g, n = name.split(".")[2], name.split(".")[3], name.split(".")[4]
            k = layer_params(got.params, int(i))[g][n]["kernel"]
            np.testing.assert_allclose(np.asarray(dequantize(k)).T, r.float().numpy(),
                                       rtol=1e-6, atol=1e-7, err_msg=name)


def test_bad_exports_and_imports_are_refused(tiny, tmp_path):
    m, _ = tiny
    q = jaxquant.quantize_model(m, _rtn(4, False), None, progress=False)
    with pytest.raises(ValueError, match="format='awq'"):
        export(q, "awq", tmp_path / "x")
    with pytest.raises(UnsupportedExportError, match=r"not exported|only quantized decoders"):
        export(_fake_dit(), "gptq", tmp_path / "y")
    out = export(q, "gptq", tmp_path / "g", dtype="float32")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"qweight has shape .* quantization_config.bits=3"):
        jaxquant.load(out)
    cfg["quantization_config"] |= {"bits": 4, "group_size": 16}
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"scales has shape .* quantization_config.group_size=16"):
        jaxquant.load(out)


def _fake_dit():
    class NotADecoder:
        config = object()
    return NotADecoder()


def test_norm_bias_of_d2quant_is_folded_exactly_or_refused(tiny, tmp_path):
    """Norm biases (D²Quant's DAC) become the readers' biases W·μ in transformers' Llama
    (attention_bias for q/k/v, mlp_bias for gate/up): the logits stay jaxquant's; a final-norm
    bias is refused."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    m, _ = tiny
    q = jaxquant.quantize_model(m, _rtn(4, False), None, progress=False)
    mu = 0.05 * jax.random.normal(jax.random.key(0), (3, m.config.hidden_size))
    layers = dict(q.params["layers"])
    layers["post_attention_layernorm"] = {**layers["post_attention_layernorm"], "bias": mu}
    layers["input_layernorm"] = {**layers["input_layernorm"], "bias": -mu}  # norm_bias: both
    params = {**q.params, "layers": layers}
    qb = type(q)(q.config.replace(norm_bias=True), params, q.path, "jaxquant")
    out = export(qb, "compressed-tensors", tmp_path / "ct", dtype="float32")
    tm = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
    toks = np.random.default_rng(1).integers(0, 96, (2, 16))
    ref = np.asarray(qb(toks))
    assert np.abs(ref - np.asarray(q(toks))).max() > 1e-3  # the bias matters
    np.testing.assert_allclose(hf_logits(tm, toks), ref, atol=1e-3)
    fin = type(q)(q.config, {**q.params, "norm": {**q.params["norm"], "bias": mu[0]}}, q.path,
                  "jaxquant")
    with pytest.raises(UnsupportedExportError, match="final norm"):
        export(fin, "compressed-tensors", tmp_path / "no")


def test_import_of_an_awq_gemm_checkpoint(tiny, tmp_path):
    """An AutoAWQ GEMM checkpoint built here from the format's description (8 int4 codes per
    int32 along the output axis, nibble i holding column 8j + [0,2,4,6,1,3,5,7][i]; zeros packed
    the same way; fp16 scales): the import dequantizes to (q - z) · s exactly and runs."""
    import shutil

    from safetensors.numpy import load_file, save_file

    m, _ = tiny
    src = m.path
    out = tmp_path / "awq"
    shutil.copytree(src, out)
    t = load_file(str(out / "model.safetensors"))
    rng = np.random.default_rng(0)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    expected = {}
    for name in [k[:-len(".weight")] for k in t if k.endswith("_proj.weight")]:
        w = t.pop(f"{name}.weight")  # [out, in]
        n, k = w.shape
        g = k // 32
        q = rng.integers(0, 16, (k, n)).astype(np.uint32)
        z = rng.integers(0, 16, (g, n)).astype(np.uint32)
        s = (rng.random((g, n)) * 0.02 + 0.001).astype(np.float16)

        def pack(a):
            words = np.zeros((a.shape[0], a.shape[1] // 8), np.uint32)
            for i, col in enumerate(order):
                words |= a[:, col::8] << np.uint32(4 * i)
            return words.view(np.int32)

        t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"] = pack(q), pack(z), s
        gi = np.arange(k) // 32
        expected[name] = s.astype(np.float32)[gi] * (q.astype(np.float32)
                                                     - z.astype(np.float32)[gi])
    save_file(t, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32,
                                  "zero_point": True, "version": "gemm"}
    (out / "config.json").write_text(json.dumps(cfg))
    got = jaxquant.load(out)
    for name, want in expected.items():
        i, g, n = name.split(".")[2:5]
        kq = layer_params(got.params, int(i))[g][n]["kernel"]
        assert isinstance(kq, QArray)
        np.testing.assert_array_equal(np.asarray(dequantize(kq)), want, err_msg=name)
    assert np.isfinite(np.asarray(got(np.arange(12)[None]))).all()
    cfg["quantization_config"]["version"] = "gemv"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="version='gemv'"):
        jaxquant.load(out)
