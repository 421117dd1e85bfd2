"""Run an evaluation: generate answers, score them, write the report.

`run_eval` is the library call (a model in memory); `evaluate` is what `safer-jax eval`
runs: it loads the model (and an optional baseline model, or an earlier results.json),
generates, scores and writes the out folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safer_jax.evaluation.result import EvalResult
from safer_jax.evaluation.scoring import ScoreOptions, score
from safer_jax.evaluation.sets import EvalExample
from safer_jax.paths import as_path

log = logging.getLogger(__name__)
EMBEDDED = "smollm2"  # model spec naming the embedded default SmolLM2-135M-Instruct


def default_generate_fn() -> Callable[..., list[dict]]:
    from safer_jax.generate import generate_chat

    return generate_chat


def _sampling_text(sampling: Any) -> str:
    if getattr(sampling, "greedy", False):
        return f"greedy, max_new_tokens={sampling.max_new_tokens}"
    return (
        f"temperature={sampling.temperature}, top_k={sampling.top_k}, top_p={sampling.top_p}, "
        f"seed={sampling.seed}, max_new_tokens={sampling.max_new_tokens}"
    )


def run_eval(
    model: Any,
    tokenizer: Any,
    examples: list[EvalExample],
    sampling: Any,
    *,
    batch_size: int = 8,
    mesh: Any = None,
    judge: Any = None,
    generate_fn: Callable[..., list[dict]] | None = None,
    system_prompt: str | None = None,
    progress: bool = True,
    options: ScoreOptions = ScoreOptions(),
    info: dict[str, Any] | None = None,
) -> EvalResult:
    """Answer every example with `generate_fn` (default `safer_jax.generate.generate_chat`) and score."""
    gen = generate_fn or default_generate_fn()
    rows = [{"id": ex.id, "prompt": ex.prompt} for ex in examples]
    t0 = time.perf_counter()
    gens = gen(
        model,
        tokenizer,
        rows,
        sampling,
        batch_size=batch_size,
        system_prompt=system_prompt,
        mesh=mesh,
        progress=progress,
        fmt=options.fmt,
    )
    elapsed = time.perf_counter() - t0
    meta = {
        "sets": sorted({ex.source for ex in examples}),
        "sampling": _sampling_text(sampling),
        "sampling_config": dataclasses.asdict(sampling) if dataclasses.is_dataclass(sampling) else str(sampling),
        "batch_size": batch_size,
        "generate_s": round(elapsed, 1),
        **(info or {}),
    }
    return score(examples, gens, tokenizer=tokenizer, judge=judge, options=options, info=meta)


def load_model(spec: str, gguf_file: str | None = None, mesh: Any = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, display name) for a folder, hub id, or `smollm2` (the embedded default)."""
    from safer_jax.data.tokenize import load_tokenizer
    from safer_jax.models import from_pretrained

    if spec == EMBEDDED:
        from safer_jax.models.embedded import smollm2_location

        folder, gguf = smollm2_location()
        path, gguf_file, name = str(folder), gguf, "SmolLM2-135M-Instruct (Q4_1 GGUF)"
    else:
        from safer_jax.hub import resolve_path

        path, name = str(resolve_path(spec, gguf_file)), spec if not gguf_file else f"{spec}/{gguf_file}"
    model = from_pretrained(path, gguf_file=gguf_file, mesh=mesh)
    tok = load_tokenizer(path, gguf_file)
    return model, tok, name


def evaluate(
    model: str,
    examples: Sequence[EvalExample],
    out_dir: str | Path,
    sampling: Any,
    *,
    gguf_file: str | None = None,
    baseline: str | None = None,
    baseline_gguf_file: str | None = None,
    batch_size: int = 8,
    judge: Any = None,
    mesh: Any = None,
    system_prompt: str | None = None,
    generate_fn: Callable[..., list[dict]] | None = None,
    progress: bool = True,
    options: ScoreOptions = ScoreOptions(),
    title: str = "safer-jax safety evaluation",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[EvalResult, EvalResult | None, dict[str, Path]]:
    """Evaluate `model` (and `baseline`: a model spec, or an earlier results.json / out folder); write reports."""
    shared = dict(
        examples=list(examples),
        sampling=sampling,
        batch_size=batch_size,
        judge=judge,
        mesh=mesh,
        system_prompt=system_prompt,
        generate_fn=generate_fn,
        progress=progress,
        options=options,
        chat_template_kwargs=chat_template_kwargs,
    )  # the model and a baseline model are evaluated alike
    res = _evaluate_one(model, gguf_file, role="model", **shared)
    base = None
    if baseline:
        bpath = as_path(baseline)
        if bpath.suffix == ".json" or (bpath.is_dir() and (bpath / "results.json").exists()):
            base = EvalResult.load(bpath)
            base.info.setdefault("name", "baseline")
        else:
            base = _evaluate_one(baseline, baseline_gguf_file, role="baseline", **shared)
    paths = write_report(out_dir, res, base, title)
    return res, base, paths


def _evaluate_one(
    spec: str,
    gguf_file: str | None,
    examples: list[EvalExample],
    sampling: Any,
    batch_size: int,
    judge: Any,
    mesh: Any,
    system_prompt: str | None,
    generate_fn: Callable | None,
    progress: bool,
    options: ScoreOptions,
    role: str,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> EvalResult:
    from safer_jax.data.tokenize import ChatTokenizer

    t0 = time.perf_counter()
    model, tok, name = load_model(spec, gguf_file, mesh)
    tok = ChatTokenizer(tok, system_prompt, name, chat_template_kwargs, options.fmt)  # the shared tokenization
    load_s = time.perf_counter() - t0
    log.info("loaded %s %s in %.1fs", role, name, load_s)
    res = run_eval(
        model,
        tok,
        examples,
        sampling,
        batch_size=batch_size,
        mesh=mesh,
        judge=judge,
        generate_fn=generate_fn,
        system_prompt=system_prompt,
        progress=progress,
        options=options,
        info={"model": name, "name": role, "load_s": round(load_s, 1)},
    )
    del model
    return res


def write_report(
    out_dir: str | Path,
    result: EvalResult,
    baseline: EvalResult | None = None,
    title: str = "safer-jax safety evaluation",
) -> dict[str, Path]:
    """See `report.write_report` (re-exported here so callers need one import)."""
    from safer_jax.evaluation.report import write_report as _write

    return _write(out_dir, result, baseline, title)
