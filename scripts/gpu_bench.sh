#!/usr/bin/env bash
# One prepared GPU run (issue 14), within 5 minutes on one GPU, offline.
#
#   WHEELS=/path/to/wheels OUT=gpu-results bash scripts/gpu_bench.sh
#
# Needs Python 3.12 with jax[cuda] 0.11, torch 2.11 (CUDA) and transformers 5.17 installed.
# Whatever else the benchmark imports (flax, optax, trl 1.16 and their dependencies) is
# installed from $WHEELS without the network, pinned so that jax, torch and transformers
# stay as they are. Prepare that folder on a machine with the network:
#   pip download --python-version 3.12 --only-binary=:all: -d wheels flax==0.12.8 optax==0.2.8 trl==1.16.0
#
# Writes, each as soon as it is measured, into $OUT:
#   env.json                 versions, GPU, nvidia-smi line
#   attention_parity.json    cudnn (and cudnn_rows) against xla attention, outputs and gradients, bf16, T=2048
#   sft.json                 Llama-3.2-1B shape, seq 2048, batch 4, bf16: JAX (cudnn) vs PyTorch eager vs torch.compile
#   prefopt.json             the same shape, 2 pairs (4 rows) of 2048, bf16, frozen reference: JAX (cudnn_rows) vs
#                            TRL's DPO loss in PyTorch eager vs torch.compile
# Each step has its own time limit (sum 285 s); a step that runs out leaves what it measured.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
WHEELS=${WHEELS:-wheels}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
say() { echo "[gpu_bench +$(( $(date +%s) - T0 ))s] $*" >&2; }

missing=$($PY - <<'PY'
import importlib.util
need = {"flax": "flax", "optax": "optax", "trl": "trl==1.16.0", "safetensors": "safetensors", "yaml": "pyyaml"}
print(" ".join(spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  say "installing from $WHEELS: $missing"
  $PY -m pip freeze 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]*-(plugin|pjrt)|torch|transformers|numpy)==' > "$OUT/pins.txt"
  $PY -m pip install -q --no-index --find-links "$WHEELS" -c "$OUT/pins.txt" $missing || { say "install failed"; exit 1; }
fi

$PY - > "$OUT/env.json" <<'PY'
import importlib.metadata as md, json, platform, subprocess
v = {"python": platform.python_version()}
for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl"):
    try: v[p] = md.version(p)
    except md.PackageNotFoundError: v[p] = None
try: gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e: gpu = f"nvidia-smi failed: {e}"
print(json.dumps({"versions": v, "gpu": gpu}, indent=2))
PY
say "env: $(tr -d '\n' < "$OUT/env.json")"

say "attention parity (cudnn vs xla)"
timeout 45 $PY scripts/attention_parity.py --json "$OUT/attention_parity.json" --dtype bfloat16 --seq 2048 \
  || say "attention parity: exit $?"

say "sft: JAX (cudnn) vs torch eager vs torch.compile"
timeout 130 $PY -m safer_jax.cli bench --model llama3.2-1b --task sft --seq 2048 --batch 4 --dtype bfloat16 --steps 4 \
  --attention cudnn --torch --torch-compile --json "$OUT/sft.json" || say "sft: exit $?"

say "prefopt: JAX (cudnn_rows) vs TRL DPO in torch eager vs torch.compile"
timeout 110 $PY -m safer_jax.cli bench --model llama3.2-1b --task prefopt --seq 2048 --batch 2 --dtype bfloat16 \
  --steps 4 --attention cudnn_rows --torch --torch-compile --json "$OUT/prefopt.json" || say "prefopt: exit $?"

say "done; results in $OUT"
ls -l "$OUT" >&2
