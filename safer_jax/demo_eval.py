"""The demo's evaluation: a stratified sample of the bundled held-out prompts (plain harmful,
rephrased attacks, self-harm, benign, borderline), evaluated with the decode speed measured on
the demo's clock, and the baseline's result read from the per-machine cache when it is there.
"""

from __future__ import annotations

import random
from typing import Any

from safer_jax.demo_budget import Clock

# the evaluation sample: groups of the bundled held-out prompts, drawn separately
EVAL_GROUPS = ("harmful", "adversarial", "self_harm", "benign", "borderline")
EVAL_COUNTS = (40, 20, 10, 36, 14)  # at least these many per group (issue #18); 120 prompts
QUICK_EVAL_COUNTS = (4, 2, 2, 8, 4)


def _say(msg: str) -> None:
    print(msg, flush=True)


def eval_group(ex: Any) -> str:
    """Which of EVAL_GROUPS an evaluation example belongs to (adversarial before self-harm)."""
    if ex.label != "harmful":
        return ex.label
    if ex.extra.get("split", "plain") == "adversarial":
        return "adversarial"
    return "self_harm" if ex.category == "self_harm" else "harmful"


def eval_examples(counts: tuple[int, ...], seed: int = 0) -> list[Any]:
    """A stratified sample of the bundled held-out evaluation prompts, `counts` per EVAL_GROUPS
    (0 = every prompt of that group); raises if a group has fewer prompts than asked."""
    from safer_jax.evaluation import load_eval_sets

    if len(counts) != len(EVAL_GROUPS):
        raise ValueError(f"eval_counts {counts}: need one count per group {EVAL_GROUPS}")
    rows = load_eval_sets(["bundled"])
    rng = random.Random(seed)
    out = []
    for group, n in zip(EVAL_GROUPS, counts):
        pool = [r for r in rows if eval_group(r) == group]
        if n > len(pool):
            raise ValueError(f"the bundled evaluation set has {len(pool)} {group} prompts, the plan asks for {n}")
        out += sorted(pool if n == 0 else rng.sample(pool, n), key=lambda r: r.id)
    return out


def decode_steps(gens: list[dict[str, Any]], batch: int) -> int:
    """Decode steps the generation ran: generate_chat batches rows by prompt length (a stable sort)
    and a batch decodes until its longest answer ends."""
    order = sorted(range(len(gens)), key=lambda i: gens[i]["prompt_tokens"])
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    return sum(max(gens[i]["completion_tokens"] for i in b) for b in batches)


def evaluate(
    path: str,
    gguf: str | None,
    examples: list[Any],
    plan: Any,
    name: str,
    clock: Clock,
    cache: Any = None,
    use_cache: bool = True,
) -> tuple[Any, dict[str, Any], bool]:
    """(result, timing, cache hit): generate and score, or the cached result of the same evaluation.
    Timing (on `clock`): load_s, generate_s, decode_steps, decode_step_s (and cache_key with a cache)."""
    from safer_jax.data.tokenize import ChatTokenizer, load_tokenizer
    from safer_jax.evaluation import run_eval
    from safer_jax.generate import SamplingConfig, generate_chat

    sampling = SamplingConfig(max_new_tokens=plan.max_new_tokens, greedy=True)
    t0 = clock.now()
    tok = ChatTokenizer(load_tokenizer(path, gguf))
    key = parts = None
    if cache is not None:
        from safer_jax.evaluation.result_cache import result_key, scoring_fingerprint
        from safer_jax.training.ref_cache import reference_fingerprint, tokenization_fingerprint

        key, parts = result_key(
            model_fp=reference_fingerprint(path, gguf, cache.memo_file),
            tokenization_fp=tokenization_fingerprint(tok, 0),
            examples=examples,
            sampling=sampling,
            batch_size=plan.gen_batch,
            scoring_fp=scoring_fingerprint(),
        )
        hit = cache.load(key) if use_cache else None
        if hit is not None:
            _say(f"{name}: cached result {cache.path(key)} (--no-cache recomputes)")
            return hit[0], {**hit[1], "cache_key": key}, True
    from safer_jax.models import from_pretrained

    model = from_pretrained(path, gguf_file=gguf)
    clock.spend("load")
    load_s = clock.now() - t0
    gens: list[dict[str, Any]] = []

    def generate(*args: Any, **kw: Any) -> list[dict[str, Any]]:
        # whole batches (no compaction): a batch then costs its longest answer's steps at the
        # measured step time, so the baseline's speed bounds the final evaluation (demo_budget)
        gens.extend(generate_chat(*args, compact=False, **kw))
        return gens

    t1 = clock.now()
    res = run_eval(
        model,
        tok,
        examples,
        sampling,
        batch_size=plan.gen_batch,
        generate_fn=generate,
        info={"model": name, "name": name, "load_s": round(load_s, 1)},
    )
    steps = decode_steps(gens, plan.gen_batch)
    clock.spend("decode", steps)
    gen_s = clock.now() - t1
    timing = {
        "load_s": round(load_s, 2),
        "generate_s": round(gen_s, 2),
        "decode_steps": steps,
        "decode_step_s": round(gen_s / max(steps, 1), 4),
    }
    if cache is not None:
        _say(f"{name}: result cached in {cache.save(key, parts, res, timing)}")
        timing = {**timing, "cache_key": key}
    return res, timing, False
