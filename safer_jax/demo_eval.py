"""The demo's evaluation: a stratified sample of the bundled held-out prompts (plain harmful,
rephrased attacks, self-harm, benign, borderline), evaluated with the decode speed measured on
the demo's clock, and the baseline's result read from the per-machine cache when it is there.
"""

from __future__ import annotations

import math
import random
from typing import Any

from safer_jax.data import bundled
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


def predicted_lengths(examples: list[Any], tok: Any, max_new_tokens: int, loop_share: float) -> list[int]:
    """Answer lengths (tokens) to price the aligned model's evaluation by, before it exists: the model
    is trained to write the bundled traces, so each evaluation group's rows get the lengths of that
    group's training answers (reasoning, response and end of turn) at evenly spaced quantiles; then
    the `loop_share` longest rows run to `max_new_tokens`, for the answers that never stop."""
    from safer_jax.data.pipeline import load_traces
    from safer_jax.data.rules import load_rules

    rules = load_rules()
    by_group: dict[str, list[int]] = {}
    for t in load_traces(bundled("train_traces.jsonl")):
        self_harm = any(r in rules and rules[r].category == "self_harm" for r in t.rules)
        group = "self_harm" if t.label == "harmful" and self_harm else t.label
        by_group.setdefault(group, []).append(int(tok.encode_trace(t)["loss_mask"].sum()))
    rows = [eval_group(ex) for ex in examples]
    out = [0] * len(rows)
    for group in set(rows):
        pool = sorted(by_group.get(group) or by_group.get("harmful" if group != "benign" else "benign") or [1])
        idx = [i for i, g in enumerate(rows) if g == group]
        for k, i in enumerate(idx):
            out[i] = min(max_new_tokens, pool[min(len(pool) - 1, int((k + 0.5) / len(idx) * len(pool)))])
    for i in sorted(range(len(out)), key=lambda i: -out[i])[: math.ceil(loop_share * len(out))]:
        out[i] = max_new_tokens
    return out


def evaluate(
    path: str,
    gguf: str | None,
    examples: list[Any],
    plan: Any,
    name: str,
    clock: Clock,
    cache: Any = None,
    use_cache: bool = True,
    deadline: float | None = None,
) -> tuple[Any, dict[str, Any], bool]:
    """(result, timing, cache hit): generate and score, or the cached result of the same evaluation.

    Greedy batches drop their finished rows as they go (`generate.sample_batch`'s compaction), and
    each decode call is timed on `clock` by its batch rows, so the demo can price the next
    evaluation by the rows it will decode. Timing: load_s, prefill_s, generate_s, decode_steps,
    row_steps, step_s_by_rows ({rows: seconds a decode step}), cut (and cache_key with a cache).
    `deadline` (a `clock` time): decoding stops when its next call would pass it, and the rows
    still unfinished are scored as cut off (finish reason "length"; `cut` counts them). On the
    scripted clock a decode step costs `decode` x rows / plan.gen_batch, a prefill `prefill` x the same.
    """
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
    prefill_s = [0.0]
    by_rows: dict[int, tuple[float, int]] = {}  # batch rows -> (seconds, decode steps)
    last = [clock.now()]

    def on_segment(info: dict[str, int]) -> bool:
        rows, steps = info["rows"], info["steps"]
        clock.spend("decode" if info["phase"] == "decode" else "prefill", max(steps, 1) * rows / plan.gen_batch)
        now = clock.now()
        took, last[0] = now - last[0], now
        if info["phase"] == "prefill":
            prefill_s[0] += took
        elif steps:
            s, n = by_rows.get(rows, (0.0, 0))
            by_rows[rows] = (s + took, n + steps)
        # stop when the next call, as long as this one, would end past the deadline
        return deadline is not None and now + (took if info["phase"] == "decode" else 0.0) > deadline

    def generate(*args: Any, **kw: Any) -> list[dict[str, Any]]:
        gens.extend(generate_chat(*args, on_segment=on_segment, **kw))
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
    gen_s = clock.now() - t1
    cut = sum(1 for g in gens if g.get("cut"))
    if cut:
        _say(f"{name}: the deadline stopped decoding; {cut} of {len(gens)} answers are cut off (scored unfinished)")
    timing = {
        "load_s": round(load_s, 2),
        "prefill_s": round(prefill_s[0], 2),
        "generate_s": round(gen_s, 2),
        "decode_steps": sum(n for _, n in by_rows.values()),
        "row_steps": sum(r * n for r, (_, n) in by_rows.items()),
        "step_s_by_rows": {str(r): round(s / n, 4) for r, (s, n) in sorted(by_rows.items())},
        "cut": cut,
    }
    if cache is not None and not cut:
        _say(f"{name}: result cached in {cache.save(key, parts, res, timing)}")
        timing = {**timing, "cache_key": key}
    return res, timing, False
