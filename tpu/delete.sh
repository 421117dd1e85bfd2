#!/usr/bin/env bash
# Delete a slice: its queued resource and the node in it.
#
#   tpu/delete.sh NAME [common flags]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
parse_common "$@"
set -- "${ARGS[@]}"
[[ $# -eq 1 ]] || { sed -n '2,4p' "$0"; exit 2; }
gcloud_tpu queued-resources delete "$1-qr" --force --quiet
