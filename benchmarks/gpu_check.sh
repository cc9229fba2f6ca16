#!/usr/bin/env bash
# The GPU checks of issue 6, as ONE prepared run for a lent GPU machine (device tool `run`):
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# It uses the machine's own Python with a CUDA jaxlib (no network there), puts this checkout on
# PYTHONPATH, runs the kernel tests on the GPU (compiled, not interpret) and the kernel benchmark,
# and leaves the raw results in $OUT for benchmarks/RESULTS.md.
set -uo pipefail
OUT=${OUT:-/tmp/jaxquant_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  $PY -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|jax-triton|triton|numpy|ml.dtypes|gguf|safetensors|pyyaml|tqdm|orbax)" || true
} 2>&1 | tee "$OUT/env.txt"
# packages jaxquant imports that the image may lack are reported, not fetched (no network)
$PY - <<'PY' 2>&1 | tee -a "$OUT/env.txt"
import importlib
for m in ("flax", "orbax.checkpoint", "gguf", "safetensors", "yaml", "tqdm", "jax_triton"):
    try:
        importlib.import_module(m); print("have", m)
    except Exception as e:
        print("MISSING", m, type(e).__name__, e)
PY
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -m "gpu or not slow" \
  -k "compiled_on_device or jax_triton or equals_reference or equal_the_integer_oracle" 2>&1 | tail -30 | tee "$OUT/tests.txt"
timeout 220 "$PY" benchmarks/kernels.py --bits 4,2 --group 128 --json "$OUT/kernels_gpu.json" \
  2>&1 | tee "$OUT/kernels_gpu.md"
