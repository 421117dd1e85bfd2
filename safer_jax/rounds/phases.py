"""The five phases of a round; each takes the round loop's `Env` and the round number and
returns the headline numbers `rounds_state.json` records."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
from tqdm.auto import tqdm

from safer_jax.distributed import check_same
from safer_jax.generate import SamplingConfig
from safer_jax.paths import as_path, write_atomic
from safer_jax.rounds import pairing
from safer_jax.rounds.inputs import eval_examples
from safer_jax.rounds.sampler import Request, SamplerError
from safer_jax.rounds.steps import judge_steps, split_steps
from safer_jax.rounds.store import PHASES, RoundsError, append_rows, kill_check, read_rows, say, sync, write_rows


def _sampling(rc: Any, seed: int) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=rc.max_new_tokens,
        greedy=False,
        temperature=rc.temperature,
        top_p=rc.top_p,
        top_k=rc.top_k,
        seed=seed,
    )


def draw(env: Any, r: int, phase: str, requests: list[Request], out_file: Any, chunk: int) -> dict[str, dict[str, Any]]:
    """Sample `requests` in chunks, appending each chunk's results to `out_file` as soon as it is
    drawn; requests already there (a resumed run) are skipped. Returns request id -> result."""
    rc = env.cfg.rounds
    have = {row["id"]: row for row in read_rows(out_file)}
    chunks = [requests[i : i + chunk] for i in range(0, len(requests), chunk)]
    sampler = None
    bar = tqdm(total=len(chunks), desc=f"round {r} {phase}", unit="chunk", disable=jax.process_index() != 0)
    collective = rc.sampler == "local"  # the KV-cache sampler runs on every process; an endpoint is asked once
    for c, reqs in enumerate(chunks):
        todo = [q for q in reqs if q.id not in have]
        if todo and (collective or jax.process_index() == 0):
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
    sync(f"rounds-{r}-{phase}-drawn")
    return {row["id"]: row for row in read_rows(out_file)} if jax.process_index() else have


def _refusals(env: Any, r: int, items: list[tuple[str, str, str]]) -> dict[str, bool]:
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
    env: Any, r: int, items: list[dict[str, Any]], upto: Callable[[dict[str, Any]], int | None]
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


def phase_sample(env: Any, r: int) -> dict[str, Any]:
    rc, d = env.cfg.rounds, as_path(env.run_dir) / f"round_{r}"
    requests = [Request(f"{p['id']}#{j}", p["prompt"]) for p in env.prompts for j in range(rc.samples)]
    got = draw(env, r, "sample", requests, d / "samples.jsonl", rc.sample_batch * rc.samples)
    toks = [row["completion_tokens"] for row in got.values()]
    return {"samples": len(got), "mean_tokens": round(sum(toks) / max(len(toks), 1), 1)}


def phase_judge(env: Any, r: int) -> dict[str, Any]:
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
    sync(f"rounds-{r}-judged")
    rows = read_rows(d / "judged.jsonl")
    faulty: dict[str, int] = {}
    for row in rows:
        k = str(row["first_faulty"] or "correct")
        faulty[k] = faulty.get(k, 0) + 1
    return {
        "first_faulty": dict(sorted(faulty.items())),
        "correct_rate": round(faulty.get("correct", 0) / max(len(rows), 1), 3),
    }


def phase_pair(env: Any, r: int) -> dict[str, Any]:
    rc, fmt, d = env.cfg.rounds, env.cfg.data.trace_format, as_path(env.run_dir) / f"round_{r}"
    samples = {row["id"]: row for row in read_rows(d / "samples.jsonl")}
    judged = read_rows(d / "judged.jsonl")
    by_id = {p["id"]: p for p in env.prompts}
    bad = []
    for row in judged:
        segs = split_steps(samples[row["id"]]["text"], fmt)
        if row["first_faulty"] is None or not segs:
            continue
        # a sample that never wrote step k (its text ended inside step k-1) went wrong in its last segment
        k = min(row["first_faulty"], len(segs))
        pid = row["prompt_id"]
        bad.append(
            pairing.FaultySample(pid, by_id[pid]["prompt"], int(row["id"].rsplit("#", 1)[1]), segs, k, row["reason"])
        )
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
    sync(f"rounds-{r}-paired")
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


def phase_train(env: Any, r: int) -> dict[str, Any]:
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


def phase_eval(env: Any, r: int) -> dict[str, Any]:
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
