"""`EvalResult`: metrics, per-example rows and run info; JSON in and out.

Data policy lives here so every writer obeys it: `redact_rows` cuts completions of
harmful prompts to their first few words before anything is written to disk.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from safer_jax.paths import as_path

QUOTE_WORDS = 8
TEXT_FIELDS = ("text", "reasoning", "response")
WITHHELD = re.compile(r" \[\.\.\. \d+ more words withheld\]$")


def truncate_words(text: str | None, words: int = QUOTE_WORDS) -> str | None:
    """The first `words` words of `text`, marked when something was cut."""
    if text is None:
        return None
    if WITHHELD.search(text):  # already truncated (a reloaded results.json): keep the original count
        return text
    parts = text.split()
    if len(parts) <= words:
        return " ".join(parts)
    return " ".join(parts[:words]) + f" [... {len(parts) - words} more words withheld]"  # matches WITHHELD


def redact_row(row: dict[str, Any], words: int = QUOTE_WORDS) -> dict[str, Any]:
    """A copy whose completion texts are truncated when the prompt is harmful."""
    if row.get("label") != "harmful":
        return dict(row)
    out = dict(row)
    for key in TEXT_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = truncate_words(out[key], words)
    out["redacted"] = True
    return out


@dataclasses.dataclass
class EvalResult:
    """What one model did on one set of examples; `metrics` from `aggregate.aggregate(rows)`."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self, quote_words: int = QUOTE_WORDS) -> dict[str, Any]:
        return {"info": self.info, "metrics": self.metrics, "rows": [redact_row(r, quote_words) for r in self.rows]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EvalResult:
        return cls(obj["metrics"], obj["rows"], obj.get("info", {}))

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """A `results.json`, or an eval output folder holding one (e.g. an earlier run as baseline)."""
        p = as_path(path)
        if p.is_dir():
            p = p / "results.json"
        try:
            return cls.from_json(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{p}: not an evaluation results.json ({type(e).__name__}: {e})") from None
