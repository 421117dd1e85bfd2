"""Throughput accounting (FLOPs, MFU) and metric trackers (stdout, JSONL, TensorBoard).

FLOPs per trained token = 6 N + 6 L T H Dh (DESIGN.md): N matmul parameters (lm_head
in, input embedding out), attention counted causal-halved as MaxText does. A preference
step with a live reference adds 2 N per token for the reference forward.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from safer_jax.paths import as_path, copy_file, is_remote, upload_dir

# bf16 dense peak TFLOP/s per device
PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "a100": 312.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6 lite": 918.0,
    "tpu v6e": 918.0,
}


def matmul_params(cfg: Any) -> int:
    """N: parameters in matmuls (the output projection counts, the input embedding does not)."""
    d, f, n, k, h, v = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
    return cfg.num_layers * per_layer + d * v


def flops_per_token(cfg: Any, seq_len: int, reference_forward: bool = False) -> float:
    n = matmul_params(cfg)
    attn = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 6 * n + attn + (2 * n if reference_forward else 0)


def device_peak_tflops(device: Any) -> float | None:
    """Peak bf16 TFLOP/s of one device, or None where unknown (CPU)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in kind:
            return peak
    return None


class Throughput:
    """tokens/s, achieved TFLOP/s and MFU over steps, warm-up steps excluded."""

    def __init__(self, flops_per_token: float, n_devices: int, peak_tflops: float | None, warmup: int = 1):
        self.fpt, self.n, self.peak, self.warmup = flops_per_token, n_devices, peak_tflops, warmup
        self.seen = 0
        self.t_last = time.perf_counter()

    def step(self, tokens: int) -> dict[str, float]:
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        self.seen += 1
        out = {"step_time_s": dt}
        if self.seen <= self.warmup or dt <= 0:
            return out
        tps = tokens / dt
        tflops = tps * self.fpt / 1e12
        out.update(tokens_per_s=tps, tflops=tflops, tflops_per_device=tflops / self.n)
        if self.peak:
            out["mfu"] = tflops / (self.n * self.peak)
        return out


class Tracker:
    """Writes scalars to `metrics.jsonl` and TensorBoard (tensorboardX), on process 0 only.

    Both are written on a local disk: the run folder itself, or, when that is a bucket URL,
    a local staging folder whose files are uploaded whole every `sync_seconds` and on
    `close` (object stores cannot append, and tensorboardX's own GCS writer is broken). A
    resumed run downloads the earlier `metrics.jsonl` first, so its rows are kept.
    """

    def __init__(
        self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True, sync_seconds: float = 30.0
    ):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self._stage = None
        if not enabled:
            return
        self.run_dir = as_path(run_dir)
        self.sync_seconds, self._synced = sync_seconds, time.time()
        if is_remote(self.run_dir):
            self._stage = tempfile.TemporaryDirectory(prefix="safer-jax-tracker-")
            local = Path(self._stage.name)
            if (self.run_dir / "metrics.jsonl").exists():
                copy_file(self.run_dir / "metrics.jsonl", local / "metrics.jsonl")
        else:
            local = Path(self.run_dir)
        self.local = local
        local.mkdir(parents=True, exist_ok=True)
        self.file = open(local / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(local / "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": prefix, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
        if self._stage is not None and time.time() - self._synced > self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Upload the staged files to the run folder (nothing to do for a local run folder)."""
        if self._stage is None:
            return
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()
        upload_dir(self.local, self.run_dir)
        self._synced = time.time()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.file:
            self.file.flush()
            if self._stage is not None:
                upload_dir(self.local, self.run_dir)
            self.file.close()
            self.file = None
        if self._stage is not None:
            self._stage.cleanup()
            self._stage = None
