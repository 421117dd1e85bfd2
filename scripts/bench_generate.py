"""Generation throughput: safer-jax's KV-cache sampler against transformers `generate`.

Same model, same chat prompts (left-padded batch), greedy, float32, the same number of new
tokens on both sides (EOS stops neither side, so every row makes exactly N). Each side
gets one warm-up (JAX compiles; torch allocates) and then one timed run. Decode tokens/s
excludes the prefill, measured by a separate 1-token run of the same batch.

    python scripts/bench_generate.py                  # the embedded SmolLM2-135M-Instruct
    python scripts/bench_generate.py --model DIR --batch 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do plants turn sunlight into sugar?",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Explain what a prime number is to a child.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


def smollm2_folder(out: str) -> str:
    """A plain fp32 HF folder of the embedded SmolLM2 (STACK-NOTES recipe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from safer_jax.models.embedded import smollm2_location

    folder, gguf = smollm2_location()
    qm = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf)
    cfg = qm.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    m = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    m.load_state_dict(qm.state_dict(), strict=True)
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf).save_pretrained(out)
    return out


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2, rebuilt in a temp dir)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()

    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safer_jax.generate import SamplingConfig, chat_prompt_ids, sample_batch
    from safer_jax.models import from_pretrained

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tmp = tempfile.TemporaryDirectory()
    path = args.model or smollm2_folder(tmp.name)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [chat_prompt_ids(tok, {"prompt": QUESTIONS[i % len(QUESTIONS)]}) for i in range(args.batch)]
    n, b = args.new_tokens, args.batch
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    # ---- safer-jax
    model = from_pretrained(path)

    def ours(k):
        return sample_batch(model, prompts, SamplingConfig(max_new_tokens=k), eos_ids=(), pad_id=pad)

    ours(n), ours(1)  # compile both shape buckets
    jax_prefill, _ = timed(lambda: ours(1))
    jax_total, jax_out = timed(lambda: ours(n))
    assert all(len(t) == n for t in jax_out.tokens)

    # ---- transformers
    tm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tm.generation_config.eos_token_id = None  # like eos_ids=() above: no stopping, no EOS suppression
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def theirs(k):
        with torch.no_grad():
            return tm.generate(ids, attention_mask=mask, max_new_tokens=k, do_sample=False, pad_token_id=pad)

    theirs(4)  # warm-up
    hf_prefill, _ = timed(lambda: theirs(1))
    hf_total, hf_out = timed(lambda: theirs(n))
    hf_tokens = hf_out[:, width:].tolist()

    same = sum(a == c for a, c in zip(jax_out.tokens, hf_tokens))  # sanity: the same greedy text
    res = {
        "batch": b,
        "new_tokens": n,
        "prompt_tokens": [len(p) for p in prompts],
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
        "jax_total_s": round(jax_total, 3),
        "jax_prefill_s": round(jax_prefill, 3),
        "hf_total_s": round(hf_total, 3),
        "hf_prefill_s": round(hf_prefill, 3),
        "jax_tokens_per_s": round(b * n / jax_total, 1),
        "hf_tokens_per_s": round(b * n / hf_total, 1),
        "jax_decode_tokens_per_s": round(b * (n - 1) / (jax_total - jax_prefill), 1),
        "hf_decode_tokens_per_s": round(b * (n - 1) / (hf_total - hf_prefill), 1),
        "rows_identical": f"{same}/{b}",
    }
    res["decode_ratio_jax_over_hf"] = round(res["jax_decode_tokens_per_s"] / res["hf_decode_tokens_per_s"], 2)
    res["total_ratio_jax_over_hf"] = round(hf_total / jax_total, 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
