"""`safer-jax bench`: the JAX step and the PyTorch baseline on the same work, side by side.

Each side runs in its own process (`jax_side`, then `torch_side`): the frameworks never
share a device, an allocator or a thread pool, and each side's peak memory is its own.
The JAX side writes the model to a HF folder that the torch side loads, and both rebuild
the same batches from the spec's seed (`work.py`). The record is written to `--json` as
soon as each side is measured.

The JAX side runs as safer-jax runs on CPU, with glibc's huge-page tunable (`runtime_env`); the
torch side gets the environment the user started with, PyTorch eager as they would run it. Each
side's `GLIBC_TUNABLES` is in the record (`allocator`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safer_jax.bench.shapes import resolve_shape
from safer_jax.bench.work import BenchSpec
from safer_jax.runtime_env import user_environ, with_tunable

ATTENTION_NAMES = (
    "xla",
    "jax",
    "cudnn",
    "cudnn_rows",
    "splash",
)  # models/attention.py ATTENTION_BACKENDS (no jax import here)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl", "numpy")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def check(spec: BenchSpec, with_torch: bool) -> None:
    """Bad input fails here, before any process starts."""
    resolve_shape(spec.model)
    if spec.attention not in ATTENTION_NAMES:
        raise ValueError(f"--attention {spec.attention!r} unknown; choose from {ATTENTION_NAMES}")
    if with_torch or spec.torch_compile:
        if importlib.util.find_spec("torch") is None:
            raise ValueError("--torch needs PyTorch, which is not installed: pip install 'safer-jax[torch]'")
        if spec.task == "prefopt" and importlib.util.find_spec("trl") is None:
            raise ValueError(
                "--torch with --task prefopt needs TRL's DPO loss: pip install 'safer-jax[torch]' (trl==1.16.0)"
            )


def _side(module: str, spec_path: Path, out_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one side; its log goes to our stderr; an `error:` line becomes the exception's message."""
    cmd = [sys.executable, "-m", f"safer_jax.bench.{module}", str(spec_path), str(out_path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    last_error = None
    for line in proc.stderr:
        sys.stderr.write(line)
        if line.startswith("error: "):
            last_error = line[len("error: ") :].strip()
    rc = proc.wait()
    if rc != 0:
        raise ValueError(last_error or f"the {module} process exited with status {rc}")
    return json.loads(out_path.read_text())


def side_environs(environ: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(JAX side, torch side) environments: safer-jax's CPU allocator setting on the JAX side only,
    the user's own environment on the torch side; both find this checkout's package first."""
    user = user_environ(environ)
    user["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), user.get("PYTHONPATH", "")])
    return with_tunable(user), user


def run_bench(
    spec: BenchSpec,
    with_torch: bool = False,
    json_path: str | None = None,
    command: str = "",
    work_dir: str | None = None,
) -> dict[str, Any]:
    """Measure the JAX side (and the torch side with `with_torch`); returns the record."""
    check(spec, with_torch)
    tmp = Path(work_dir or tempfile.mkdtemp(prefix="safer-jax-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    spec = dataclasses.replace(spec, model_dir=str(tmp / "model"))
    spec_path = tmp / "spec.json"
    spec_path.write_text(spec.to_json())
    jax_env, torch_env = side_environs(os.environ)
    record: dict[str, Any] = {
        "jax": None,
        "torch": None,
        "torch_compile": None,
        "device": None,
        "versions": versions(),
        "command": command,
        "spec": dataclasses.asdict(spec),
        "load_average": list(os.getloadavg()),
        "allocator": {"jax": jax_env.get("GLIBC_TUNABLES"), "torch": torch_env.get("GLIBC_TUNABLES")},
    }

    def save() -> None:
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(record, indent=2))

    try:
        record["jax"] = _side("jax_side", spec_path, tmp / "jax.json", jax_env)
        record["device"] = record["jax"]["device"]
        save()
        sides = ([("torch", False)] if with_torch else []) + ([("torch_compile", True)] if spec.torch_compile else [])
        for name, compiled in sides:  # eager, then torch.compile, on the same weights and batches
            side_spec = tmp / f"{name}_spec.json"
            side_spec.write_text(dataclasses.replace(spec, torch_compile=compiled).to_json())
            record[name] = _side("torch_side", side_spec, tmp / f"{name}.json", torch_env)
            record[f"jax_over_{name}"] = record["jax"]["tokens_per_s"] / record[name]["tokens_per_s"]
            save()
        record["load_average_after"] = list(os.getloadavg())
        save()
    finally:
        if work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return record


def table(record: dict[str, Any]) -> str:
    """The terminal table: one column per side."""
    rows = [
        ("tokens", "{:d}"),
        ("tokens_per_s", "{:.1f}"),
        ("step_s", "{:.3f}"),
        ("first_loss", "{:.6f}"),
        ("peak_memory_bytes", "{:,}"),
        ("flops_per_step", "{:.4g}"),
        ("achieved_tflops", "{:.4f}"),
        ("mfu", "{:.1%}"),
        ("threads", "{}"),
    ]
    sides = [s for s in ("jax", "torch", "torch_compile") if record.get(s)]
    head = f"| {'':18} | " + " | ".join(f"{s:>16}" for s in sides) + " |"
    lines = [head, "|" + "-" * 20 + "|" + "|".join("-" * 18 for _ in sides) + "|"]
    for key, fmt in rows:
        cells = []
        for s in sides:
            v = record[s].get(key)
            cells.append(f"{'-' if v is None else fmt.format(v):>16}")
        lines.append(f"| {key:18} | " + " | ".join(cells) + " |")
    for name in ("torch", "torch_compile"):
        if f"jax_over_{name}" in record:
            lines.append(f"JAX / {name} tokens/s: {record[f'jax_over_{name}']:.2f}x on {record['device']}")
    return "\n".join(lines)
