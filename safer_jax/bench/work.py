"""The work both sides of the benchmark do: its spec, its batches, and how it is counted.

Numpy only (no JAX, no torch): the JAX and the PyTorch processes each rebuild the very
same batches from the spec's seed, so nothing but the spec and the weights folder is
handed from one side to the other.

SFT batches are packed rows `[B, T]` (`inputs`, `targets`, `weights`, `segment_ids`,
`positions`; segment 0 is padding, positions restart at each segment). Preference batches
are `[2B, T]` pair rows, chosen block then rejected block, with a shared context and a
differing span (`input_ids`, `span_mask`, `segment_ids`, `positions`), as `data/pipeline.py`
makes them.
"""

from __future__ import annotations

import dataclasses
import json
import resource
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from safer_jax.config import MATMUL_DTYPES
from safer_jax.metrics import device_peak_tflops, flops_per_token

TASKS = ("sft", "prefopt")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One benchmark run; both sides read it from the same JSON file."""

    model: str = "tiny"
    task: str = "sft"
    seq: int = 512
    batch: int = 4
    dtype: str = "float32"
    steps: int = 4  # step 1 is the warm-up (not timed); steps 2..S are timed
    seed: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.01
    beta: float = 0.1
    attention: str = "xla"
    matmul_dtype: str | None = None  # the JAX side's matmul operand dtype (None: `dtype`)
    chunk: int = 512
    torch_compile: bool = False
    profile: str = ""
    model_dir: str = ""  # the HF folder both sides load (written by the JAX side)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} unknown; choose from {TASKS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} unknown; choose from {DTYPES}")
        if self.matmul_dtype not in (None, *MATMUL_DTYPES):
            raise ValueError(f"--matmul-dtype {self.matmul_dtype!r} unknown; choose from {MATMUL_DTYPES}")
        if self.steps < 2:
            raise ValueError(f"--steps {self.steps}: needs at least 2 (step 1 is the untimed warm-up)")
        if self.seq < 16 or self.batch < 1:
            raise ValueError(f"--seq {self.seq} --batch {self.batch}: need seq >= 16 and batch >= 1")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def read(cls, path: str | Path) -> BenchSpec:
        return cls(**json.loads(Path(path).read_text()))


def _rng(spec: BenchSpec, step: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, step, 7])


def sft_batch(spec: BenchSpec, vocab: int, step: int) -> dict[str, np.ndarray]:
    """Packed SFT rows `[B, T]`: 2 to 4 segments a row, loss on each segment's second part,
    and the last row ending in padding."""
    rng, b, t = _rng(spec, step), spec.batch, spec.seq
    out = {k: np.zeros((b, t), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    out["weights"] = np.zeros((b, t), np.float32)
    for r in range(b):
        end = t - (t // 8 if r == b - 1 else 0)
        start, seg = 0, 1
        while end - start >= 8:
            n = int(min(end - start, rng.integers(t // 4, t // 2 + 1)))
            ids = rng.integers(1, vocab, n + 1)
            prompt = int(rng.integers(1, max(2, n // 2)))
            sl = slice(start, start + n)
            out["inputs"][r, sl], out["targets"][r, sl] = ids[:-1], ids[1:]
            out["weights"][r, start + prompt : start + n] = 1.0
            out["segment_ids"][r, sl] = seg
            out["positions"][r, sl] = np.arange(n)
            start, seg = start + n, seg + 1
    return out


def pair_batch(spec: BenchSpec, vocab: int, step: int) -> dict[str, np.ndarray]:
    """Pair rows `[2B, T]`: chosen rows then rejected rows; each pair shares its context."""
    rng, b, t = _rng(spec, step), spec.batch, spec.seq
    ids = np.zeros((2 * b, t), np.int32)
    span = np.zeros((2 * b, t), np.int32)
    for i in range(b):
        ctx = int(rng.integers(t // 4, t // 2))
        context = rng.integers(1, vocab, ctx)
        for row in (i, b + i):
            n = int(rng.integers(t // 16 + 1, t // 4 + 1))
            ids[row, :ctx] = context
            ids[row, ctx : ctx + n] = rng.integers(1, vocab, n)
            span[row, ctx : ctx + n] = 1
    seg = np.zeros_like(ids)
    for row in range(2 * b):
        seg[row, : int(np.nonzero(span[row])[0].max()) + 1] = 1
    pos = np.where(seg > 0, np.arange(t)[None, :], 0).astype(np.int32)
    return {"input_ids": ids, "span_mask": span, "segment_ids": seg, "positions": pos}


def batch(spec: BenchSpec, vocab: int, step: int) -> dict[str, np.ndarray]:
    """The batch of step `step` (1-based)."""
    return (sft_batch if spec.task == "sft" else pair_batch)(spec, vocab, step)


def tokens_per_step(spec: BenchSpec) -> int:
    """Positions computed per step (rows x T, padding included, as MFU conventions count)."""
    return spec.batch * spec.seq * (2 if spec.task == "prefopt" else 1)


def flops_per_step(spec: BenchSpec, cfg: Any) -> float:
    """DESIGN.md's count: (6N + 6LTHDh) per token, plus 2N per token for the frozen reference."""
    return flops_per_token(cfg, spec.seq, reference_forward=spec.task == "prefopt") * tokens_per_step(spec)


def hf_shape(hf: dict[str, Any]) -> SimpleNamespace:
    """The fields the FLOP count and masks need, read from a HF `config.json` dict, named as
    `DecoderConfig` names them (so the torch process need not import the JAX model code)."""
    layers, heads = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
    windows = [0] * layers
    if hf.get("layer_types"):
        windows = [int(hf["sliding_window"]) if t == "sliding_attention" else 0 for t in hf["layer_types"]]
    elif hf.get("sliding_window") and (hf.get("use_sliding_window") or hf.get("model_type") == "mistral"):
        first = int(hf.get("max_window_layers", 0)) if hf.get("use_sliding_window") else 0
        windows = [int(hf["sliding_window"]) if i >= first else 0 for i in range(layers)]
    return SimpleNamespace(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        sliding_windows=tuple(windows),
    )


def peak_tflops(device_name: str) -> float | None:
    """bf16 dense peak of a device named like `NVIDIA H100 80GB HBM3` or `TPU v5p`, None if unknown."""
    return device_peak_tflops(SimpleNamespace(device_kind=device_name))


def summarize(
    spec: BenchSpec,
    cfg: Any,
    step_times: list[float],
    losses: list[float],
    real_tokens: int,
    loss_tokens: int,
    peak_memory: int | None,
    device_name: str,
    **extra: Any,
) -> dict[str, Any]:
    """One side's record: timed steps are 2..S (step 1, the warm-up, is excluded)."""
    timed = step_times[1:]
    step_s = float(np.median(timed))
    tokens = tokens_per_step(spec) * len(timed)
    fps = flops_per_step(spec, cfg)
    achieved = fps / step_s
    peak = peak_tflops(device_name)
    return {
        "tokens": tokens,
        "real_tokens": real_tokens,
        "loss_tokens": loss_tokens,
        "tokens_per_s": tokens / float(np.sum(timed)),
        "step_s": step_s,
        "step_times_s": step_times,
        "first_loss": losses[0],
        "losses": losses,
        "peak_memory_bytes": peak_memory,
        "flops_per_step": fps,
        "achieved_tflops": achieved / 1e12,
        # MFU against the bf16 dense peak, so only for bf16 compute on a device with a known peak
        "mfu": achieved / (peak * 1e12) if peak and spec.dtype == "bfloat16" else None,
        "device": device_name,
        **extra,
    }


def minor_faults() -> int:
    """This process's minor page faults so far: each step's count shows how much memory it maps
    afresh (first touches of newly mapped pages, which the kernel zeroes), a cost outside the ops."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def side_main(run: Any, argv: list[str], errors: tuple[type[BaseException], ...] = ()) -> int:
    """`python -m safer_jax.bench.<side> SPEC OUT`: run one side on the spec, write its JSON record.
    Input errors (and `errors`) exit 2 with the message only."""
    import sys

    spec_path, out_path = argv
    try:
        result = run(BenchSpec.read(spec_path))
    except (ValueError, FileNotFoundError, RuntimeError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(out_path).write_text(json.dumps(result))
    return 0
