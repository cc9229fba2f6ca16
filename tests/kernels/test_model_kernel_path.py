"""SmolLM2-135M quantized to W4 g64 generates the same greedy tokens through the Pallas kernel
path (interpret mode, TPU and GPU kernels) as through the XLA dequantize+matmul path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import models
from jaxquant.kernels.dispatch import kernel_mode
from jaxquant.models.assets import resolve_model_path
from jaxquant.models.common.generate import generate

pytestmark = pytest.mark.slow


def test_smollm2_w4_greedy_tokens_kernel_path_equals_xla():
    m = models.load(resolve_model_path("smollm2-135m"))
    params = jq.quantize_model(m, "rtn_w4_g64", None, progress=False).params  # data-free
    prompt = jnp.asarray([m.tokenizer.encode("The capital of France is")], jnp.int32)
    toks = {}
    for mode, plat in (("xla", "tpu"), ("interpret", "tpu"), ("interpret", "gpu")):
        with kernel_mode(mode, interpret_platform=plat):
            # a fresh trace per mode: the dispatcher chooses at trace time
            fn = jax.jit(lambda p, t: generate(m.config, p, t, jax.random.PRNGKey(0),
                                               max_new_tokens=8))
            toks[(mode, plat)] = np.asarray(fn(params, prompt))
            # the kernel really is on the path (or really is not)
            jaxpr = str(jax.make_jaxpr(lambda p, t: models.forward(m.config, p, t)[0])(
                params, prompt))
            assert ("pallas_call" in jaxpr) == (mode == "interpret"), mode
    ref = toks[("xla", "tpu")]
    assert ref.shape == (1, 8)
    for k, v in toks.items():
        np.testing.assert_array_equal(v, ref, err_msg=str(k))
