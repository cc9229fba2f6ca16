#!/usr/bin/env bash
# On a TPU VM, in a checkout with `pip install -e ".[tpu,test]"` done: the compiled Pallas TPU
# kernels against their references, then the kernel benchmark (v5e roofline 819 GB/s); results
# in ${OUT:-./tpu_results}. --dry-run prints the commands.
set -euo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
OUT=${OUT:-./tpu_results}

# step CMD...: run CMD (stdout also into the file named by $LOG), or print it under --dry-run
step() {
  if [[ $DRY -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf ' | tee %q\n' "$LOG"
  else
    "$@" | tee "$LOG"
  fi
}

if [[ $DRY -eq 0 ]]; then mkdir -p "$OUT"; fi
LOG="$OUT/env.txt" step python -c "import jax; print(jax.devices())"
LOG="$OUT/tests.txt" step python -m pytest -q tests/kernels -m "tpu or not slow" \
  -k "compiled_on_device or equals"
LOG="$OUT/kernels_tpu.md" step python benchmarks/kernels.py --bits 4,2 --group 128 \
  --json "$OUT/kernels_tpu.json"
