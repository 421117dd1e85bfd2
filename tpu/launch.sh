#!/usr/bin/env bash
# Run one safer-jax command on every worker of a TPU slice, one log file per worker.
#
#   tpu/launch.sh NAME [--logs DIR] [--workers N] [common flags] -- safer-jax sft --config C run_dir=gs://B/runs/x
#
# Every worker runs the same command with SAFER_JAX_DISTRIBUTED=1, so safer-jax joins the
# slice's processes into one JAX job (the coordinator comes from the TPU metadata). Worker w's
# output goes to DIR/worker-w.log (default logs/NAME); the script waits for all workers and
# fails if any failed. The run folder must be a bucket (gs://...) that all hosts share: a
# rerun of the same command resumes from its latest checkpoint.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
parse_common "$@"
set -- "${ARGS[@]}"
[[ $# -ge 1 ]] || { sed -n '2,11p' "$0"; exit 2; }
name=$1; shift
logs="logs/$name"; workers=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --logs) logs=${2:?--logs needs a folder}; shift 2 ;;
    --workers) workers=${2:?--workers needs a count}; shift 2 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (put the command after --)" ;;
  esac
done
[[ $# -ge 1 ]] || die "no command: put it after --, e.g. -- safer-jax sft --config C run_dir=gs://B/x"
if [[ -z $workers ]]; then
  workers=$(worker_count "$name") || die "cannot describe TPU $name (does it exist? tpu/status.sh $name)"
fi
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive count, got $workers"
cmd=$(printf '%q ' "$@")
token=""
if [[ -n ${HF_TOKEN:-} ]]; then token="HF_TOKEN=$(printf '%q' "$HF_TOKEN") "; fi
remote="cd ~/$REPO_DIR && . .venv/bin/activate && ${token}SAFER_JAX_DISTRIBUTED=1 ${cmd% }"
mkdir -p "$logs"
echo "on every worker: $remote" >&2
pids=()
for ((w = 0; w < workers; w++)); do
  echo "worker $w -> $logs/worker-$w.log" >&2
  gcloud_tpu tpu-vm ssh "$name" --worker="$w" --command "$remote" >"$logs/worker-$w.log" 2>&1 &
  pids+=($!)
done
failed=0
for w in "${!pids[@]}"; do
  if ! wait "${pids[$w]}"; then
    echo "worker $w failed: see $logs/worker-$w.log" >&2
    failed=1
  fi
done
exit "$failed"
