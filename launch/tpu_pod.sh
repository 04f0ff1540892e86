#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice with one command.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [extra vla_jax.main flags...]
#
# e.g. launch/tpu_pod.sh my-v4-32 us-central2-b gs://bucket/runs/align \
#        --config=configs/align.py:openvla_7b --config.tokenizer=/data/llama2/tokenizer.model \
#        --config.weights.student=gs://bucket/converted/student --config.weights.student_format=orbax
#
# Copies this checkout to every worker, installs it with the TPU extra, and starts the same
# command everywhere; jax.distributed.initialize() (--config.distributed=True) finds the
# other workers through the TPU metadata. WORKDIR should be a GCS path all workers share.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; WORKDIR=$3; shift 3
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=vla_jax
EXTRA=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all \
  "$REPO_DIR" "$TPU_NAME:~/$REMOTE_DIR"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/$REMOTE_DIR
  pip install -q -e '.[tpu]'
  python -m vla_jax.main --config=configs/align.py --config.distributed=True \
    --workdir=$WORKDIR $EXTRA 2>&1 | tee -a ~/vla_jax_train.log
"
