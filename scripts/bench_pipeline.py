"""SFT input pipeline throughput: tokenize + pack + batch, SmolLM2 tokenizer, this process only.

    taskset -c 0 python scripts/bench_pipeline.py [--batches 200] [--seq-len 1024]

Counts real (non-padding) tokens per second leaving the pipeline; pin to one core with taskset.
"""

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from safer_jax.data import bundled
    from safer_jax.data.pipeline import PipelineConfig, load_traces, sft_dataset
    from safer_jax.data.rules import load_rules
    from safer_jax.data.tokenize import ChatTokenizer
    from safer_jax.models.embedded import smollm2_location

    folder, gguf = smollm2_location()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    traces = load_traces(bundled("train_traces.jsonl"), load_rules())
    it = iter(sft_dataset(traces, ChatTokenizer(tok), PipelineConfig(seq_len=args.seq_len, batch_size=args.batch_size)))
    next(it)  # warm-up
    t0, tokens, fill = time.perf_counter(), 0, 0.0
    for _ in range(args.batches):
        b = next(it)
        tokens += int((b["segment_ids"] > 0).sum())
        fill += float((b["segment_ids"] > 0).mean())
    dt = time.perf_counter() - t0
    print(
        f"{args.batches} batches of {args.batch_size}x{args.seq_len}: {tokens / dt:,.0f} tokens/s, "
        f"{args.batches / dt:.1f} batches/s, packing fill {fill / args.batches:.1%}"
    )


if __name__ == "__main__":
    main()
