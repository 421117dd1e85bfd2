#!/usr/bin/env bash
# Install safer-jax on every worker of a TPU slice, from a git URL.
#
#   tpu/install.sh NAME GIT_URL [--ref BRANCH_OR_TAG] [common flags]
#
# Clones (or updates) ~/safer-jax on each worker, creates its .venv, installs `.[tpu]` and
# prints each worker's process index and devices. HF_TOKEN, when set here, is written to each
# worker's Hugging Face token file (for gated models such as Llama); it is masked in the
# printed commands.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
parse_common "$@"
set -- "${ARGS[@]}"
[[ $# -ge 2 ]] || { sed -n '2,9p' "$0"; exit 2; }
name=$1; url=$2; shift 2
ref=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --ref) ref=${2:?--ref needs a value}; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
remote="set -e
if [ -d ~/$REPO_DIR/.git ]; then git -C ~/$REPO_DIR fetch -q --all; else git clone -q $(printf '%q' "$url") ~/$REPO_DIR; fi
${ref:+git -C ~/$REPO_DIR checkout -q $(printf '%q' "$ref")}
cd ~/$REPO_DIR && python3 -m venv .venv && . .venv/bin/activate
pip install -q --upgrade pip && pip install -q -e '.[tpu]'"
if [[ -n ${HF_TOKEN:-} ]]; then
  remote+="
mkdir -p ~/.cache/huggingface && umask 077 && printf %s $(printf '%q' "$HF_TOKEN") > ~/.cache/huggingface/token"
fi
remote+="
python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
gcloud_tpu tpu-vm ssh "$name" --worker=all --command "$remote"
