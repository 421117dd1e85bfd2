"""Build tests/fixtures/rounds_judge_labels.jsonl: real post-SFT samples with hand labels.

    python scripts/build_judge_fixture.py RAW_SAMPLES.jsonl LABELS.json OUT.jsonl

RAW_SAMPLES: one sample per line ({id, prompt_id, sampling, prompt, label, rules, category, text,
finish_reason}),
drawn from the model after the demo's SFT stage (docs/results.md names the run).
LABELS: {id: {"first_faulty": 1..4 or null, "reason": str, "note": str, "redact": bool}}: what a
person reading the sample decided (the criteria are in the fixture test's docstring).

Data policy: where a sample's response does not refuse a harmful prompt (`redact`), only its
first few words are kept, followed by REDACTED; the judge still sees a response that opens
without a refusal, which is what it decides compliance on (refusal cues count only in a
response's opening, `evaluation/refusal.py`).
"""

import json
import sys
from pathlib import Path

from safer_jax.data.traces import split_think

REDACTED = " [... redacted: the rest of this response complies with a harmful request]"
KEEP_WORDS = 6


def main(raw: str, labels: str, out: str) -> None:
    marks = json.loads(Path(labels).read_text())
    rows = []
    for line in Path(raw).read_text().splitlines():
        s = json.loads(line)
        lab = marks[s["id"]]
        text = s["text"]
        redacted = bool(lab.get("redact"))
        if redacted:
            _, response = split_think(text)
            head = text[: len(text) - len(text.lstrip())] if response is None else text[: text.rfind(response)]
            words = (response or "").split()
            text = head + " ".join(words[:KEEP_WORDS]) + REDACTED
        rows.append(
            {
                "id": s["id"],
                "prompt_id": s.get("prompt_id", s["id"]),
                "sampling": s.get("sampling", ""),
                "prompt": s["prompt"],
                "label": s["label"],
                "rules": s["rules"],
                "category": s.get("category", ""),
                "text": text,
                "finish_reason": s["finish_reason"],
                "redacted": redacted,
                "human": {k: lab.get(k) for k in ("first_faulty", "reason", "note")},
            }
        )
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {out} ({sum(r['redacted'] for r in rows)} redacted)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
