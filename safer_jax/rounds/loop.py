"""The round loop: for each round, sample -> judge -> pair -> train -> evaluate, resumable.

`safer-jax rounds --config configs/rounds/NAME.yaml key=value ...`. Everything a round
makes lives in `<run_dir>/round_<r>/` (samples stay in the run folder: they may hold
harmful completions); `rounds_state.json` records each finished phase with its wall time.
A stopped run resumes at the round and phase where it stopped: sampling at the chunk of
prompts (each chunk's samples are appended as soon as they are drawn, with a seed fixed by
round and chunk, so a resumed run draws what an uninterrupted one would), training from its
checkpoints (`training/loop.py`). `SAFER_JAX_TEST_KILL_AT=ROUND:PHASE[:N]` stops the run
deterministically after N chunks (sample, pair) or steps (train) of that phase, or after the
phase, for the resume tests.

On several processes every process samples (the KV-cache sampler is a collective), process
0 alone judges and writes; the others read its files, and the pairs are checked equal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax

from safer_jax.config import RoundsConfig
from safer_jax.data.rules import load_rules
from safer_jax.data.tokenize import ChatTokenizer
from safer_jax.paths import as_path
from safer_jax.rounds.inputs import load_prompts, load_references, validate
from safer_jax.rounds.phases import PHASE_FNS, draw, phase_eval, phase_judge, phase_pair, phase_sample, phase_train
from safer_jax.rounds.sampler import LocalSampler, OpenAISampler, Request
from safer_jax.rounds.steps import Expectation, JudgeSettings
from safer_jax.rounds.store import (
    KILL_ENV,
    PHASES,
    STATE_FILE,
    KillPoint,
    RoundsError,
    State,
    kill_check,
    read_rows,
    say,
)

__all__ = [
    "KILL_ENV",
    "PHASES",
    "STATE_FILE",
    "Env",
    "KillPoint",
    "Request",
    "RoundsError",
    "draw",
    "phase_eval",
    "phase_judge",
    "phase_pair",
    "phase_sample",
    "phase_train",
    "read_rows",
    "run_rounds",
    "setup",
    "validate",
]


@dataclasses.dataclass
class Env:
    cfg: RoundsConfig
    run_dir: Any
    mesh: Any
    ct: ChatTokenizer
    start: tuple[str, str | None]  # (folder, gguf) of the starting policy
    prompts: list[dict[str, Any]]
    references: dict[str, list[str]]
    rules: Any
    state: State
    sampler_factory: Callable[[Any, int], Any] | None = None  # (env, round) -> sampler: scripted samplers in tests
    judge: Any = None
    _policy: tuple[str, Any] | None = None

    def count(self, text: str) -> int:
        return len(self.ct.encode_text(text))

    def policy_location(self, r: int) -> tuple[str, str | None]:
        """The policy round r samples from: the start, or the latest round before r that trained."""
        for q in range(r - 1, 0, -1):
            export = as_path(self.run_dir) / f"round_{q}" / "train" / "export"
            if (export / "config.json").exists():
                return str(export), None
        return self.start

    def policy(self, r: int) -> Any:
        from safer_jax.models import from_pretrained

        loc = self.policy_location(r)
        if self._policy is None or self._policy[0] != loc[0]:
            mc = self.cfg.model
            say(f"round {r}: loading the policy from {loc[0]}")
            model = from_pretrained(
                loc[0],
                gguf_file=loc[1],
                dtype=mc.dtype,
                param_dtype=mc.param_dtype,
                mesh=self.mesh,
                matmul_dtype=mc.matmul_dtype,
                freeze_layers=mc.freeze_layers,
            )
            self._policy = (loc[0], model)
        return self._policy[1]

    def sampler(self, r: int) -> Any:
        rc = self.cfg.rounds
        if rc.sampler == "openai":
            return OpenAISampler(
                rc.sampler_url,
                rc.sampler_model,
                self.ct,
                api_key=os.environ.get(rc.api_key_env),
                max_retries=rc.retries,
                timeout=rc.timeout_s,
                backoff=rc.backoff_s,
            )
        if self.sampler_factory is not None:
            return self.sampler_factory(self, r)
        return LocalSampler(self.policy(r), self.ct, batch_size=rc.sample_batch * rc.samples, mesh=self.mesh)

    def expectation(self, p: dict[str, Any]) -> Expectation:
        ref = self.references.get(p["id"])
        return Expectation(
            p["label"], tuple(p.get("rules") or ()), str(p.get("category") or ""), ref[3] if ref else None
        )

    def settings(self) -> JudgeSettings:
        rc = self.cfg.rounds
        return JudgeSettings(rc.max_step_tokens, rc.helpful_min_overlap)


def setup(cfg: RoundsConfig, sampler_factory: Callable | None = None) -> Env:
    from safer_jax.evaluation import OpenAIJudge
    from safer_jax.sharding import make_mesh
    from safer_jax.training.run import load_tokenizer, resolve_model_path, write_run_files

    validate(cfg)
    run_dir = as_path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg.rounds)
    fmt = cfg.data.trace_format
    references = load_references(cfg.rounds, fmt)
    write_run_files(run_dir, cfg)
    start = resolve_model_path(cfg.model, run_dir, [p["prompt"] for p in prompts])
    tok = load_tokenizer(cfg.data.tokenizer or start[0], None if cfg.data.tokenizer else start[1], run_dir)
    ct = ChatTokenizer.from_config(tok, cfg.data)
    judge = None
    if cfg.rounds.judge == "openai":
        rc = cfg.rounds
        judge = OpenAIJudge(
            rc.judge_url, rc.judge_model, os.environ.get(rc.api_key_env), rc.retries, rc.timeout_s, rc.backoff_s
        )
    return Env(
        cfg,
        run_dir,
        make_mesh(cfg.mesh),
        ct,
        start,
        prompts,
        references,
        load_rules(cfg.data.rules),
        State(run_dir),
        sampler_factory,
        judge,
    )


def run_rounds(cfg: RoundsConfig, sampler_factory: Callable | None = None) -> dict[str, Any]:
    """Run (or resume) every round; returns the state and the report path."""
    from safer_jax.rounds.report import write_report

    env = setup(cfg, sampler_factory)
    t_all = time.time()
    todo = [(0, "eval")] if cfg.rounds.eval_start else []
    todo += [(r, ph) for r in range(1, cfg.rounds.rounds + 1) for ph in PHASES]
    for r, ph in todo:
        if env.state.done(r, ph):
            continue
        say(f"\n=== round {r}: {ph} (elapsed {(time.time() - t_all) / 60:.1f} min) ===")
        t0 = time.time()
        info = PHASE_FNS[ph](env, r)
        env.state.finish(r, ph, time.time() - t0, **info)
        say(f"round {r} {ph}: {time.time() - t0:.1f}s {json.dumps(info)}")
        kill_check(r, ph)
    report = write_report(env.run_dir, env.state.data) if jax.process_index() == 0 else None
    return {"state": env.state.data, "report": report}
