"""Bad input names file, line and field; --skip-invalid counts and reports instead."""

import json

import pytest
from test_traces import make_trace

from safer_jax.cli import main as cli_main
from safer_jax.data.pipeline import load_traces
from safer_jax.data.records import DataError, SkipReport
from safer_jax.data.rules import load_rules
from safer_jax.data.synthesis import load_prompts


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def good():
    return json.dumps(make_trace().to_json())


def test_malformed_json_line(rules, tmp_path):
    f = write_lines(tmp_path / "t.jsonl", [good(), '{"id": "x", "prompt": ', good()])
    with pytest.raises(DataError, match=r"t.jsonl:2: malformed JSON"):
        load_traces(f, rules)


def test_missing_field(rules, tmp_path):
    rec = make_trace().to_json()
    del rec["decision"]
    f = write_lines(tmp_path / "t.jsonl", [good(), good(), json.dumps(rec)])
    with pytest.raises(DataError, match=r"t.jsonl:3: field 'decision': missing required field"):
        load_traces(f, rules)


def test_unknown_rule_id(rules, tmp_path):
    rec = make_trace().to_json()
    rec["steps"]["rule_verification"] = "R77 (made up): violated."
    f = write_lines(tmp_path / "t.jsonl", [json.dumps(rec)])
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'rules': unknown rule id R77"):
        load_traces(f, rules)
    p = write_lines(tmp_path / "p.jsonl", ['{"id": "a", "prompt": "hi", "label": "benign", "rules": ["R99"]}'])
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'rules': unknown rule id 'R99'"):
        load_prompts(p, rules)


def test_trace_missing_a_step(rules, tmp_path):
    rec = make_trace().to_json()
    del rec["steps"]["rule_verification"]
    f = write_lines(tmp_path / "t.jsonl", [good(), json.dumps(rec)])
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'steps.rule_verification': missing or empty step"):
        load_traces(f, rules)
    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\n## Initial Assessment\nx\n</think>\nhello"},
        ]
    }
    f2 = write_lines(tmp_path / "c.jsonl", [json.dumps(chat)])
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'messages\[-1\].content': malformed trace: missing step"):
        load_traces(f2, rules)


def test_skip_invalid_counts_and_reports(rules, tmp_path):
    rec = make_trace().to_json()
    del rec["response"]
    f = write_lines(tmp_path / "t.jsonl", [good(), "not json", json.dumps(rec), good()])
    report = SkipReport()
    assert len(load_traces(f, rules, skip_invalid=True, report=report)) == 2
    assert report.total == 2
    text = report.summary()
    assert "skipped 2 invalid records" in text and "t.jsonl:2" in text and "t.jsonl:3" in text


def test_rules_schema_errors(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "rules:\n  - id: R01\n    title: T\n    category: c\n    kind: forbid\n"
        "    statement: s\n    examples: {}\n    phrases: {}\n"
    )
    with pytest.raises(DataError, match=r"a.yaml: field 'rules\[0\].kind': kind must be prohibit or permit"):
        load_rules(tmp_path)
    (tmp_path / "a.yaml").write_text("rules:\n  - id: R01\n    title: T\n")
    with pytest.raises(DataError, match=r"a.yaml: field 'rules\[0\].category': missing required key"):
        load_rules(tmp_path)


def test_duplicate_rule_ids_across_files(tmp_path):
    import shutil

    from safer_jax.data.rules import default_rules_dir

    for f in default_rules_dir().glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(tmp_path / "permit.yaml", tmp_path / "zz-copy.yaml")
    with pytest.raises(DataError, match=r"zz-copy.yaml: field 'rules\[0\].id': duplicate rule id R21"):
        load_rules(tmp_path)


def test_cli_reports_bad_file_without_traceback(tmp_path, capsys):
    f = write_lines(tmp_path / "t.jsonl", [good(), "{broken"])
    assert cli_main(["make-pairs", "--traces", str(f), "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "t.jsonl:2: malformed JSON" in err and "Traceback" not in err
    assert cli_main(["make-pairs", "--traces", str(f), "--out", str(tmp_path / "p.jsonl"), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 invalid records" in out
