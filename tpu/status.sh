#!/usr/bin/env bash
# Show a slice's queued resource and node state, and the tail of each worker's log.
#
#   tpu/status.sh NAME [--logs DIR] [--follow] [common flags]
#
# --follow streams the worker logs (tail -F) until interrupted.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
parse_common "$@"
set -- "${ARGS[@]}"
[[ $# -ge 1 ]] || { sed -n '2,6p' "$0"; exit 2; }
name=$1; shift
logs="logs/$name"; follow=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --logs) logs=${2:?--logs needs a folder}; shift 2 ;;
    --follow) follow=1; shift ;;
    *) die "unknown argument $1" ;;
  esac
done
echo "queued resource $name-qr: $(qr_state "$name-qr")"
gcloud_tpu tpu-vm describe "$name" --format='table(name.basename(),state,acceleratorType,health)' || true
shopt -s nullglob
files=("$logs"/worker-*.log)
if [[ ${#files[@]} -eq 0 ]]; then echo "no logs under $logs"; exit 0; fi
if [[ $follow == 1 ]]; then exec tail -n 20 -F "${files[@]}"; fi
for f in "${files[@]}"; do echo "== $f"; tail -n 5 "$f"; done
