"""Self-distilled responses: resume, continuation of cut answers, and the filter (no model needed)."""

import json

import pytest

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


def test_rejection_samples_fill_in_for_unfit_greedy_answers(tmp_path, monkeypatch):
    seen = []

    def run(prompts, n, **kw):
        seen.append(kw)
        for j in range(len(prompts)):
            yield j, [ord(c) for c in f"take {j}."], "stop"

    monkeypatch.setattr(self_distill, "_load", lambda *a: (_Tok(), run))
    monkeypatch.setattr(generate, "chat_prompt_ids", lambda tok, row: [ord(c) for c in row["prompt"]])
    rows = [{"id": i, "prompt": i, "label": "benign"} for i in ("a", "b", "c")]
    with pytest.raises(ValueError, match="temperature"):
        answer_prompts(rows, tmp_path / "x.jsonl", num_samples=2, log=lambda m: None)
    samples = tmp_path / "samples.jsonl"
    assert answer_prompts(rows, samples, temperature=0.7, top_p=0.9, num_samples=2, log=lambda m: None) == 6
    assert seen == [{"temperature": 0.7, "top_p": 0.9, "seed": 0}]
    got = [json.loads(x) for x in samples.read_text().splitlines()]
    assert sorted((r["id"], r["sample"]) for r in got) == [(i, k) for i in "abc" for k in (0, 1)]
    assert answer_prompts(rows, samples, temperature=0.7, num_samples=2, log=lambda m: None) == 0  # resumed
    # candidates: the greedy answer first, then the samples in order; the first fit one is kept
    greedy = tmp_path / "greedy.jsonl"
    greedy.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"id": "a", "response": "Greedy and fine.", "finish_reason": "stop"},
                {"id": "b", "response": "cut", "finish_reason": "length"},
                {"id": "c", "response": "cut", "finish_reason": "length"},
            ]
        )
    )
    bad = {
        "b": [("I'm sorry, but I can't help with that.", "stop"), ("Sample one.", "stop")],
        "c": [("x", "length")] * 2,
    }
    samples.write_text(
        "".join(
            json.dumps({"id": i, "sample": k, "response": t, "finish_reason": f}) + "\n"
            for i, opts in bad.items()
            for k, (t, f) in enumerate(opts)
        )
    )
    assert filter_file([greedy, samples], tmp_path / "fit.jsonl") == (2, 1)
    assert load_responses(tmp_path / "fit.jsonl") == {"a": "Greedy and fine.", "b": "Sample one."}
    (dropped,) = [json.loads(x) for x in (tmp_path / "fit.jsonl.dropped.jsonl").read_text().splitlines()]
    assert dropped["id"] == "c" and dropped["dropped"].startswith("unfinished")


def test_nucleus_pick_keeps_to_the_nucleus():
    torch = pytest.importorskip("torch")
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 400))  # [B, V]
    gen = torch.Generator().manual_seed(0)
    assert self_distill._pick(logits, 0.0, 1.0, gen).tolist() == [0] * 400  # temperature 0: argmax
    assert set(self_distill._pick(logits, 1.0, 0.4, gen).tolist()) == {0}  # the top token always stays
    drawn = self_distill._pick(logits, 1.0, 0.7, gen).tolist()  # nucleus {0, 1}
    assert set(drawn) == {0, 1} and 0.5 < drawn.count(0) / 400 < 0.75  # 0.5 / 0.8 = 0.625


def test_cli_rejection_samples_only_the_unfit_prompts(tmp_path, monkeypatch):
    from safer_jax import cli

    answered = []

    def run(prompts, n, **kw):
        for j, ids in enumerate(prompts):
            answered.append("".join(map(chr, ids)))
            yield j, [ord(c) for c in "A sampled answer."], "stop"

    monkeypatch.setattr(self_distill, "_load", lambda *a: (_Tok(), run))
    monkeypatch.setattr(generate, "chat_prompt_ids", lambda tok, row: [ord(c) for c in row["prompt"]])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": i + "?", "label": "benign"}) + "\n" for i in "ab"))
    greedy = tmp_path / "greedy.jsonl"
    greedy.write_text(
        json.dumps({"id": "a", "response": "Greedy.", "finish_reason": "stop"})
        + "\n"
        + json.dumps({"id": "b", "response": "Cut", "finish_reason": "length"})
        + "\n"
    )
    filter_file(greedy, tmp_path / "greedy.fit.jsonl")
    args = ["distill-responses", "--prompts", str(prompts), "--out", str(tmp_path / "samples.jsonl")]
    args += ["--temperature", "0.7", "--num-samples", "2", "--skip-ids", str(tmp_path / "greedy.fit.jsonl")]
    args += ["--prefer", str(greedy), "--filtered", str(tmp_path / "fit.jsonl")]
    assert cli.main(args) == 0
    assert answered == ["b?", "b?"]  # the fit greedy answer is not sampled again
    assert load_responses(tmp_path / "fit.jsonl") == {"a": "Greedy.", "b": "A sampled answer."}
