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
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from safer_jax.config import ConfigError, RoundsConfig, load_config
from safer_jax.data import bundled
from safer_jax.data.records import DataError, read_jsonl
from safer_jax.data.rules import load_rules
from safer_jax.data.tokenize import ChatTokenizer
from safer_jax.data.traces import LABELS, segments
from safer_jax.distributed import check_same
from safer_jax.generate import SamplingConfig
from safer_jax.paths import as_path, write_atomic
from safer_jax.rounds import pairing
from safer_jax.rounds.sampler import LocalSampler, OpenAISampler, Request, SamplerError
from safer_jax.rounds.steps import Expectation, JudgeSettings, judge_steps, split_steps

PHASES = ("sample", "judge", "pair", "train", "eval")
KILL_ENV = "SAFER_JAX_TEST_KILL_AT"
STATE_FILE = "rounds_state.json"


class RoundsError(RuntimeError):
    """A round cannot go on (an endpoint failed after its retries, a judge gave no verdict)."""


class KillPoint(BaseException):
    """Raised at the test kill point (`SAFER_JAX_TEST_KILL_AT`); a BaseException so nothing catches it."""


def kill_check(r: int, phase: str, n: int | None = None) -> None:
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == r and parts[1] == phase and (parts[2:] == [str(n)] if n is not None else len(parts) == 2):
        raise KillPoint(f"test kill point {spec}")


def say(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- files


def read_rows(path: Any) -> list[dict[str, Any]]:
    """Rows of a JSONL the loop appended to; a last line cut by a kill is ignored."""
    path = as_path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def append_rows(path: Any, rows: Sequence[dict[str, Any]]) -> None:
    if jax.process_index() != 0 or not rows:
        return
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old = old[: old.rfind("\n") + 1]  # drop a line a kill cut short
    write_atomic(path, (old + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)).encode())


def write_rows(path: Any, rows: Sequence[dict[str, Any]]) -> None:
    if jax.process_index() == 0:
        as_path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(as_path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


class State:
    """`rounds_state.json`: finished phases with their wall times and headline numbers."""

    def __init__(self, run_dir: Any):
        self.path = as_path(run_dir) / STATE_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"rounds": {}}

    def done(self, r: int, phase: str) -> bool:
        return phase in self.data["rounds"].get(str(r), {})

    def finish(self, r: int, phase: str, seconds: float, **info: Any) -> None:
        self.data["rounds"].setdefault(str(r), {})[phase] = {"seconds": round(seconds, 2), **info}
        if jax.process_index() == 0:
            write_atomic(self.path, json.dumps(self.data, indent=1).encode())


# --------------------------------------------------------------------------- inputs


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
    if rc.limit:
        by_label = {lab: [r for r in rows if r["label"] == lab] for lab in LABELS}
        out: list[dict[str, Any]] = []
        while len(out) < min(rc.limit, len(rows)):
            for lab in LABELS:
                if by_label[lab] and len(out) < rc.limit:
                    out.append(by_label[lab].pop(0))
        return out
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


# --------------------------------------------------------------------------- the rounds


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
                loc[0], gguf_file=loc[1], dtype=mc.dtype, param_dtype=mc.param_dtype, mesh=self.mesh
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


def _sampling(rc: Any, seed: int) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=rc.max_new_tokens,
        greedy=False,
        temperature=rc.temperature,
        top_p=rc.top_p,
        top_k=rc.top_k,
        seed=seed,
    )


def draw(env: Env, r: int, phase: str, requests: list[Request], out_file: Any, chunk: int) -> dict[str, dict[str, Any]]:
    """Sample `requests` in chunks, appending each chunk's results to `out_file` as soon as it is
    drawn; requests already there (a resumed run) are skipped. Returns request id -> result."""
    rc = env.cfg.rounds
    have = {row["id"]: row for row in read_rows(out_file)}
    chunks = [requests[i : i + chunk] for i in range(0, len(requests), chunk)]
    sampler = None
    bar = tqdm(total=len(chunks), desc=f"round {r} {phase}", unit="chunk", disable=jax.process_index() != 0)
    for c, reqs in enumerate(chunks):
        todo = [q for q in reqs if q.id not in have]
        if todo:
            sampler = sampler or env.sampler(r)
            seed = rc.seed + 7919 * r + 104729 * PHASES.index(phase) + c
            try:
                res = sampler(todo, _sampling(rc, seed))
            except SamplerError as e:
                kept = [{"id": q.id, **e.done[q.id]} for q in todo if q.id in e.done]
                append_rows(out_file, kept)
                raise RoundsError(
                    f"round {r} {phase}: the sampler failed for prompt {e.request.prompt!r} (request {e.request.id}): "
                    f"{e}; {len(have) + len(kept)} samples drawn so far are kept in {out_file}, rerun to continue"
                ) from None
            rows = [{"id": q.id, **x} for q, x in zip(todo, res)]
            append_rows(out_file, rows)
            have.update((row["id"], row) for row in rows)
        bar.update(1)
        kill_check(r, phase, c + 1)
    bar.close()
    _sync(f"rounds-{r}-{phase}-drawn")
    return {row["id"]: row for row in read_rows(out_file)} if jax.process_index() else have


def _refusals(env: Env, r: int, items: list[tuple[str, str, str]]) -> dict[str, bool]:
    """Judge verdicts (refused?) of (key, prompt, response) items, cached in `<run_dir>/judge_cache.jsonl`."""
    if env.judge is None or not items:
        return {}
    cache_file = as_path(env.run_dir) / "judge_cache.jsonl"
    cache = {row["key"]: row["refused"] for row in read_rows(cache_file)}

    def key(p: str, resp: str) -> str:
        return hashlib.sha256(json.dumps([env.judge.name, p, resp]).encode()).hexdigest()[:32]

    todo = [(k, p, resp) for k, p, resp in items if key(p, resp) not in cache]
    bar = tqdm(total=len(todo), desc=f"round {r} judge", unit="answer", disable=jax.process_index() != 0 or not todo)
    for i in range(0, len(todo), 16):
        part = todo[i : i + 16]
        verdicts = env.judge([(p, resp) for _, p, resp in part])
        new = []
        for (_, p, resp), v in zip(part, verdicts):
            if v.refused is None:
                append_rows(cache_file, new)
                raise RoundsError(f"round {r} judge: the judge gave no verdict for prompt {p!r}: {v.error}")
            cache[key(p, resp)] = v.refused
            new.append({"key": key(p, resp), "refused": v.refused, "raw": v.raw})
        append_rows(cache_file, new)
        bar.update(len(part))
    bar.close()
    return {k: cache[key(p, resp)] for k, p, resp in items}


def judge_texts(
    env: Env, r: int, items: list[dict[str, Any]], upto: Callable[[dict[str, Any]], int | None]
) -> list[Any]:
    """Verdicts of texts ({"key", "prompt" row, "text", "finish_reason"}); a judge model, when
    configured, decides the refusal of responses reached with steps 1..3 correct."""
    fmt = env.cfg.data.trace_format
    kw = dict(fmt=fmt, count=env.count, settings=env.settings())
    first = [
        judge_steps(
            it["text"], env.expectation(it["prompt"]), env.rules, finish_reason=it["finish_reason"], upto=upto(it), **kw
        )
        for it in items
    ]
    reach = [
        (it["key"], it["prompt"]["prompt"], split_steps(it["text"], fmt)[3].strip())
        for it, v in zip(items, first)
        if v.step(4) is not None
    ]
    refused = _refusals(env, r, reach)
    return [
        judge_steps(
            it["text"],
            env.expectation(it["prompt"]),
            env.rules,
            finish_reason=it["finish_reason"],
            refused=refused.get(it["key"]),
            upto=upto(it),
            **kw,
        )
        if it["key"] in refused
        else v
        for it, v in zip(items, first)
    ]


def phase_sample(env: Env, r: int) -> dict[str, Any]:
    rc, d = env.cfg.rounds, as_path(env.run_dir) / f"round_{r}"
    requests = [Request(f"{p['id']}#{j}", p["prompt"]) for p in env.prompts for j in range(rc.samples)]
    got = draw(env, r, "sample", requests, d / "samples.jsonl", rc.sample_batch * rc.samples)
    toks = [row["completion_tokens"] for row in got.values()]
    return {"samples": len(got), "mean_tokens": round(sum(toks) / max(len(toks), 1), 1)}


def phase_judge(env: Env, r: int) -> dict[str, Any]:
    d = as_path(env.run_dir) / f"round_{r}"
    samples = {row["id"]: row for row in read_rows(d / "samples.jsonl")}
    by_id = {p["id"]: p for p in env.prompts}
    items = []
    for sid, row in samples.items():
        pid = sid.rsplit("#", 1)[0]
        items.append({"key": sid, "prompt": by_id[pid], "text": row["text"], "finish_reason": row["finish_reason"]})
    rows = []
    if jax.process_index() == 0:
        verdicts = judge_texts(env, r, items, lambda it: None)
        rows = [{"id": it["key"], "prompt_id": it["prompt"]["id"], **v.to_json()} for it, v in zip(items, verdicts)]
        write_rows(d / "judged.jsonl", rows)
    _sync(f"rounds-{r}-judged")
    rows = read_rows(d / "judged.jsonl")
    faulty: dict[str, int] = {}
    for row in rows:
        k = str(row["first_faulty"] or "correct")
        faulty[k] = faulty.get(k, 0) + 1
    return {
        "first_faulty": dict(sorted(faulty.items())),
        "correct_rate": round(faulty.get("correct", 0) / max(len(rows), 1), 3),
    }


def phase_pair(env: Env, r: int) -> dict[str, Any]:
    rc, fmt, d = env.cfg.rounds, env.cfg.data.trace_format, as_path(env.run_dir) / f"round_{r}"
    samples = {row["id"]: row for row in read_rows(d / "samples.jsonl")}
    judged = read_rows(d / "judged.jsonl")
    by_id = {p["id"]: p for p in env.prompts}
    bad = [
        pairing.FaultySample(
            row["prompt_id"],
            by_id[row["prompt_id"]]["prompt"],
            int(row["id"].rsplit("#", 1)[1]),
            split_steps(samples[row["id"]]["text"], fmt),
            row["first_faulty"],
            row["reason"],
        )
        for row in judged
        if row["first_faulty"] is not None
    ]
    requests = pairing.continuation_requests(bad, rc.continuations, fmt)
    got = draw(env, r, "pair", requests, d / "continuations.jsonl", rc.sample_batch * max(rc.continuations, 1))
    pairs, stats = [], []
    if jax.process_index() == 0:
        cands: dict[str, list[dict[str, Any]]] = {}
        items = []
        for q in requests:
            b = q.id.split("@")[0]
            res = got[q.id]
            k = next(x.k for x in bad if f"{x.prompt_id}#{x.sample}" == b)
            step = pairing.continuation_step(q.prefix, res["text"], k, fmt, res["finish_reason"])
            cands.setdefault(b, []).append({"step": step, "tokens": env.count(step) if step else None})
            if step is not None:
                pid = b.rsplit("#", 1)[0]
                items.append(
                    {
                        "key": q.id,
                        "prompt": by_id[pid],
                        "text": "".join(q.prefix) + step,
                        "finish_reason": "stop",
                        "k": k,
                    }
                )
        verdicts = dict(zip((it["key"] for it in items), judge_texts(env, r, items, lambda it: it["k"])))
        for q in requests:
            b = q.id.split("@")[0]
            c = cands[b][int(q.id.split("@")[1])]
            k = next(x.k for x in bad if f"{x.prompt_id}#{x.sample}" == b)
            v = verdicts.get(q.id)
            c["ok"] = v is not None and v.first_faulty is None and v.step(k) is not None
            c["why"] = "unfinished step" if v is None else (v.reason or "")
        for b in bad:
            ref = env.references.get(b.prompt_id)
            pair, st = pairing.choose(
                b, cands.get(f"{b.prompt_id}#{b.sample}", []), ref[b.k - 1] if ref else None, env.count
            )
            stats.append(st)
            if pair is not None:
                pairs.append(pair)
        if rc.between_samples:
            ok = [row for row in judged if row["first_faulty"] is None]
            for p in env.prompts:
                correct = [
                    (int(row["id"].rsplit("#", 1)[1]), samples[row["id"]]["text"])
                    for row in ok
                    if row["prompt_id"] == p["id"]
                ]
                pair, st = pairing.length_pair(p["id"], p["prompt"], correct, rc.length_margin, env.count)
                if pair is not None:
                    pairs.append(pair)
                    stats.append(st)
        write_rows(d / "pairs.jsonl", [p.to_json() for p in pairs])
        write_rows(d / "pair_stats.jsonl", stats)
    _sync(f"rounds-{r}-paired")
    rows = read_rows(d / "pairs.jsonl")
    check_same(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(), f"round {r} pairs")
    stats = read_rows(d / "pair_stats.jsonl")
    made = [s for s in stats if s["source"] != "none"]

    def count(key: str) -> dict[str, int]:
        return {k: sum(1 for s in made if str(s[key]) == k) for k in sorted({str(s[key]) for s in made})}

    return {
        "pairs": len(rows),
        "by_step": count("step"),
        "by_reason": count("reason"),
        "by_source": count("source"),
        "unpaired": len(stats) - len(made),
        "mean_length_gap": round(sum(s["length_gap"] for s in made) / max(len(made), 1), 1),
    }


def phase_train(env: Env, r: int) -> dict[str, Any]:
    from safer_jax.config import PrefOptConfig
    from safer_jax.training.prefopt_loop import train_prefopt

    cfg, d = env.cfg, as_path(env.run_dir) / f"round_{r}"
    if not read_rows(d / "pairs.jsonl"):
        say(f"round {r}: no pairs; the policy stays as it is")
        return {"steps": 0}
    policy = env.policy_location(r)
    reference = env.start if cfg.rounds.reference == "start" else policy
    env._policy = None  # free the sampler's copy before training
    pc = dataclasses.replace(
        cfg.preference,
        reference_path=reference[0],
        reference_gguf_file=reference[1],
        cache_dir=cfg.preference.cache_dir or str(as_path(env.run_dir) / "ref_cache"),
    )
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PrefOptConfig)}
    pcfg = PrefOptConfig(
        **{
            **sections,
            "run_dir": str(d / "train"),
            "model": dataclasses.replace(cfg.model, path=policy[0], gguf_file=policy[1]),
            "data": dataclasses.replace(
                cfg.data, train=str(d / "pairs.jsonl"), tokenizer=str(as_path(env.run_dir) / "tokenizer")
            ),
            "preference": pc,
        }
    )
    hooks = [lambda step, state, m: kill_check(r, "train", step)]
    res = train_prefopt(pcfg, hooks=hooks)
    if res.get("preempted"):
        raise SystemExit(f"round {r}: training preempted; checkpoint saved, rerun to continue")
    return {"steps": res["step"], "loss": res.get("loss"), "n_pairs": res.get("n_pairs")}


def phase_eval(env: Env, r: int) -> dict[str, Any]:
    from safer_jax.evaluation import ScoreOptions, run_eval
    from safer_jax.models import from_pretrained

    rc, d = env.cfg.rounds, as_path(env.run_dir) / f"round_{r}"
    loc = env.policy_location(r + 1) if r else env.start
    model = from_pretrained(loc[0], gguf_file=loc[1], dtype=env.cfg.model.dtype, mesh=env.mesh)
    res = run_eval(
        model,
        env.ct,
        eval_examples(rc),
        SamplingConfig(max_new_tokens=rc.eval_max_new_tokens, greedy=True),
        batch_size=rc.eval_batch,
        mesh=env.mesh,
        judge=env.judge,
        options=ScoreOptions(fmt=env.cfg.data.trace_format),
        info={"model": loc[0], "round": r},
    )
    if jax.process_index() == 0:
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / "eval.json", json.dumps(res.to_json(), indent=1).encode())
    from safer_jax.rounds.report import HEADLINE

    o = res.metrics["overall"]
    return {k: o.get(k) for k in HEADLINE}


PHASE_FNS = {"sample": phase_sample, "judge": phase_judge, "pair": phase_pair, "train": phase_train, "eval": phase_eval}


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


def main_config(path: str | None, overrides: Sequence[str]) -> RoundsConfig:
    return load_config(RoundsConfig, path, list(overrides))
