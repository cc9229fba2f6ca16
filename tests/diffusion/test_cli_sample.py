"""``jaxquant sample``: a DiT pipeline directory (transformer/ + scheduler/) → a PNG grid, fp or
quantized in memory with a recipe; bad classes are refused naming the flag."""

import json

import jax
import numpy as np

from jaxquant.cli.main import main
from jaxquant.diffusion.train_fmnist import SCHEDULER
from jaxquant.models.dit.config import DiTConfig
from jaxquant.models.dit.export import init_dit_params, save_dit_diffusers


def _pipeline(tmp_path):
    cfg = DiTConfig(kind="dit", num_heads=2, head_dim=16, in_channels=1, out_channels=1,
                    num_layers=1, sample_size=8, patch_size=2, num_classes=10)
    p = init_dit_params(cfg, jax.random.PRNGKey(0))
    g = np.random.default_rng(0)
    p = jax.tree.map(lambda a: np.asarray(a + g.normal(0, 0.05, a.shape), np.float32), p)
    save_dit_diffusers(cfg, p, tmp_path / "transformer")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return tmp_path


def test_sample_writes_a_class_grid(tmp_path, capsys):
    import matplotlib.image as mpimg

    d = _pipeline(tmp_path)
    out = tmp_path / "grid.png"
    rc = main(["sample", "--model", str(d / "transformer"), "--steps", "4", "--classes", "1,5,7",
               "--per-class", "2", "--out", str(out), "--recipe", "dit_rtn_w8a8",
               "--calib-per-class", "40"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["classes"] == [1, 5, 7] and res["recipe"] == "dit_rtn_w8a8"
    img = mpimg.imread(out)
    assert img.shape[:2] == (2 * 8, 3 * 8)  # per-class rows x class columns of 8x8 samples
    assert img.std() > 0.0


def test_sample_refuses_a_class_outside_the_model(tmp_path, capsys):
    d = _pipeline(tmp_path)
    rc = main(["sample", "--model", str(d / "transformer"), "--steps", "2", "--classes", "3,10",
               "--out", str(tmp_path / "g.png")])
    assert rc == 2
    assert "--classes: [10] outside" in capsys.readouterr().err


def test_quantize_a_dit_saves_reloads_and_samples(tmp_path, capsys):
    """``jaxquant quantize`` on a DiT pipeline (calibrated on its own trajectories) writes a
    quantized directory; ``jaxquant.load`` reads it back (QArray kernels and activation
    quantizers included) as a model close to, not equal to, the fp one; ``jaxquant sample``
    draws from it."""
    import jaxquant as jq
    from jaxquant.core.qarray import QArray
    from jaxquant.nn.linear import ActQuant

    d = _pipeline(tmp_path / "pipe")
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(d), "--recipe", "dit_gptq_w4a8", "--out", str(out),
               "--n-samples", "256"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["recipe"] == "dit_gptq_w4a8" and res["layers"] == 9
    qm = jq.load(out)
    blk = qm.params["transformer_blocks"][0]
    assert isinstance(blk["attn1"]["to_q"]["kernel"], QArray)
    assert blk["attn1"]["to_q"]["act"] == ActQuant(8)
    fp = jq.load(d / "transformer")
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    t, y = np.array([3, 700]), np.array([2, 10])
    a, b = np.asarray(fp(x, timestep=t, class_labels=y)), np.asarray(qm(x, timestep=t,
                                                                         class_labels=y))
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 1e-5 < rel < 0.2  # quantized (not fp), and still the same model
    rc = main(["sample", "--model", str(out), "--steps", "3", "--classes", "0,1",
               "--per-class", "1", "--out", str(tmp_path / "g.png")])
    assert rc == 0 and (tmp_path / "g.png").exists()
    capsys.readouterr()
    # jaxquant eval on a quantized DiT: samples against its fp source, same noise
    rc = main(["eval", "--model", str(out), "--steps", "3", "--per-class", "2"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["samples"] == 20 and 10.0 < ev["psnr"] < 90.0  # close to fp, not identical
