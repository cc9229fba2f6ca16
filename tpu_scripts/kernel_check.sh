#!/usr/bin/env bash
# On a TPU VM (pip install -e ".[tpu,test]" done): the compiled Pallas TPU kernels against their
# references, then the kernel benchmark (v5e roofline 819 GB/s), results in ${OUT:-./tpu_results}.
set -euo pipefail
OUT=${OUT:-./tpu_results}
mkdir -p "$OUT"
python -c "import jax; print(jax.devices())" | tee "$OUT/env.txt"
python -m pytest -q tests/kernels -m "tpu or not slow" -k "compiled_on_device or equals" \
  | tee "$OUT/tests.txt"
python benchmarks/kernels.py --bits 4,2 --group 128 --json "$OUT/kernels_tpu.json" \
  | tee "$OUT/kernels_tpu.md"
