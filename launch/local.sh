#!/usr/bin/env bash
# Runs an avmae_jax entry point on this machine, from the repository root.
#   launch/local.sh avmae_jax.train --config configs/demo.py --workdir /tmp/avmae_demo
#   CPU_DEVICES=8 launch/local.sh avmae_jax.bench model --config configs/cav_mae_pretrain.py:size=tiny
# CPU_DEVICES=N splits the host CPU into N XLA devices, to try sharded code without accelerators.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 ]]; then
  echo "usage: launch/local.sh MODULE [ARGS...]" >&2
  exit 2
fi
if [[ -n "${CPU_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi
module="$1"; shift
exec python -m "$module" "$@"
