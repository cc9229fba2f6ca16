"""Bad checkpoints get clear errors naming the file, tensor or field."""

import json
import os
import struct

import numpy as np
import pytest

from jaxquant import models
from jaxquant.models.common.safetensors_io import SafetensorsFile
from tests.models.hf_tiny import make_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", "gqa", False).save_pretrained(d)
    return d


def _copy(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_missing_safetensors(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        models.load(d)


def test_truncated_safetensors(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        models.load(d)


def test_garbage_safetensors_header(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        SafetensorsFile(p)


def test_unsupported_architecture(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt_neox' is not supported"):
        models.load(d)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sliding_window", 128, "sliding_window"),
        ("mlp_bias", True, "mlp_bias"),
        ("hidden_act", "gelu", "hidden_act"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "yarn"),
    ],
)
def test_unhandled_config_fields_are_refused(tmp_path, tiny_dir, field, value, match):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.UnsupportedConfigError, match=match):
        models.load(d)


def test_shape_disagreeing_with_config(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight' has shape \(96, 64\), but the "
                                         r"config implies \(128, 64\)"):
        models.load(d)


def test_truncated_gguf(tmp_path):
    from jaxquant.models.assets import resolve_model_path

    src = resolve_model_path("smollm2-135m")
    p = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        p.write_bytes(f.read(5_000_000))
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        models.load(p)


def test_nan_weights_refused(tmp_path, tiny_dir):
    from safetensors.numpy import save_file

    from jaxquant.models.common.safetensors_io import SafetensorsDir

    d = _copy(tiny_dir, tmp_path / "m")
    src = SafetensorsDir(d)
    tensors = {k: np.array(src.get(k)) for k in src.keys()}
    tensors["model.norm.weight"][3] = np.nan
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight' holds NaN"):
        models.load(d)
