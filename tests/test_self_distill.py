"""Self-distilled responses: resume, continuation of cut answers, and the filter (no model needed)."""

import json

from safer_jax import generate, self_distill
from safer_jax.self_distill import answer_prompts, drop_reason, filter_file, load_responses


class _Tok:
    """Characters as token ids; the chat prompt is the prompt's characters."""

    def apply_chat_template(self, messages, **kw):
        return {"input_ids": [ord(c) for c in messages[-1]["content"]]}

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _fake(answers, calls):
    """A 'model' whose answer to prompt text P is answers[P], continued from any started prefix."""

    def run(prompts, n):
        for j, ids in enumerate(prompts):
            text = "".join(chr(i) for i in ids)
            p = next(k for k in answers if text.startswith(k))
            done = len(text) - len(p)
            rest = answers[p][done:]
            calls.append((p, done, n))
            yield j, [ord(c) for c in rest[:n]], "stop" if len(rest) <= n else "length"

    return run


def test_resume_and_continue_cut_answers(tmp_path, monkeypatch):
    answers = {"short?": "Yes.", "long?": "A long and complete answer."}
    calls = []
    monkeypatch.setattr(self_distill, "_load", lambda *a: (_Tok(), _fake(answers, calls)))
    # the chat context is the project's tokenization (tested in test_chat_templates); here: the prompt's characters
    monkeypatch.setattr(generate, "chat_prompt_ids", lambda tok, row: [ord(c) for c in row["prompt"]])
    rows = [{"id": "a", "prompt": "short?", "label": "benign"}, {"id": "b", "prompt": "long?", "label": "benign"}]
    out = tmp_path / "raw.jsonl"
    assert answer_prompts(rows, out, max_new_tokens=10, log=lambda m: None) == 2
    assert answer_prompts(rows, out, max_new_tokens=10, log=lambda m: None) == 0  # resumed: nothing to do
    with open(out, "a") as f:
        f.write('{"id": "c", "pro')  # a kill mid-line
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines()[:2])}
    assert got["a"]["finish_reason"] == "stop" and got["b"]["finish_reason"] == "length"
    calls.clear()
    assert answer_prompts(rows, out, max_new_tokens=64, redo_cut=True, log=lambda m: None) == 1
    assert calls == [("long?", 10, 54)]  # continued from the 10 tokens it had, not restarted
    assert load_responses(_filtered(out, tmp_path))["b"] == "A long and complete answer."


def _filtered(raw, tmp_path):
    kept, dropped = filter_file(raw, tmp_path / "fit.jsonl")
    assert (kept, dropped) == (2, 0)
    return tmp_path / "fit.jsonl"


def test_filter_drops_refusals_loops_and_unfinished_answers(tmp_path):
    rows = [
        {"id": "ok", "response": "Paris is the capital of France.", "finish_reason": "stop"},
        {"id": "cut", "response": "Paris is", "finish_reason": "length"},
        {"id": "no", "response": "I'm sorry, but I can't help with that.", "finish_reason": "stop"},
        {"id": "loop", "response": " ".join(["the same words again and again"] * 30), "finish_reason": "stop"},
        {"id": "empty", "response": "  ", "finish_reason": "stop"},
    ]
    assert drop_reason(rows[0]) is None
    assert [drop_reason(r).split(" ")[0] for r in rows[1:]] == ["unfinished", "refusal", "looping", "empty"]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert filter_file(raw, tmp_path / "fit.jsonl") == (1, 4)
    dropped = [json.loads(x) for x in (tmp_path / "fit.jsonl.dropped.jsonl").read_text().splitlines()]
    assert {d["id"]: d["dropped"].split(" ")[0] for d in dropped}["no"] == "refusal"
