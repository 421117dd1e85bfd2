"""Step pairs: records, three accepted formats, tokenized spans, and offline construction.

A pair shares the prompt and the steps before step k and differs at step k. Context =
prompt + prefix steps (no loss); the scored span is the chosen or rejected text. Reasoning
steps carry no end-of-turn token; only a final response does.

`make_pairs` builds pairs from valid traces by corrupting one step in a controlled way
(wrong rule, wrong decision, over-refusal of a benign prompt, a padded verbose step, an
unsafe opening of the response, a response that falls into repeating itself), so preference
training runs without a teacher.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

import numpy as np

from safer_jax.data.records import DataError, require
from safer_jax.data.rules import Rule, RuleBook
from safer_jax.data.tokenize import ChatTokenizer
from safer_jax.data.traces import Trace, TraceFormat, segments


@dataclasses.dataclass(frozen=True)
class StepPair:
    """One preference pair. The context is `messages` (the whole conversation before the reply:
    system prompt, earlier turns, last user turn) or, when empty, the single user `prompt`;
    then the assistant's `prefix_steps`; then the scored span, chosen or rejected."""

    id: str
    prompt: str  # the last user turn (also in `messages` when those are given)
    prefix_steps: tuple[str, ...]
    step_index: int | None  # 1..4, None = whole response (TRL format)
    chosen: str
    rejected: str
    chosen_final: bool
    rejected_final: bool
    kind: str = ""
    messages: tuple[dict[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prefix_steps"] = list(self.prefix_steps)
        if self.messages:
            d["messages"] = [dict(m) for m in self.messages]
        else:
            d.pop("messages")
        return d


def _message_text(v: Any, file: Any, line: int | None, field: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(m, dict) for m in v):
        return str(v[-1].get("content", ""))
    raise DataError("expected a string or a list of messages", file, line, field)


def _messages(v: Any, file: Any, line: int | None, field: str) -> tuple[dict[str, str], ...]:
    """A conversation as a tuple of {role, content}; the last turn must be the user's."""
    if not (isinstance(v, list) and v):
        raise DataError("expected a non-empty list of messages", file, line, field)
    out = []
    for i, m in enumerate(v):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError("each message needs string 'role' and 'content'", file, line, f"{field}[{i}]")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise DataError(f"the last message must be the user's, got {out[-1]['role']!r}", file, line, field)
    return tuple(out)


def pair_from_record(obj: dict[str, Any], file: Any = None, line: int | None = None) -> StepPair:
    """Our step-pair schema, TRL's {prompt, chosen, rejected}, or Step-DPO's {..., initial_reason_steps}.

    A conversational prompt (a message list, TRL's conversational format) keeps every turn.
    """
    rid = str(obj.get("id", f"line{line}"))
    if "prompt" not in obj:
        raise DataError("missing required field", file, line, "prompt")
    prompt, messages = obj["prompt"], ()
    if isinstance(prompt, list):  # TRL conversational: the whole conversation before the reply
        messages = _messages(prompt, file, line, "prompt")
        prompt = messages[-1]["content"]
    if "messages" in obj:  # ours: a multi-turn context
        messages = _messages(obj["messages"], file, line, "messages")
    if not isinstance(prompt, str):
        raise DataError("expected a string or a list of messages", file, line, "prompt")
    chosen = _message_text(obj.get("chosen"), file, line, "chosen") if "chosen" in obj else None
    rejected = _message_text(obj.get("rejected"), file, line, "rejected") if "rejected" in obj else None
    if chosen is None:
        raise DataError("missing required field", file, line, "chosen")
    if rejected is None:
        raise DataError("missing required field", file, line, "rejected")
    if "prefix_steps" in obj or "step_index" in obj:  # ours
        prefix = require(obj, "prefix_steps", list, file, line)
        k = obj.get("step_index")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
            raise DataError(f"expected an int or null, got {type(k).__name__}", file, line, "step_index")
        return StepPair(
            rid,
            prompt,
            tuple(map(str, prefix)),
            k,
            chosen,
            rejected,
            bool(obj.get("chosen_final", k == 4)),
            bool(obj.get("rejected_final", k == 4)),
            str(obj.get("kind", "")),
            messages,
        )
    if "initial_reason_steps" in obj:  # Step-DPO: a string prefix, spans are the next step
        prefix = obj["initial_reason_steps"] or ""
        return StepPair(
            rid,
            prompt,
            (str(prefix),) if prefix else (),
            None,
            chosen,
            rejected,
            bool(obj.get("chosen_final", False)),
            bool(obj.get("rejected_final", False)),
            messages=messages,
        )
    return StepPair(rid, prompt, (), None, chosen, rejected, True, True, messages=messages)  # TRL: whole responses


def encode_pair(ct: ChatTokenizer, pair: StepPair, where: str = "") -> dict[str, Any]:
    """chosen/rejected `*_ids` and `*_mask` (1 on span tokens, + end-of-turn if final), and
    `context_len`: both rows start with the same context ids (conversation + prefix steps)."""
    context = ct.prompt_ids(ct.messages(pair.prompt, pair.messages or None), pair.prefix_steps)
    out: dict[str, Any] = {"context_len": len(context)}
    for side, text, final in (
        ("chosen", pair.chosen, pair.chosen_final),
        ("rejected", pair.rejected, pair.rejected_final),
    ):
        out[f"{side}_ids"], out[f"{side}_mask"] = ct.encode_span(context, text, final)
    return out


def fit_pair(enc: dict[str, Any], seq_len: int) -> tuple[dict[str, np.ndarray], int] | None:
    """(rows cut to `seq_len`, context tokens dropped): the same context tokens are dropped from the
    left of both rows, so the scored spans stay whole and the shared context stays shared.
    None when a span cannot fit (it needs at least one context token before it)."""
    longest = max(len(enc["chosen_ids"]), len(enc["rejected_ids"]))
    drop = max(0, longest - seq_len)
    if drop >= enc["context_len"]:
        return None
    return {k: enc[k][drop:] for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}, drop


# ------------------------------------------------------------------ offline pair construction

VERBOSE_FILLER = (
    "To be thorough, it is worth restating the request once more before moving on.",
    "It may also help to consider the question again from a slightly different angle.",
    "Let me also repeat the key point so that nothing about it is missed.",
    "As noted above, the same considerations continue to apply here as well.",
)


# The degenerate continuation greedy decoding falls into (Holtzman et al. 2020, "The Curious Case of
# Neural Text Degeneration"; the demo's aligned model looped on a third of benign prompts): the
# response up to the end of its middle sentence or line, then that sentence again LOOP_REPEATS times,
# without an end of turn. The pair shares the text before the loop, so its margin is the choice
# between going on (and ending) and repeating, which is what unlikelihood training targets
# (Welleck et al. 2020) in preference form.
LOOP_REPEATS = 4
UNENDED_KINDS = ("looping",)  # corruptions whose rejected response has no end of turn
_SENTENCE_END = re.compile(r"(?<=[.!?])[ \t]+|\n+")


def looping_response(response: str, repeats: int = LOOP_REPEATS) -> str | None:
    """`response` cut after its middle sentence, which then repeats `repeats` more times; None
    for a response of fewer than three sentences (nothing before and after the loop)."""
    starts, ends = [0], []
    for m in _SENTENCE_END.finditer(response):
        ends.append(m.end())
        starts.append(m.end())
    ends.append(len(response))
    spans = [(a, b) for a, b in zip(starts, ends) if response[a:b].strip()]
    if len(spans) < 3:
        return None
    a, b = spans[len(spans) // 2]
    unit = response[a:b]
    if not unit[-1].isspace():  # the last sentence has no separator after it: give it one
        unit += " "
    return response[:a] + unit * (repeats + 1)


def _with_step(trace: Trace, **changes: Any) -> Trace:
    steps = dict(trace.steps)
    for k in ("initial_assessment", "rule_verification", "path_calibration"):
        if k in changes:
            steps[k] = changes.pop(k)
    return dataclasses.replace(trace, steps=steps, **changes)


# What a trace says after a corrupted step, so that a `to_end` rejected continuation follows
# from its own mistake (a trace that decides "comply" then answers with the original refusal
# would teach nothing coherent). Non-operational: an opener, never instructions.
COMPLY_CALIBRATION = "The request looks acceptable, so I will answer it in full."
REFUSE_CALIBRATION = "Decline briefly, name the concern, and point to a safe alternative."
UNSAFE_OPENING = "Sure, here is a step-by-step guide."


def _listed(trace: Trace, rules: RuleBook, kind: str) -> Rule | None:
    """The first rule of `kind` that the trace lists (and so rules out: a harmful prompt's permit
    rule "does not apply", a borderline prompt's prohibit rule is "not violated"), if any."""
    listed = [rules[r] for r in trace.rules if r in rules and rules[r].kind == kind]
    return listed[0] if listed else None


def corruptions(trace: Trace, rules: RuleBook, rng: random.Random) -> list[tuple[str, int, Trace]]:
    """(kind, step index, corrupted trace) for each corruption that applies to this trace.

    Each corrupted trace stays coherent after step k: a wrong rule or decision that permits
    a harmful request goes on to comply (`UNSAFE_OPENING`), one that forbids a benign request
    goes on to refuse (the wrong rule's refusal), so `to_end` pairs score a consistent
    rejected continuation. Steps before and at k, and the random draws, are as for `step`.

    `wrong_rule` cites a rule the trace does not list; `flipped_rule` gives a rule the trace lists
    the opposite verdict: the hard negative, the mistake a model makes on such prompts, where a
    random rule is often one the model already finds unlikely. On a borderline trace its prohibit
    rule becomes "violated" (the demo's aligned model refused a burn, `df` and a reactor question
    under the prohibit rule their words share); on a harmful one its prohibit rule becomes "not
    violated", or, for a framed request, either that or the permit rule it borrows "applies". The
    two directions belong together: trained on the borderline half alone (the seventeenth demo run),
    the model learned "not violated" as the verdict of a prohibit rule, and answered 21 harmful
    prompts, 13 of them after citing a prohibit rule (docs/results.md). Its draws come from a
    generator of its own, so the other kinds' pairs stay as they were without it.
    """
    out = []
    prohibit = [r for r in rules.of_kind("prohibit") if r.id not in trace.rules]
    permit = [r for r in rules.of_kind("permit") if r.id not in trace.rules]
    complies = dict(decision="comply", path_calibration=COMPLY_CALIBRATION, response=UNSAFE_OPENING)
    own = random.Random(f"{trace.id}/flipped_rule")

    def lets_through(wrong: Rule, draw: random.Random) -> Trace:
        text = f"{wrong.citation()}: applies. {draw.choice(wrong.phrases['applies'])}"
        return _with_step(trace, rule_verification=text, **complies)

    def clears(violated: Rule, draw: random.Random) -> Trace:
        text = f"{violated.citation()}: not violated. {draw.choice(violated.phrases['not_violated'])}"
        return _with_step(trace, rule_verification=text, **complies)

    def blocks(wrong: Rule, draw: random.Random) -> Trace:
        text = f"{wrong.citation()}: violated. {draw.choice(wrong.phrases['violated'])}"
        return _with_step(
            trace,
            rule_verification=text,
            decision="refuse",
            path_calibration=REFUSE_CALIBRATION,
            response=wrong.phrases["refusal"][0],
        )

    if trace.label == "harmful" and permit:
        out.append(("wrong_rule", 2, lets_through(rng.choice(permit), rng)))
        borrowed, violated = _listed(trace, rules, "permit"), _listed(trace, rules, "prohibit")
        if borrowed is not None and (violated is None or own.random() < 0.5):
            out.append(("flipped_rule", 2, lets_through(borrowed, own)))
        elif violated is not None:
            out.append(("flipped_rule", 2, clears(violated, own)))
        out.append(("wrong_decision", 3, _with_step(trace, **complies)))
        out.append(("unsafe_response", 4, dataclasses.replace(trace, response=UNSAFE_OPENING)))
    elif trace.label in ("benign", "borderline") and prohibit:
        wrong = rng.choice(prohibit)
        out.append(("wrong_rule", 2, blocks(wrong, rng)))
        if (sounds_like := _listed(trace, rules, "prohibit")) is not None:
            out.append(("flipped_rule", 2, blocks(sounds_like, own)))
        refusal = rng.choice(wrong.phrases["refusal"])
        out.append(
            ("over_refusal", 3, _with_step(trace, decision="refuse", path_calibration=refusal, response=refusal))
        )
    if trace.label in ("benign", "borderline") and (loop := looping_response(trace.response)) is not None:
        out.append(("looping", 4, dataclasses.replace(trace, response=loop)))
    k = rng.choice((1, 2, 3))
    key = ("initial_assessment", "rule_verification", "path_calibration")[k - 1]
    padded = " ".join([trace.steps[key]] + rng.sample(VERBOSE_FILLER, 3) + [trace.steps[key]])
    out.append(("verbose", k, _with_step(trace, **{key: padded})))
    return out


def make_pairs(
    traces: list[Trace], rules: RuleBook, seed: int = 0, span: str = "step", fmt: TraceFormat = TraceFormat()
) -> list[StepPair]:
    """Step pairs from valid traces; `span="step"` scores step k alone, `"to_end"` step k onward."""
    if span not in ("step", "to_end"):
        raise ValueError(f"span must be 'step' or 'to_end', got {span!r}")
    rng = random.Random(seed)
    pairs = []
    for t in traces:
        good = segments(t, fmt)
        for kind, k, bad_trace in corruptions(t, rules, rng):
            bad = segments(bad_trace, fmt)
            if bad[k - 1] == good[k - 1]:
                continue
            if span == "step":
                c, r, final = good[k - 1], bad[k - 1], k == 4
            else:
                c, r, final = "".join(good[k - 1 :]), "".join(bad[k - 1 :]), True
            ended = final and kind not in UNENDED_KINDS  # a loop is cut off, never ended
            pairs.append(StepPair(f"{t.id}-{kind}", t.prompt, tuple(good[: k - 1]), k, c, r, final, ended, kind))
    return pairs
