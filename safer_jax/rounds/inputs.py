"""Inputs of the rounds: prompts, reference traces, evaluation ids, and the config checks
that fail before any work, naming the key."""

from __future__ import annotations

import random
from typing import Any

from safer_jax.config import ConfigError, RoundsConfig
from safer_jax.data import bundled
from safer_jax.data.records import DataError, read_jsonl
from safer_jax.data.traces import LABELS, segments


def load_prompts(rc: Any) -> list[dict[str, Any]]:
    """The round prompts: {id, prompt, label, rules, category}; errors name file, line and field."""
    path = bundled("train_prompts.jsonl") if rc.prompts == "bundled" else rc.prompts
    rows = []
    for line, obj in read_jsonl(path):
        for field in ("id", "prompt", "label"):
            if not isinstance(obj.get(field), str) or not obj[field]:
                raise DataError("missing or not a string", path, line, field)
        if obj["label"] not in LABELS:
            raise DataError(f"must be one of {LABELS}, got {obj['label']!r}", path, line, "label")
        rows.append(obj)
    if rc.prompt_ids:
        by_id = {r["id"]: r for r in rows}
        missing = [i for i in rc.prompt_ids if i not in by_id]
        if missing:
            raise ConfigError(f"rounds.prompt_ids: {missing[:3]} not in {path}")
        return [by_id[i] for i in rc.prompt_ids]
    if rc.limit:  # a seeded sample, labels taken in turn, then in file order
        rng = random.Random(rc.seed)
        pools = {lab: rng.sample(pool, len(pool)) for lab in LABELS if (pool := [r for r in rows if r["label"] == lab])}
        picked: list[dict[str, Any]] = []
        while len(picked) < min(rc.limit, len(rows)):
            for pool in pools.values():
                if pool and len(picked) < rc.limit:
                    picked.append(pool.pop())
        order = {id(r): i for i, r in enumerate(rows)}
        return sorted(picked, key=lambda r: order[id(r)])
    return rows


def load_references(rc: Any, fmt: Any) -> dict[str, list[str]]:
    """Prompt id -> the reference trace's four segments (the fallback chosen span)."""
    from safer_jax.data.pipeline import load_traces

    path = bundled("train_traces.jsonl") if rc.references == "bundled" else rc.references
    return {t.id: segments(t, fmt) for t in load_traces(path, fmt=fmt)}


def eval_examples(rc: Any) -> list[Any]:
    from safer_jax.evaluation import load_eval_sets

    rows = load_eval_sets(["bundled"])
    if rc.eval_ids:
        by_id = {e.id: e for e in rows}
        missing = [i for i in rc.eval_ids if i not in by_id]
        if missing:
            raise ConfigError(f"rounds.eval_ids: {missing[:3]} are not bundled evaluation ids")
        return [by_id[i] for i in rc.eval_ids]
    rng = random.Random(0)
    out = []
    for label, n in zip(LABELS, rc.eval_counts):
        pool = [e for e in rows if e.label == label]
        out += rng.sample(pool, min(n, len(pool)))
    return out


def validate(cfg: RoundsConfig) -> None:
    """Bad settings fail before any work, naming the key."""
    rc = cfg.rounds
    if not cfg.run_dir:
        raise ConfigError("run_dir is not set (pass run_dir=PATH)")
    if rc.rounds < 1:
        raise ConfigError(f"rounds.rounds must be >= 1, got {rc.rounds}")
    if rc.samples < 1 or rc.continuations < 0:
        raise ConfigError("rounds.samples must be >= 1 and rounds.continuations >= 0")
    if rc.between_samples and rc.samples < 2:
        raise ConfigError(
            f"rounds.samples={rc.samples}: pairing between samples (rounds.between_samples) needs K >= 2 "
            "samples per prompt; raise rounds.samples or set rounds.between_samples=false"
        )
    if rc.reference not in ("start", "previous"):
        raise ConfigError(f"rounds.reference={rc.reference!r}: choose start or previous")
    if rc.sampler not in ("local", "openai"):
        raise ConfigError(f"rounds.sampler={rc.sampler!r}: choose local or openai")
    if rc.sampler == "openai" and not (rc.sampler_url and rc.sampler_model):
        raise ConfigError("rounds.sampler=openai needs rounds.sampler_url and rounds.sampler_model")
    if rc.judge not in ("rules", "openai"):
        raise ConfigError(f"rounds.judge={rc.judge!r}: choose rules or openai")
    if rc.judge == "openai" and not (rc.judge_url and rc.judge_model):
        raise ConfigError("rounds.judge=openai needs rounds.judge_url and rounds.judge_model")
    from safer_jax.hub import resolve_path

    for key, path, gguf in (
        ("model.path", cfg.model.path, cfg.model.gguf_file),
        ("preference.reference_path", cfg.preference.reference_path, cfg.preference.reference_gguf_file),
    ):
        if not path or path.startswith("tiny") or path == "smollm2":
            continue
        try:
            folder = resolve_path(path, gguf)
        except ValueError as e:
            raise ConfigError(f"{key}={path}: the round reference does not exist ({e})") from None
        if gguf and not (folder / gguf).exists():
            raise ConfigError(f"{key}={path}: the round reference does not exist (no {gguf} in {folder})")
