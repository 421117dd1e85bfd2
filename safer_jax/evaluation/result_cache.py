"""A cache of evaluation results: greedy decoding is deterministic, so a model's scored answers
to a prompt set are computed once per machine and reused (the demo's baseline).

The key covers everything that changes the result: the model's weight and config files
(their digest), the tokenizer and chat template, the prompts (every field the scorers read),
the sampling settings and batch size (batch shapes change float rounding), the scoring code
and options, the JAX version and backend. A hit returns the stored `EvalResult` and the
timing last measured for it (the demo sizes its budget from that decode speed, and refreshes
it with each final evaluation of the same shapes).

Entries are `results.json`-style documents, so the data policy holds here as in every
writer: completions of harmful prompts are stored only to their first few words.
Location: `$SAFER_JAX_CACHE/eval_results` (default `~/.cache/safer-jax/eval_results`), a
user cache and not a run folder, so a fresh clone or a new run folder still hits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safer_jax.evaluation.result import EvalResult
from safer_jax.evaluation.sets import EvalExample
from safer_jax.paths import cache_root, write_atomic

SALT = "eval-results-1"  # bump when generation or scoring changes numbers in a way the key does not see
# the modules whose code decides a row's scores: a change to any of them is a miss
SCORING_MODULES = ("scoring", "refusal", "selfharm", "overlap", "aggregate", "result")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_sha(obj: Any) -> str:
    return _sha(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode())


def scoring_fingerprint(options: Any = None) -> str:
    """Digest of the scoring code (`SCORING_MODULES`) and the score options."""
    here = Path(__file__).parent
    code = b"".join((here / f"{m}.py").read_bytes() for m in SCORING_MODULES)
    opts = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else str(options)
    return _sha(code + _json_sha(opts).encode())


def prompts_fingerprint(examples: Sequence[EvalExample]) -> str:
    """Digest of the examples in order, every field (labels, categories, references and splits are scored)."""
    return _json_sha([ex.to_json() for ex in examples])


def runtime_settings() -> dict[str, Any]:
    import jax

    return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count()}


def result_key(
    *,
    model_fp: str,
    tokenization_fp: str,
    examples: Sequence[EvalExample],
    sampling: Any,
    batch_size: int,
    scoring_fp: str,
    runtime: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(key, its parts) of one evaluation."""
    parts = {
        "model": model_fp,
        "tokenization": tokenization_fp,
        "prompts": prompts_fingerprint(examples),
        "n_prompts": len(examples),
        "sampling": dataclasses.asdict(sampling) if dataclasses.is_dataclass(sampling) else str(sampling),
        "batch_size": batch_size,
        "scoring": scoring_fp,
        "runtime": runtime if runtime is not None else runtime_settings(),
        "salt": SALT,
    }
    return _json_sha(parts)[:24], parts


class ResultCache:
    """`root/KEY.json`: {"parts", "result" (redacted, as results.json), "timing"}."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_root() / "eval_results"

    @property
    def memo_file(self) -> Path:
        """Weight-file digests memoized by (path, size, mtime): hashing 270 MB once, not every run."""
        return self.root / "file_digests.json"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def load(self, key: str) -> tuple[EvalResult, dict[str, Any]] | None:
        """(result, timing) or None; an unreadable entry is a miss, never an error."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            return EvalResult.from_json(doc["result"]), dict(doc.get("timing", {}))
        except (json.JSONDecodeError, KeyError, TypeError):
            return None

    def save(self, key: str, parts: dict[str, Any], result: EvalResult, timing: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {"parts": parts, "result": result.to_json(), "timing": timing}
        p = self.path(key)
        write_atomic(p, (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode())
        return p

    def update_timing(self, key: str, timing: dict[str, Any]) -> bool:
        """Replace an entry's timing by a newer measurement of the same shapes (the demo's final
        evaluation: same prompts, batches and architecture), so the next budget sees this machine's
        latest decode speed; False when there is no such entry."""
        p = self.path(key)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        doc["timing"] = {**doc.get("timing", {}), **timing}
        write_atomic(p, (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode())
        return True
