#!/usr/bin/env bash
# Keep a job running through preemption: (re)create the slice when it is gone, install, launch
# the same command; repeat until the command succeeds.
#
#   tpu/relaunch.sh NAME GIT_URL [--spot | --preemptible] [--max-attempts N] [--logs DIR] [common flags] -- COMMAND...
#
# The command must keep its state in a bucket (run_dir=gs://...): every relaunch resumes from
# the latest complete checkpoint there. A slice that is preempted, suspended or failed is
# deleted and created again; a command that fails on a healthy slice is a bug, not a
# preemption, and stops the loop.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
parse_common "$@"
set -- "${ARGS[@]}"
[[ $# -ge 2 ]] || { sed -n '2,11p' "$0"; exit 2; }
name=$1; url=$2; shift 2
capacity=(); max_attempts=10; logs="logs/$name"
while [[ $# -gt 0 ]]; do
  case $1 in
    --spot|--preemptible) capacity=("$1"); shift ;;
    --max-attempts) max_attempts=${2:?--max-attempts needs a count}; shift 2 ;;
    --logs) logs=${2:?--logs needs a folder}; shift 2 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (put the command after --)" ;;
  esac
done
[[ $# -ge 1 ]] || die "no command: put it after --"
common=(--project "$PROJECT" --zone "$ZONE" --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION")
[[ $DRY_RUN == 1 ]] && common+=(--dry-run)
for ((attempt = 1; attempt <= max_attempts; attempt++)); do
  state=$(qr_state "$name-qr")
  echo "attempt $attempt/$max_attempts: queued resource $name-qr is $state" >&2
  if [[ $state != ACTIVE ]]; then
    [[ $state == NOT_FOUND ]] || "$here/delete.sh" "$name" "${common[@]}"
    "$here/create.sh" "$name" "${capacity[@]}" "${common[@]}"
    "$here/install.sh" "$name" "$url" "${common[@]}"
  fi
  if "$here/launch.sh" "$name" --logs "$logs/attempt-$attempt" "${common[@]}" -- "$@"; then
    echo "done after $attempt attempt(s)" >&2
    exit 0
  fi
  state=$(qr_state "$name-qr")
  if [[ $state == ACTIVE ]]; then
    die "the command failed on a healthy slice (see $logs/attempt-$attempt): not relaunching"
  fi
  echo "slice is $state (preempted?): relaunching" >&2
done
die "gave up after $max_attempts attempts"
