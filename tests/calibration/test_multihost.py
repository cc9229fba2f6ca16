"""Multi-process calibration with jax.distributed: 2 processes on localhost, 4 fake CPU devices
each, the gloo CPU collectives. The calibration samples are sharded over the hosts (each holds
half of the activations) and GPTQ's output columns over each host's devices; the result must
be the parameters one process computes alone. Checkpoints: an interrupted 2-process job
resumes on both processes to the same parameters; a resume with another recipe and a job whose
processes were given different data are refused, on every process, before calibrating."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxquant.core.qarray import QArray
from jaxquant.models.quantized import load_tree
from tests.models.hf_tiny import make_hf_model

RECIPE = """name: gptq_mh
rules:
  - pattern: 'layers/\\d+/(self_attn|mlp)/\\w+_proj'
    algorithm: gptq
    spec: {{bits: 4, group_size: {g}}}
calibration: {{n_samples: 16, seqlen: 32, batch_size: 8, seed: 0}}
"""
WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(model):
    env = dict(os.environ, JQ_MODEL=str(model), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _job(d, out, recipe="r32.yaml", calib="calib.npy", *extra, timeout=240, cli=False):
    """Run the 2-process job (the worker script, or with ``cli`` the ``jaxquant quantize``
    command line); returns ``[(rc, stdout, stderr)]`` per process."""
    port = _port()

    def argv(i):
        if cli:
            return [sys.executable, "-m", "jaxquant.cli.main", "--cpu-devices", "4", "quantize",
                    "--model", str(d / "model"), "--recipe", str(d / recipe), "--calib",
                    str(d / calib), "--out", str(out), "--distributed", "--coordinator",
                    f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
                    "--model-parallel", "2", *extra]
        return [sys.executable, WORKER, str(port), "2", str(i), str(out), str(d / recipe),
                str(d / calib), *extra]

    procs = [subprocess.Popen(argv(i), env=_env(d / "model"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    # a process that fails leaves its peers waiting in a collective: give them a grace period
    t_end = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < t_end:
        if any(p.poll() not in (None, 0) for p in procs):
            t_end = min(t_end, time.monotonic() + 20)
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return [(p.returncode, *p.communicate()) for p in procs]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch  # noqa: F401  (the model is built with torch)

    d = tmp_path_factory.mktemp("mh")
    make_hf_model("llama", "gqa", False, seed=5).save_pretrained(d / "model")
    tokens = np.random.default_rng(0).integers(0, 96, size=(16, 32)).astype(np.int32)
    np.save(d / "calib.npy", tokens)
    np.save(d / "calib0.npy", tokens)
    other = tokens.copy()
    other[3, 5] = (other[3, 5] + 1) % 96
    np.save(d / "calib1.npy", other)
    (d / "r32.yaml").write_text(RECIPE.format(g=32))
    (d / "r16.yaml").write_text(RECIPE.format(g=16))
    (d / "rx0.yaml").write_text(RECIPE.format(g=32))
    (d / "rx1.yaml").write_text(RECIPE.format(g=16))
    return d


@pytest.fixture(scope="module")
def single(setup):
    """The same job on one process, no mesh."""
    from jaxquant.calibration.engine import calibrate
    from jaxquant.models.loading import adapter_for
    from jaxquant.recipes import load_recipe

    d = setup
    return calibrate(adapter_for(str(d / "model")), load_recipe(str(d / "r32.yaml")),
                     np.load(d / "calib.npy"), progress=False).params


def _assert_same(params, ref):
    """Same quantized parameters: identical integer codes, scales and zeros to float rounding
    (the Hessian is all-reduced across hosts in another order than one process sums it)."""
    q = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, QArray))
    r = jax.tree.leaves(ref, is_leaf=lambda a: isinstance(a, QArray))
    assert len(q) == len(r)
    n_q = 0
    for a, b in zip(q, r, strict=True):
        if isinstance(b, QArray):
            n_q += 1
            codes_a, codes_b = np.asarray(a.packed), np.asarray(b.packed)
            assert codes_a.shape == codes_b.shape
            frac = np.mean(codes_a == codes_b)
            assert frac > 0.999, f"only {frac:.4%} of the packed codes agree"
            np.testing.assert_allclose(np.asarray(a.scale, np.float32),
                                       np.asarray(b.scale, np.float32), rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=1e-5, atol=1e-6)
    assert n_q == 7  # q, k, v, o, gate, up, down: stacked over the 3 layers


def test_two_processes_match_one(setup, single, tmp_path):
    """`jaxquant quantize --distributed` on both processes: one model written, = one process."""
    from jaxquant.models.quantized import load_quantized

    out = tmp_path / "out"
    res = _job(setup, out, cli=True)
    for rc, o, e in res:
        assert rc == 0, e[-3000:]
        assert json.loads(o.strip().splitlines()[-1])["layers"] == 21
    assert "layers/0/mlp/down_proj" in res[0][1]  # the per-layer table: one process prints it
    assert "layers/0/mlp/down_proj" not in res[1][1]
    _, params, meta = load_quantized(out)
    assert meta["recipe"]["name"] == "gptq_mh"
    _assert_same(params, single)
    assert not (out / "progress").exists()  # the finished job's progress is cleared


def test_interrupted_job_resumes_on_every_process(setup, single, tmp_path):
    out = tmp_path / "out"
    res = _job(setup, out, "r32.yaml", "calib.npy", "--stop-after", "0")
    assert [rc for rc, _, _ in res] == [17, 17], [e[-2000:] for _, _, e in res]
    # block 0's activations: one orbax tree, each shard written once
    assert (out / "progress" / "acts" / "tree.json").is_file()
    assert not (out / "progress" / "acts.npy").exists()
    bad = _job(setup, out, "r16.yaml", "calib.npy", "--resume")
    assert [rc for rc, _, _ in bad] == [4, 4], [e[-2000:] for _, _, e in bad]
    assert all("different recipe" in e for _, _, e in bad)
    res = _job(setup, out, "r32.yaml", "calib.npy", "--resume")
    for rc, o, e in res:
        assert rc == 0, e[-3000:]
        assert "DONE resumed_from=1" in o
    _assert_same(load_tree(out / "final"), single)


@pytest.mark.parametrize("what", ["data", "recipe"])
def test_processes_given_different_inputs_are_refused(setup, tmp_path, what):
    recipe, calib = ("r32.yaml", "calib{pid}.npy") if what == "data" else ("rx{pid}.yaml",
                                                                            "calib.npy")
    res = _job(setup, tmp_path / "out", recipe, calib)
    assert [rc for rc, _, _ in res] == [3, 3], [e[-2000:] for _, _, e in res]
    for _, _, e in res:
        assert f"{what} (processes [1] differ from process 0)" in e
    assert not (tmp_path / "out" / "progress" / "block_0000").exists()


def test_gptq_output_columns_stay_split_over_devices():
    """GPTQ on a weight whose output columns are split over a mesh axis: XLA keeps the result
    split (no gather to one device) and the codes are those of the unsplit run."""
    from jax.sharding import Mesh

    from jaxquant.algorithms import registry
    from jaxquant.calibration import distributed as D
    from jaxquant.core.spec import QuantSpec

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    W = jax.numpy.asarray(rng.standard_normal((64, 128), np.float32))
    X = rng.standard_normal((256, 64), np.float32)
    st = {"H": jax.numpy.asarray(X.T @ X), "count": jax.numpy.float32(256)}
    spec = QuantSpec(bits=4, group_size=32)
    split, _ = registry.get("gptq").quantize(D.shard_columns(W, mesh, "model"), st, spec)
    whole, _ = registry.get("gptq").quantize(W, st, spec)
    assert split.packed.sharding.spec[-1] == "model"
    assert len(split.packed.addressable_shards[0].data.shape) == 2
    assert split.packed.addressable_shards[0].data.shape[-1] == 128 // 4
    np.testing.assert_array_equal(np.asarray(split.packed), np.asarray(whole.packed))
    # 126 columns do not split over 4 devices: left whole, not an error
    assert D.shard_columns(W[:, :126], mesh, "model").sharding.is_fully_replicated
