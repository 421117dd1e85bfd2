"""Pairs at the first faulty step, with length control.

For a bad sample with first faulty step k, the shared prefix is the sample's own steps
1..k-1; M continuations of step k are drawn from it and judged; the chosen span is the
shortest correct one (length control), else the reference trace's step k. The rejected
span is the sample's faulty step k (a sample whose text ended inside step k-1, never writing
step k, is paired at step k-1: that segment is where it went wrong). Between two correct samples of one prompt whose
lengths differ by more than a margin, the shorter whole answer is chosen over the longer.
Each pair carries its statistics: step, reason, source of the chosen span, length gap and
every candidate's length and verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from safer_jax.config import TraceFormat
from safer_jax.data.pairs import StepPair
from safer_jax.rounds.sampler import Request
from safer_jax.rounds.steps import split_steps


def stop_strings(k: int, fmt: TraceFormat) -> tuple[str, ...]:
    """What ends step k in generated text: the next header, the close tag, or (k = 4) the end of turn."""
    return {1: (fmt.headers[1],), 2: (fmt.headers[2],), 3: (fmt.close_tag,)}.get(k, ())


def continuation_step(prefix: Sequence[str], text: str, k: int, fmt: TraceFormat, finish_reason: str) -> str | None:
    """Step k's segment of a continuation drawn after `prefix`, or None when the step never ended
    (no next header, no close tag, or a response cut at max_new_tokens)."""
    segs = split_steps("".join(prefix) + text, fmt)
    if len(segs) < k:
        return None
    seg = segs[k - 1]
    if k < 3 and len(segs) == k:
        return None  # the next header never came
    if k == 3:
        if fmt.close_tag not in seg:
            return None
        if not seg.endswith("\n"):
            seg += "\n"  # rendered traces put a newline after the close tag
    if k == 4 and finish_reason == "length":
        return None
    return seg


@dataclasses.dataclass
class FaultySample:
    """A bad sample at its first faulty step, with what pairing needs to fix it."""

    prompt_id: str
    prompt: str
    sample: int  # index among the prompt's K samples
    segments: list[str]
    k: int
    reason: str


def continuation_requests(bad: Sequence[FaultySample], m: int, fmt: TraceFormat) -> list[Request]:
    """M requests per bad sample: continue step k from its steps 1..k-1."""
    return [
        Request(f"{b.prompt_id}#{b.sample}@{j}", b.prompt, tuple(b.segments[: b.k - 1]), stop_strings(b.k, fmt))
        for b in bad
        for j in range(m)
    ]


def choose(
    b: FaultySample,
    candidates: Sequence[dict[str, Any]],
    reference_step: str | None,
    count: Callable[[str], int],
) -> tuple[StepPair | None, dict[str, Any]]:
    """The pair of one bad sample from its judged candidates ({"step": text or None, "ok": bool}),
    and its statistics; None when no candidate is correct and there is no reference step."""
    rejected = b.segments[b.k - 1]
    correct = [c for c in candidates if c["ok"] and c["step"] is not None and c["step"] != rejected]
    stats: dict[str, Any] = {
        "id": f"{b.prompt_id}#{b.sample}",
        "prompt_id": b.prompt_id,
        "step": b.k,
        "reason": b.reason,
        "candidates": [{"tokens": c.get("tokens"), "ok": c["ok"], "why": c.get("why", "")} for c in candidates],
        "rejected_tokens": count(rejected),
    }
    if correct:
        best = min(correct, key=lambda c: (c["tokens"], candidates.index(c)))  # length control: the shorter
        chosen, source = best["step"], "continuation"
    elif reference_step is not None and reference_step != rejected:
        chosen, source = reference_step, "reference"
    else:
        return None, {**stats, "source": "none"}
    stats.update(source=source, chosen_tokens=count(chosen))
    stats["length_gap"] = stats["rejected_tokens"] - stats["chosen_tokens"]
    pair = StepPair(
        stats["id"], b.prompt, tuple(b.segments[: b.k - 1]), b.k, chosen, rejected, b.k == 4, b.k == 4, b.reason
    )
    return pair, stats


def length_pair(
    prompt_id: str, prompt: str, correct: Sequence[tuple[int, str]], margin: int, count: Callable[[str], int]
) -> tuple[StepPair | None, dict[str, Any] | None]:
    """Shortest against longest of a prompt's correct samples ((index, text)), when their token
    counts differ by more than `margin`: the whole answer is the span (step 1 onward)."""
    if len(correct) < 2:
        return None, None
    sized = sorted(((count(t), i, t) for i, t in correct))
    (n_short, i_short, short), (n_long, i_long, long) = sized[0], sized[-1]
    if n_long - n_short <= margin:
        return None, None
    pid = f"{prompt_id}#{i_short}>{i_long}"
    stats = {
        "id": pid,
        "prompt_id": prompt_id,
        "step": 1,
        "reason": "length",
        "source": "sample",
        "chosen_tokens": n_short,
        "rejected_tokens": n_long,
        "length_gap": n_long - n_short,
        "candidates": [],
    }
    return StepPair(pid, prompt, (), 1, short, long, True, True, "length"), stats
