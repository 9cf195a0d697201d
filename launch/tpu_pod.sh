#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM pod slice (one process per host).
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE          # copy this checkout, install (jax[tpu])
#   launch/tpu_pod.sh train TPU_NAME ZONE --config configs/cav_mae_pretrain.py:recipe=scale++ \
#       --workdir gs://BUCKET/run1 [--config.field=value ...]
#
# Every worker runs the same command (`--worker=all`); avmae_jax.train --distributed calls
# jax.distributed.initialize(), which finds the pod's coordinator by itself on TPU VMs.
# The workdir must be reachable from every worker (a GCS bucket). Re-running `train` after a
# preemption resumes from the latest checkpoint. Needs the gcloud CLI, logged in.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
action=$1 tpu=$2 zone=$3
shift 3
remote_dir=avmae_jax
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"
}
case "$action" in
  setup)
    root=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$root" --exclude=.venv --exclude=.git -czf /tmp/avmae_jax_src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/avmae_jax_src.tgz "$tpu":/tmp/ --zone "$zone" --worker=all
    ssh_all "mkdir -p ~/$remote_dir && tar -C ~/$remote_dir -xzf /tmp/avmae_jax_src.tgz && \
      cd ~/$remote_dir && python3 -m venv .venv && . .venv/bin/activate && \
      pip install -q -r requirements.txt -e '.[tpu]'"
    ;;
  train)
    args=$(printf ' %q' "$@")
    ssh_all "cd ~/$remote_dir && . .venv/bin/activate && \
      python -m avmae_jax.train --distributed$args"
    ;;
  *)
    echo "unknown action $action (setup | train)" >&2
    exit 2
    ;;
esac
