#!/usr/bin/env bash
# Create a TPU slice through a queued resource and wait until it is ACTIVE.
#
#   tpu/create.sh NAME [--spot | --preemptible] [--no-wait] [--timeout MIN] [common flags]
#
# The queued resource is named NAME-qr and its node NAME. --spot asks for Spot capacity
# (cheaper; may be preempted at any time); --preemptible is the older preemptible kind.
# Common flags (see tpu/common.sh): --project, --zone, --accelerator-type, --runtime-version.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
parse_common "$@"
set -- "${ARGS[@]}"
[[ $# -ge 1 ]] || { sed -n '2,9p' "$0"; exit 2; }
name=$1; shift
capacity=(); wait_active=1; timeout_min=60
while [[ $# -gt 0 ]]; do
  case $1 in
    --spot) capacity=(--spot); shift ;;
    --preemptible) capacity=(--preemptible); shift ;;
    --no-wait) wait_active=0; shift ;;
    --timeout) timeout_min=${2:?--timeout needs minutes}; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
gcloud_tpu queued-resources create "$name-qr" --node-id "$name" \
  --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${capacity[@]}"
[[ $wait_active == 1 && $DRY_RUN != 1 ]] || exit 0
deadline=$((SECONDS + timeout_min * 60))
while :; do
  state=$(qr_state "$name-qr")
  echo "queued resource $name-qr: $state" >&2
  case $state in
    ACTIVE) exit 0 ;;
    FAILED|SUSPENDED|NOT_FOUND) die "queued resource $name-qr is $state" ;;
  esac
  [[ $SECONDS -lt $deadline ]] || die "queued resource $name-qr not ACTIVE after $timeout_min min (still $state)"
  sleep "${POLL_SECONDS:-30}"
done
