"""Time one decode step of the KV-cache sampler (docs/benchmarks.md, "Generation").

    python scripts/decode_step_time.py --model runs/demo/sft/export --batch 64 --prompt 120 [--greedy]

Random prompts of `--prompt` tokens, no EOS (every row decodes every step). The step time is
(a run of `--tokens` new tokens - a run of 1) / (`--tokens` - 1), after a compiling run of
each, so it excludes the prefill and compilation. One device, float32 (`--matmul-dtype bfloat16`:
bf16 products accumulated in float32).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time

import jax
import numpy as np

from safer_jax.generate import SamplingConfig, sample_batch
from safer_jax.models import from_pretrained
from safer_jax.models.embedded import smollm2_location


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="an HF folder, or smollm2 (the embedded default)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=120, help="prompt tokens per row")
    ap.add_argument("--tokens", type=int, default=33, help="new tokens of the timed run")
    ap.add_argument("--greedy", action="store_true", help="argmax instead of temperature 1.0, top-p 0.95")
    ap.add_argument(
        "--progress", action="store_true", help="return to the host every 16 steps, as `generate_chat`'s progress bar"
    )
    ap.add_argument("--max-new", type=int, default=0, help="cache slots for this many new tokens (default --tokens)")
    ap.add_argument("--matmul-dtype", default=None, help="the matmuls' operand dtype (bfloat16; default float32)")
    args = ap.parse_args()
    if args.tokens < 2:
        raise SystemExit(f"--tokens must be at least 2, got {args.tokens}")
    folder, gguf = smollm2_location() if args.model == "smollm2" else (args.model, None)
    model = from_pretrained(folder, gguf_file=gguf, dtype="float32", matmul_dtype=args.matmul_dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, size=args.prompt).tolist() for _ in range(args.batch)]

    def run(n: int) -> tuple[float, int]:
        """(seconds, minor page faults) of generating n tokens (in a cache sized for --max-new)."""
        size = max(args.max_new, args.tokens)
        sc = SamplingConfig(max_new_tokens=size, greedy=args.greedy, temperature=1.0, top_p=0.95)

        def stop_at(step: int) -> None:
            if step >= n:
                for x in jax.live_arrays():  # the prefill and decode calls are dispatched asynchronously
                    x.block_until_ready()
                raise _Done

        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        with contextlib.suppress(_Done):
            every = 16 if args.progress else max(n - 1, 1)
            sample_batch(model, prompts, sc, eos_ids=(), on_progress=stop_at, check_every=every)
        return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    run(1), run(args.tokens)  # compile both programs
    (one, f1), (many, fn) = run(1), run(args.tokens)
    step = (many - one) / (args.tokens - 1)
    print(
        f"batch {args.batch}, prompt {args.prompt}, {'greedy' if args.greedy else 'top-p 0.95'}"
        f"{', host every 16 steps' if args.progress else ''}: prefill + 1 token {one * 1000:.0f} ms; "
        f"decode step {step * 1000:.0f} ms; {args.batch / step:.1f} rows/s; "
        f"{(fn - f1) / (args.tokens - 1):,.0f} page faults a step"
    )


class _Done(Exception):
    pass


if __name__ == "__main__":
    main()
