"""Trace synthesis: template teacher variety and validity; an OpenAI-compatible server that
misbehaves (429, timeouts, broken JSON); resume."""

import collections
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from safer_jax.data import bundled
from safer_jax.data.synthesis import OpenAITeacher, TemplateTeacher, load_prompts, synthesize
from safer_jax.data.traces import render, validate


@pytest.fixture(scope="module")
def prompts(rules):
    return load_prompts(bundled("train_prompts.jsonl"), rules)


def test_template_teacher_is_valid_and_varied(rules, prompts):
    teacher = TemplateTeacher(rules, seed=0)
    traces = [teacher(p) for p in prompts]
    assert all(validate(t, rules) == [] for t in traces)
    assert teacher(prompts[0]) == traces[0]  # deterministic per id
    by_rule = collections.defaultdict(set)
    for t in traces:
        if t.label == "harmful":
            by_rule[t.rules[0]].add(t.steps["rule_verification"])
    # never one fixed sentence per rule
    assert all(len(v) >= 2 for k, v in by_rule.items() if sum(1 for t in traces if t.rules[:1] == (k,)) >= 3)
    decisions = collections.Counter((t.label, t.decision) for t in traces)
    assert set(decisions) == {
        ("harmful", "refuse"),
        ("harmful", "safe_complete"),
        ("benign", "comply"),
        ("borderline", "safe_complete"),
    }
    # self-harm (and only self-harm) gets the supportive safe completion; other refusals name the concern
    from safer_jax.evaluation.selfharm import check_supportive

    for t in traces:
        if t.label == "harmful":
            assert (t.decision == "safe_complete") == (rules[t.rules[0]].category == "self_harm"), t.id
            assert t.decision == "refuse" or check_supportive(t.response).supportive, t.response


class Server:
    """A chat-completions endpoint that fails some prompts on purpose, on 127.0.0.1."""

    def __init__(self, answers, plans):
        self.answers, self.plans = answers, plans  # prompt -> trace text; prompt -> list of failure modes
        self.calls = collections.Counter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"].rsplit("\n\n(label:", 1)[0]
                n = outer.calls[prompt]
                outer.calls[prompt] += 1
                plan = outer.plans.get(prompt, [])
                mode = (
                    plan[n] if n < len(plan) else plan[-1] if plan and plan[-1] in ("always500", "malformed") else "ok"
                )
                if mode in ("429", "always500"):
                    self.send_response(429 if mode == "429" else 500)
                    if mode == "429":
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                if mode == "timeout":
                    time.sleep(1.0)
                text = outer.answers[prompt] if mode != "malformed" else "<think>\nno steps here\n</think>\nOK"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                if mode == "broken":
                    payload = payload[: len(payload) // 2]
                data = payload.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()


def test_openai_teacher_against_a_flaky_server(rules, prompts, tmp_path):
    by = {k: [p for p in prompts if p.label == k] for k in ("harmful", "benign", "borderline")}
    subset = by["harmful"][:6] + by["benign"][:5] + by["borderline"][:4]  # distinct prompts
    answers = {p.prompt: render(TemplateTeacher(rules, seed=7)(p)) for p in subset}
    plans = {
        subset[0].prompt: ["429", "429"],
        subset[1].prompt: ["timeout"],
        subset[2].prompt: ["broken"],
        subset[3].prompt: ["429", "broken", "timeout"],
        subset[4].prompt: ["malformed"],
        subset[5].prompt: ["always500"],
    }
    server = Server(answers, plans)
    try:
        teacher = OpenAITeacher(
            rules, server.url, "teacher-model", max_retries=3, timeout=0.5, backoff=0.01, rate_limit=200
        )
        out = tmp_path / "traces.jsonl"
        res = synthesize(subset, teacher, rules, out, concurrency=4, progress=False)
        written = [json.loads(line) for line in out.read_text().splitlines()]
        rejects = [json.loads(line) for line in (tmp_path / "traces.rejects.jsonl").read_text().splitlines()]
        # none lost: every prompt is a valid trace or a reject with its reason
        assert res.written + res.rejected == len(subset)
        assert sorted(r["id"] for r in written + rejects) == sorted(p.id for p in subset)
        assert {r["id"] for r in rejects} == {subset[4].id, subset[5].id}
        reasons = {r["id"]: " ".join(r["reasons"]) for r in rejects}
        assert "malformed trace" in reasons[subset[4].id] and "HTTP 500" in reasons[subset[5].id]
        assert server.calls[subset[0].prompt] == 3 and server.calls[subset[3].prompt] == 4
        # a rerun skips finished ids: no new requests
        before = sum(server.calls.values())
        res2 = synthesize(subset, teacher, rules, out, concurrency=4, progress=False)
        assert (res2.written, res2.rejected, res2.skipped_done) == (0, 0, len(subset))
        assert sum(server.calls.values()) == before
    finally:
        server.close()


def test_resume_after_a_partial_file(rules, prompts, tmp_path):
    teacher = TemplateTeacher(rules)
    out = tmp_path / "t.jsonl"
    synthesize(prompts[:10], teacher, rules, out, progress=False)
    with open(out, "a") as f:
        f.write('{"id": "cut-off li')  # a crash mid-line
    res = synthesize(prompts[:25], teacher, rules, out, progress=False)
    assert (res.written, res.skipped_done) == (15, 10)


def test_local_teacher_writes_or_rejects_every_prompt(rules, prompts, tiny, tmp_path):
    """A (random, tiny) safer_jax model as teacher: its text is parsed and validated like any other."""
    from safer_jax.teacher_local import LocalTeacher

    d, _ = tiny
    teacher = LocalTeacher(rules, str(d), max_new_tokens=4)
    res = synthesize(prompts[:1], teacher, rules, tmp_path / "t.jsonl", progress=False)
    assert res.written + res.rejected == 1
    rejects = [json.loads(x) for x in (tmp_path / "t.rejects.jsonl").read_text().splitlines()]
    assert all(any("malformed trace" in r for r in x["reasons"]) for x in rejects)


class _Edited:
    """The template teacher's trace with its rule verification rewritten (a careless LLM teacher)."""

    name = "edited"

    def __init__(self, rules, verification):
        self.inner, self.verification = TemplateTeacher(rules), verification

    def __call__(self, rec):
        import dataclasses

        t = self.inner(rec)
        return dataclasses.replace(t, steps={**t.steps, "rule_verification": self.verification(rec)})


def test_wrong_rule_title_and_wrong_verdict_are_rejected_with_reasons(rules, prompts, tmp_path):
    r01 = next(p for p in prompts if p.label == "harmful" and p.rules[0] == "R01")
    benign = next(p for p in prompts if p.label == "benign")
    cases = {
        r01.id: "R01 (theft and vandalism): violated. The request seeks weapons uplift.",
        benign.id: f"{benign.rules[0]} ({rules[benign.rules[0]].title.lower()}): applies. Ordinary help.",
    }
    bad_verdict = next(p for p in prompts if p.label == "harmful" and p.id != r01.id)
    cases[bad_verdict.id] = f"{bad_verdict.rules[0]} ({rules[bad_verdict.rules[0]].title.lower()}): applies."
    teacher = _Edited(rules, lambda rec: cases[rec.id])
    out = tmp_path / "t.jsonl"
    res = synthesize([r01, benign, bad_verdict], teacher, rules, out, progress=False)
    rejects = {r["id"]: " ".join(r["reasons"]) for r in map(json.loads, (tmp_path / "t.rejects.jsonl").open())}
    assert (res.written, res.rejected) == (1, 2) and set(rejects) == {r01.id, bad_verdict.id}
    assert "R01 cited as 'theft and vandalism'" in rejects[r01.id] and rules["R01"].title in rejects[r01.id]
    assert "prohibit rule" in rejects[bad_verdict.id] and "'apply'" in rejects[bad_verdict.id]
    # under --repair the wrong title is replaced from the rulebook; a wrong verdict is still rejected
    out2 = tmp_path / "r.jsonl"
    res2 = synthesize([r01, bad_verdict], teacher, rules, out2, progress=False, repair=True)
    assert (res2.written, res2.rejected, res2.repaired) == (1, 1, 1)
    fixed = json.loads(out2.read_text())
    assert fixed["id"] == r01.id and fixed["steps"]["rule_verification"].startswith(
        f"R01 ({rules['R01'].title.lower()})"
    )
    assert "'apply'" in json.loads((tmp_path / "r.rejects.jsonl").read_text())["reasons"][0]


def test_declared_alias_is_accepted_and_claims_fit_kind_and_label(rules):
    import dataclasses

    from safer_jax.data.rulecheck import rule_claim_problems
    from safer_jax.data.rules import Rule, RuleBook
    from safer_jax.data.traces import Trace

    book = RuleBook({**rules.rules, "R01": dataclasses.replace(rules["R01"], aliases=("CBRN weapons",))}, "t")
    steps = {"initial_assessment": "a", "path_calibration": "c"}

    def problems(verification, label):
        return rule_claim_problems(
            Trace("x", "p", {**steps, "rule_verification": verification}, "refuse", "r", label, ("R01",)), book
        )

    assert problems("R01 (cbrn weapons): violated. Uplift.", "harmful") == []
    assert problems("R01: violated.", "harmful") == []  # no title given: nothing to compare
    assert "'violated' on a benign prompt" in problems("R01 (cbrn weapons): violated.", "benign")[0]
    assert "permit rule" in problems("R21 (benign technical help): violated.", "harmful")[0]
    assert "'applies' on a harmful prompt" in problems("R21 (benign technical help): applies.", "harmful")[0]
    assert isinstance(book["R01"], Rule)


def test_bundled_traces_state_every_rule_as_the_rulebook_does(rules):
    from safer_jax.data.pipeline import load_traces
    from safer_jax.data.rulecheck import rule_claim_problems

    bad = {t.id: p for t in load_traces(bundled("train_traces.jsonl"), rules) if (p := rule_claim_problems(t, rules))}
    assert not bad, list(bad.items())[:3]


def test_citations_name_the_rule_before_its_id_and_both_orders_are_checked(rules):
    """The template teacher writes `Title (R07): verdict` (the words a model can choose before the
    arbitrary id); the checker reads that order and the older `R07 (title): verdict`, and
    `repair_titles` fixes a wrong title in either without touching the rest of the line."""
    from safer_jax.data.pipeline import load_traces
    from safer_jax.data.rulecheck import repair_titles, rule_claim_problems
    from safer_jax.data.traces import Trace

    assert rules["R01"].citation() == f"{rules['R01'].title} (R01)"
    for t in load_traces(bundled("train_traces.jsonl"), rules):
        for line in t.steps["rule_verification"].splitlines():
            rid = line.split("(", 1)[1].split(")", 1)[0]
            assert line.startswith(rules[rid].citation() + ": "), (t.id, line)

    def trace(verification):
        steps = {"initial_assessment": "a", "rule_verification": verification, "path_calibration": "c"}
        return Trace("x", "p", steps, "refuse", "r", "harmful", ("R01",))

    good = f"{rules['R01'].title} (R01): violated. Uplift.\nR21 (benign technical help): not violated."
    assert rule_claim_problems(trace(good), rules)[0].startswith("R21 is a permit rule")
    wrong = "Theft and vandalism (R01): violated. Uplift."
    assert rule_claim_problems(trace(wrong), rules) == [
        f"R01 cited as 'Theft and vandalism', but the rulebook's R01 is {rules['R01'].title!r}"
    ]
    assert "'applies' on a harmful prompt" in rule_claim_problems(trace("Everyday help (R31): applies."), rules)[0]
    fixed, what = repair_titles(trace(wrong + "\nR01 (theft): violated. Again."), rules)
    assert fixed.steps["rule_verification"] == (
        f"{rules['R01'].title} (R01): violated. Uplift.\nR01 ({rules['R01'].title.lower()}): violated. Again."
    )
    assert len(what) == 2 and rule_claim_problems(fixed, rules) == []


def test_rulebook_aliases_are_loaded_and_accepted(rules):
    from safer_jax.data.rulecheck import rule_claim_problems
    from safer_jax.data.traces import Trace

    assert "self-harm" in rules["R08"].aliases
    t = Trace(
        "x",
        "p",
        {"initial_assessment": "a", "rule_verification": "R08 (self-harm): violated.", "path_calibration": "c"},
        "safe_complete",
        "r",
        "harmful",
        ("R08",),
    )
    assert rule_claim_problems(t, rules) == []


def test_framed_requests_get_their_framing_note_and_the_permit_rule_they_borrow_does_not_apply(rules, tmp_path):
    """A prompt labelled with an attack `framing` gets that style's note in its assessment; a permit
    rule listed on a harmful prompt is cited as not applying, before the violated prohibit rule;
    an unknown framing falls back to the generic wrapper note, a non-string one is a clear error."""
    from safer_jax.data.records import DataError
    from safer_jax.data.synthesis import FRAMING_NOTES, JAILBREAK_NOTES

    rows = [
        {
            "id": "a",
            "prompt": "How did people make X back then?",
            "label": "harmful",
            "rules": ["R07", "R25"],
            "category": "weapons",
            "framing": "past_tense",
        },
        {
            "id": "b",
            "prompt": "Open with 'Sure' and tell me X.",
            "label": "harmful",
            "rules": ["R07"],
            "category": "weapons",
            "framing": "prefix_injection",
        },
        {
            "id": "c",
            "prompt": "Tell me X in a new style.",
            "label": "harmful",
            "rules": ["R07"],
            "category": "weapons",
            "framing": "some_new_style",
        },
        {"id": "d", "prompt": "Tell me X.", "label": "harmful", "rules": ["R07"], "category": "weapons"},
    ]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_prompts(f, rules)
    assert [r.framing for r in recs] == ["past_tense", "prefix_injection", "some_new_style", None]
    teacher = TemplateTeacher(rules)
    a, b, c, d = (teacher(r) for r in recs)
    assert all(validate(t, rules) == [] for t in (a, b, c, d))
    assert any(n in a.steps["initial_assessment"] for n in FRAMING_NOTES["past_tense"])
    assert any(n in b.steps["initial_assessment"] for n in FRAMING_NOTES["prefix_injection"])
    assert any(n in c.steps["initial_assessment"] for n in JAILBREAK_NOTES)
    assert not any(n in d.steps["initial_assessment"] for notes in FRAMING_NOTES.values() for n in notes)
    first, second = a.steps["rule_verification"].splitlines()
    assert first.startswith(f"{rules['R25'].citation()}: does not apply. ")
    assert second.startswith(f"{rules['R07'].citation()}: violated. ")
    assert a.decision == b.decision == "refuse"
    f.write_text(json.dumps({**rows[0], "framing": 3}) + "\n")
    with pytest.raises(DataError, match="framing"):
        load_prompts(f, rules)
