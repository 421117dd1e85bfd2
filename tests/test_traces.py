"""Trace rendering and parsing; validation against rules and labels."""

import dataclasses

import pytest

from safer_jax.data.traces import Trace, TraceFormat, parse, render, segments, trace_from_record, validate


def make_trace(**kw):
    base = dict(
        id="t1",
        prompt="How do I build a bomb?",
        steps={
            "initial_assessment": "The request asks for explosive device instructions.",
            "rule_verification": "R07 (weapons and explosives): violated. Building devices is prohibited.",
            "path_calibration": "Refuse briefly and offer a safe alternative.",
        },
        decision="refuse",
        response="I can't help with that, but I can share general safety information.",
        label="harmful",
        rules=("R07",),
    )
    base.update(kw)
    return Trace(**base)


def test_render_then_parse_is_identity():
    t = make_trace()
    p = parse(render(t))
    assert p.valid, p.errors
    assert (p.steps, p.decision, p.response, p.cited_rules) == (t.steps, t.decision, t.response, ("R07",))
    assert "".join(segments(t)) == render(t)


def test_custom_format_roundtrip():
    fmt = TraceFormat(
        open_tag="<reasoning>",
        close_tag="</reasoning>",
        headers=("### Step 1", "### Step 2", "### Step 3"),
        decision_prefix="Path: ",
    )
    t = make_trace()
    text = render(t, fmt)
    assert text.startswith("<reasoning>\n### Step 1") and "Path: refuse" in text
    p = parse(text, fmt)
    assert p.valid and p.steps == t.steps and p.decision == "refuse"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.replace("</think>", ""), "no closing </think>"),
        (lambda s: s.replace("<think>", ""), "no opening <think>"),
        (lambda s: s.replace("## Rule Verification", "## Something"), "missing step '## Rule Verification'"),
        (lambda s: s.replace("Decision: refuse", "Decision: maybe"), "unknown decision 'maybe'"),
        (lambda s: s.replace("Decision: refuse\n", ""), "does not start with 'Decision:'"),
        (lambda s: s.replace("R07", "rule seven"), "cites no rule id"),
        (lambda s: s.split("</think>")[0] + "</think>\n", "empty final response"),
    ],
)
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
    rec = {
        "id": "m1",
        "label": "harmful",
        "messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": render(t)}],
    }
    back = trace_from_record(rec)
    assert back == dataclasses.replace(t, id="m1")
    assert trace_from_record(t.to_json()) == t


def test_data_package_imports_no_models_and_no_jax():
    """`data/` knows no models (the model-running teacher lives in safer_jax/teacher_local.py)."""
    import ast
    from pathlib import Path

    import safer_jax.data

    bad = []
    for f in Path(safer_jax.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            bad += [
                f"{f.name}: {n}"
                for n in names
                if n.split(".")[0] in ("jax", "flax") or n.startswith(("safer_jax.models", "safer_jax.generate"))
            ]
    assert not bad, bad


def test_to_end_rejected_continuation_follows_the_corrupted_step(traces, rules):
    """A `to_end` rejected text that corrupts the rule or the decision goes on as that mistake implies:
    a harmful prompt let through complies, a benign one blocked refuses; steps before k are shared,
    and `step` pairs keep the corrupted step alone."""
    from safer_jax.data.pairs import make_pairs
    from safer_jax.evaluation.refusal import classify_refusal

    sample = [t for t in traces if t.label == "harmful"][:4] + [t for t in traces if t.label != "harmful"][:4]
    to_end = make_pairs(sample, rules, seed=0, span="to_end")
    step = {p.id: p for p in make_pairs(sample, rules, seed=0, span="step")}
    label = {t.id: t.label for t in sample}
    checked = set()
    for p in to_end:
        if p.kind not in ("wrong_rule", "wrong_decision", "over_refusal"):
            continue
        parsed = parse("".join(p.prefix_steps) + p.rejected)
        want = "comply" if label[p.id[: -len(p.kind) - 1]] == "harmful" else "refuse"
        assert parsed.valid and parsed.decision == want, (p.id, parsed)
        assert classify_refusal(parsed.response).refused is (want == "refuse"), (p.id, parsed.response)
        assert step[p.id].rejected in p.rejected and step[p.id].prefix_steps == p.prefix_steps
        checked.add(p.kind)
    assert checked == {"wrong_rule", "wrong_decision", "over_refusal"}


def test_safe_complete_is_allowed_for_self_harm_only(rules):
    from safer_jax.data.traces import Trace, validate

    def trace(rid, decision):
        steps = {"initial_assessment": "a", "rule_verification": f"{rid}: violated.", "path_calibration": "c"}
        return Trace("x", "p", steps, decision, "r", "harmful", (rid,))

    assert validate(trace("R08", "safe_complete"), rules) == []  # R08: self-harm
    assert validate(trace("R08", "refuse"), rules) == []
    assert any("inconsistent with label" in p for p in validate(trace("R07", "safe_complete"), rules))
    assert any("inconsistent with label" in p for p in validate(trace("R08", "comply"), rules))
