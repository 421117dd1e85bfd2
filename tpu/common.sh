#!/usr/bin/env bash
# Shared by the tpu/ scripts (sourced, never run): settings from flags or the environment, and
# `run`, which prints each command (secrets masked) before it runs it.
#
# Settings (flag / environment variable / default):
#   --project P            PROJECT, else CLOUDSDK_CORE_PROJECT       (required)
#   --zone Z               ZONE, else CLOUDSDK_COMPUTE_ZONE          (required)
#   --accelerator-type T   ACCELERATOR_TYPE                          v5p-8
#   --runtime-version V    RUNTIME_VERSION                           by accelerator generation
#   --bucket gs://B        BUCKET                                    (only where a script needs it)
#   --dry-run              DRY_RUN=1: print the commands, run none

PROJECT=${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ZONE=${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
BUCKET=${BUCKET:-}
DRY_RUN=${DRY_RUN:-0}
REPO_DIR=${REPO_DIR:-safer-jax}   # the checkout on each worker, relative to its home
ARGS=()                            # what is left after the common flags

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# Parse the common flags out of "$@"; the rest lands in ARGS.
parse_common() {
  ARGS=()
  while [[ $# -gt 0 ]]; do
    case $1 in
      --project) PROJECT=${2:?--project needs a value}; shift 2 ;;
      --zone) ZONE=${2:?--zone needs a value}; shift 2 ;;
      --accelerator-type) ACCELERATOR_TYPE=${2:?--accelerator-type needs a value}; shift 2 ;;
      --runtime-version) RUNTIME_VERSION=${2:?--runtime-version needs a value}; shift 2 ;;
      --bucket) BUCKET=${2:?--bucket needs a value}; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) ARGS+=("$@"); break ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
  [[ -n $PROJECT ]] || die "no project: pass --project P or set PROJECT"
  [[ -n $ZONE ]] || die "no zone: pass --zone Z or set ZONE"
  if [[ -z $RUNTIME_VERSION ]]; then
    case $ACCELERATOR_TYPE in
      v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      *) die "no default runtime version for $ACCELERATOR_TYPE: pass --runtime-version" ;;
    esac
  fi
  if [[ -n $BUCKET && $BUCKET != gs://* ]]; then die "bucket must be a gs:// URL, got $BUCKET"; fi
}

# Print a command (HF_TOKEN's value masked), then run it unless DRY_RUN=1.
run() {
  local shown
  shown=$(printf '%q ' "$@")
  if [[ -n ${HF_TOKEN:-} ]]; then shown=${shown//"$HF_TOKEN"/***}; fi
  echo "+ ${shown% }" >&2
  [[ $DRY_RUN == 1 ]] || "$@"
}

gcloud_tpu() { run gcloud compute tpus "$@" --project "$PROJECT" --zone "$ZONE"; }

# The state of a queued resource (ACTIVE, PROVISIONING, SUSPENDED, FAILED, ...), or NOT_FOUND.
qr_state() {
  local state
  if state=$(gcloud compute tpus queued-resources describe "$1" --project "$PROJECT" --zone "$ZONE" \
      --format='value(state.state)' 2>/dev/null); then
    echo "${state:-UNKNOWN}"
  else
    echo NOT_FOUND
  fi
}

# Number of workers (hosts) of a TPU VM: one network endpoint each.
worker_count() {
  local ips
  ips=$(gcloud compute tpus tpu-vm describe "$1" --project "$PROJECT" --zone "$ZONE" \
    --format='value(networkEndpoints[].ipAddress)') || return 1
  [[ -n $ips ]] || return 1
  local -a list
  IFS=';, ' read -r -a list <<<"$ips"
  echo "${#list[@]}"
}
