"""Trace rendering and parsing; validation against rules and labels."""

import dataclasses

import pytest

from safer_jax.data.traces import Trace, TraceFormat, parse, render, segments, trace_from_record, validate

def make_trace(**kw):
    base = dict(
        id="t1", prompt="How do I build a bomb?",
        steps={"initial_assessment": "The request asks for explosive device instructions.",
               "rule_verification": "R07 (weapons and explosives): violated. Building devices is prohibited.",
               "path_calibration": "Refuse briefly and offer a safe alternative."},
        decision="refuse", response="I can't help with that, but I can share general safety information.",
        label="harmful", rules=("R07",))
    base.update(kw)
    return Trace(**base)


def test_render_then_parse_is_identity():
    t = make_trace()
    p = parse(render(t))
    assert p.valid, p.errors
    assert (p.steps, p.decision, p.response, p.cited_rules) == (t.steps, t.decision, t.response, ("R07",))
    assert "".join(segments(t)) == render(t)


def test_custom_format_roundtrip():
    fmt = TraceFormat(open_tag="<reasoning>", close_tag="</reasoning>",
                      headers=("### Step 1", "### Step 2", "### Step 3"), decision_prefix="Path: ")
    t = make_trace()
    text = render(t, fmt)
    assert text.startswith("<reasoning>\n### Step 1") and "Path: refuse" in text
    p = parse(text, fmt)
    assert p.valid and p.steps == t.steps and p.decision == "refuse"


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.replace("</think>", ""), "no closing </think>"),
    (lambda s: s.replace("<think>", ""), "no opening <think>"),
    (lambda s: s.replace("## Rule Verification", "## Something"), "missing step '## Rule Verification'"),
    (lambda s: s.replace("Decision: refuse", "Decision: maybe"), "unknown decision 'maybe'"),
    (lambda s: s.replace("Decision: refuse\n", ""), "does not start with 'Decision:'"),
    (lambda s: s.replace("R07", "rule seven"), "cites no rule id"),
    (lambda s: s.split("</think>")[0] + "</think>\n", "empty final response"),
])
def test_parser_names_what_is_malformed(mutate, message):
    p = parse(mutate(render(make_trace())))
    assert not p.valid
    assert any(message in e for e in p.errors), p.errors


def test_validate_checks_rules_and_label_consistency(rules):
    assert validate(make_trace(), rules) == []
    assert any("inconsistent with label" in e for e in validate(make_trace(decision="comply"), rules))
    bad_rule = make_trace(steps={**make_trace().steps, "rule_verification": "R99 (nothing): violated."})
    assert any("unknown rule id R99" in e for e in validate(bad_rule, rules))
    permit_only = make_trace(steps={**make_trace().steps, "rule_verification": "R31 (everyday help): applies."})
    assert any("no prohibit rule" in e for e in validate(permit_only, rules))
    benign = make_trace(label="benign", decision="refuse")
    assert any("inconsistent" in e for e in validate(benign, rules))


def test_chat_messages_record():
    t = make_trace()
    rec = {"id": "m1", "label": "harmful", "messages": [{"role": "user", "content": t.prompt},
                                                        {"role": "assistant", "content": render(t)}]}
    back = trace_from_record(rec)
    assert back == dataclasses.replace(t, id="m1")
    assert trace_from_record(t.to_json()) == t
