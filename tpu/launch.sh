#!/usr/bin/env bash
# Run a safer-jax command on every worker of a Cloud TPU VM (single host or pod slice).
#
#   tpu/launch.sh TPU_NAME ZONE [--project P] -- safer-jax sft --config configs/sft/qwen2.5-7b-v5p8.yaml run_dir=gs://B/runs/x
#
# Every worker runs the same command; SAFER_JAX_DISTRIBUTED=1 makes safer-jax call
# jax.distributed.initialize(), which finds the coordinator from the TPU metadata. The run
# folder must be shared (a gs:// bucket) so that all hosts write one checkpoint and a
# preempted slice resumes from it: rerun the same command after the slice is recreated.
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n '2,10p' "$0"; exit 2; }
name=$1; zone=$2; shift 2
project_args=()
if [[ ${1:-} == --project ]]; then project_args=(--project "$2"); shift 2; fi
[[ ${1:-} == -- ]] && shift
cmd=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project_args[@]}" --worker=all \
  --command "cd ~/safer-jax && source .venv/bin/activate && SAFER_JAX_DISTRIBUTED=1 $cmd"
