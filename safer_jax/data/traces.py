"""Ex-Ante traces: the record, its rendering to assistant text, and the parser back.

Rendering (tags and headers configurable through `TraceFormat`):

    <think>
    ## Initial Assessment
    ...
    ## Rule Verification
    ... R07 (weapons and explosives): violated because ...
    ## Path Calibration
    Decision: refuse
    ...
    </think>
    final response

The text splits into four step segments (assessment, verification, calibration, response)
whose concatenation is the whole text: each is tokenized on its own (`data/tokenize.py`),
and preference spans are made of them.
`parse(render(t)) == t` for every valid trace.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from safer_jax.config import TraceFormat
from safer_jax.data.records import DataError, require
from safer_jax.data.rules import RuleBook

LABELS = ("harmful", "benign", "borderline")
DECISIONS = ("refuse", "safe_complete", "comply")
STEP_KEYS = ("initial_assessment", "rule_verification", "path_calibration")
ALLOWED_DECISIONS = {"harmful": ("refuse",), "benign": ("comply",), "borderline": ("comply", "safe_complete")}
# Harmful prompts under these rule categories may also be met with a supportive safe completion
# (no methods; acknowledgement, crisis resources, an invitation to talk): a bare refusal fails
# a person in crisis. `evaluation/selfharm.py` checks the shape of such a response.
SAFE_COMPLETE_CATEGORIES = ("self_harm",)
RULE_REF = re.compile(r"\bR\d{2,3}\b")


@dataclasses.dataclass(frozen=True)
class Trace:
    id: str
    prompt: str
    steps: dict[str, str]
    decision: str
    response: str
    label: str | None = None
    rules: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "label": self.label,
            "rules": list(self.rules),
            "steps": dict(self.steps),
            "decision": self.decision,
            "response": self.response,
        }


def segments(trace: Trace, fmt: TraceFormat = TraceFormat()) -> list[str]:
    """The four step texts; their concatenation is the rendered assistant turn."""
    h1, h2, h3 = fmt.headers
    s = trace.steps
    return [
        f"{fmt.open_tag}\n{h1}\n{s['initial_assessment'].strip()}\n",
        f"{h2}\n{s['rule_verification'].strip()}\n",
        f"{h3}\n{fmt.decision_prefix}{trace.decision}\n{s['path_calibration'].strip()}\n{fmt.close_tag}\n",
        trace.response.strip(),
    ]


def render(trace: Trace, fmt: TraceFormat = TraceFormat()) -> str:
    return "".join(segments(trace, fmt))


def split_think(text: str, fmt: TraceFormat = TraceFormat()) -> tuple[str | None, str | None]:
    """(reasoning, response) of assistant text: the one think-tag splitter (generation, scoring, parsing).

    No open tag: (None, whole text stripped). Open tag without a close tag: (the rest
    stripped, None): the reasoning never finished. Otherwise both parts, stripped.
    """
    start = text.find(fmt.open_tag)
    if start < 0:
        return None, text.strip()
    body = text[start + len(fmt.open_tag) :]
    end = body.find(fmt.close_tag)
    if end < 0:
        return body.strip(), None
    return body[:end].strip(), body[end + len(fmt.close_tag) :].strip()


@dataclasses.dataclass(frozen=True)
class Parsed:
    """What the parser recovered from assistant text, and what is malformed about it."""

    steps: dict[str, str]
    decision: str | None
    response: str | None
    cited_rules: tuple[str, ...]
    errors: tuple[str, ...]

    @property
    def valid(self) -> bool:
        return not self.errors


def parse(text: str, fmt: TraceFormat = TraceFormat()) -> Parsed:
    """Extract steps, decision, response and cited rule ids; list every malformation."""
    errors: list[str] = []
    steps: dict[str, str] = {}
    body, response = split_think(text, fmt)
    if body is None:
        errors.append(f"no opening {fmt.open_tag}")
        body, response = split_think(fmt.open_tag + text, fmt)  # still read the steps of the whole text
    if response is None:
        errors.append(f"no closing {fmt.close_tag} (the reasoning never finished)")
    elif not response:
        errors.append("empty final response")
    positions = [body.find(h) for h in fmt.headers]
    for h, pos in zip(fmt.headers, positions):
        if pos < 0:
            errors.append(f"missing step {h!r}")
    if all(p >= 0 for p in positions) and positions != sorted(positions):
        errors.append("steps out of order")
    found = sorted((p, i) for i, p in enumerate(positions) if p >= 0)
    for n, (pos, i) in enumerate(found):
        stop = found[n + 1][0] if n + 1 < len(found) else len(body)
        steps[STEP_KEYS[i]] = body[pos + len(fmt.headers[i]) : stop].strip()
    decision = None
    cal = steps.get("path_calibration")
    if cal is not None:
        first, _, rest = cal.partition("\n")
        if first.startswith(fmt.decision_prefix):
            decision = first[len(fmt.decision_prefix) :].strip().rstrip(".")
            steps["path_calibration"] = rest.strip()
            if decision not in DECISIONS:
                errors.append(f"unknown decision {decision!r}")
        else:
            errors.append(f"path calibration does not start with {fmt.decision_prefix.strip()!r}")
    for key in STEP_KEYS:
        if key in steps and not steps[key]:
            errors.append(f"empty step {key}")
    cited = tuple(dict.fromkeys(RULE_REF.findall(steps.get("rule_verification", ""))))
    if "rule_verification" in steps and not cited:
        errors.append("rule verification cites no rule id")
    return Parsed(steps, decision, response, cited, tuple(errors))


def trace_from_record(
    obj: dict[str, Any], file: Any = None, line: int | None = None, fmt: TraceFormat = TraceFormat()
) -> Trace:
    """A Trace from the trace schema or a chat `{"messages": [...]}` record."""
    if "messages" in obj:
        msgs = require(obj, "messages", list, file, line)
        user = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        asst = [m for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
        if not user or not asst:
            raise DataError("needs a user and an assistant message", file, line, "messages")
        p = parse(str(asst[-1].get("content", "")), fmt)
        if not p.valid:
            raise DataError("malformed trace: " + "; ".join(p.errors), file, line, "messages[-1].content")
        return Trace(
            str(obj.get("id", f"line{line}")),
            str(user[-1].get("content", "")),
            p.steps,
            p.decision,
            p.response,
            obj.get("label"),
            tuple(obj.get("rules", p.cited_rules)),
        )
    rid = require(obj, "id", (str, int), file, line)
    prompt = require(obj, "prompt", str, file, line)
    label = require(obj, "label", str, file, line)
    if label not in LABELS:
        raise DataError(f"must be one of {LABELS}, got {label!r}", file, line, "label")
    rules = require(obj, "rules", list, file, line)
    steps = require(obj, "steps", dict, file, line)
    for key in STEP_KEYS:
        v = steps.get(key)
        if not isinstance(v, str) or not v.strip():
            raise DataError("missing or empty step", file, line, f"steps.{key}")
    decision = require(obj, "decision", str, file, line)
    if decision not in DECISIONS:
        raise DataError(f"must be one of {DECISIONS}, got {decision!r}", file, line, "decision")
    response = require(obj, "response", str, file, line)
    if not response.strip():
        raise DataError("empty response", file, line, "response")
    return Trace(
        str(rid),
        prompt,
        {k: steps[k].strip() for k in STEP_KEYS},
        decision,
        response.strip(),
        label,
        tuple(str(r) for r in rules),
    )


def validate(trace: Trace, rules: RuleBook, fmt: TraceFormat = TraceFormat()) -> list[str]:
    """Reasons a trace is not fit for training ([] = valid)."""
    problems = list(parse(render(trace, fmt), fmt).errors)
    cited = RULE_REF.findall(trace.steps.get("rule_verification", ""))
    for rid in dict.fromkeys(list(trace.rules) + cited):
        if rid not in rules:
            problems.append(f"unknown rule id {rid}")
    if trace.label is not None:
        allowed = ALLOWED_DECISIONS[trace.label]
        if trace.label == "harmful" and any(
            r in rules and rules[r].kind == "prohibit" and rules[r].category in SAFE_COMPLETE_CATEGORIES for r in cited
        ):
            allowed = (*allowed, "safe_complete")
        if trace.decision not in allowed:
            problems.append(f"decision {trace.decision!r} inconsistent with label {trace.label!r} (allowed: {allowed})")
        if trace.label == "harmful" and not any(r in rules and rules[r].kind == "prohibit" for r in cited):
            problems.append("harmful prompt but no prohibit rule is cited")
    return problems
