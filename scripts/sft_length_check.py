"""Data check (issue 15): does SFT on the bundled traces, with the demo's SFT settings, keep answers long?

Runs the demo's stage 1 only (`safer_jax.demo`: the same traces file, plan, overrides and base
model), then evaluates the baseline and the SFT'd model on the demo's evaluation sample, by
default only its benign prompts, and prints their mean response tokens. Resumable: a finished
stage (its output file) is skipped, SFT resumes from its checkpoint.

    python scripts/sft_length_check.py --run-dir runs/sft_length --sft-steps 11 [--sft-export DIR | --sft-only]

The demo paces its SFT stage by time (its share of the budget), so the step count here is
explicit: `--sft-steps` (11 is what the demo's SFT stage ran in its last measured run,
docs/results.md). `--sft-export` evaluates an SFT export made elsewhere with those settings
instead of training one; `--sft-only` trains the stage and stops (the start of the rounds
measurement, docs/results.md). Both evaluations are cached per machine like the demo's baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safer_jax import demo
from safer_jax.config import SFTConfig, load_config


def traces_fit(cfg: SFTConfig) -> tuple[int, int, int]:
    """(traces, how many fit data.seq_len + 1 tokens uncut (the pipeline cuts the rest from the
    end), how many of the benign/borderline ones are cut), tokenized as the SFT run does."""
    from safer_jax.data.pipeline import load_traces
    from safer_jax.data.tokenize import ChatTokenizer, load_tokenizer

    ct = ChatTokenizer.from_config(load_tokenizer(cfg.model.path, cfg.model.gguf_file), cfg.data)
    traces = load_traces(cfg.data.train)
    lens = [(t.label, len(ct.encode_trace(t)["input_ids"])) for t in traces]
    limit = cfg.data.seq_len + 1
    return len(traces), sum(n <= limit for _, n in lens), sum(n > limit for lab, n in lens if lab != "harmful")


def _eval(path: str, gguf: str | None, examples: list, plan: demo.DemoPlan, name: str, out: Path) -> dict:
    from safer_jax.demo_budget import Clock
    from safer_jax.demo_eval import evaluate
    from safer_jax.evaluation.result_cache import ResultCache

    if not out.exists():
        t0 = time.time()
        res, timing, _ = evaluate(path, gguf, examples, plan, name, Clock(), ResultCache())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res.to_json(), indent=1))
        print(f"{name} evaluation: {time.time() - t0:.0f} s ({timing})", flush=True)
    return json.loads(out.read_text())["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--budget-minutes", type=float, default=30.0, help="the demo's --budget-minutes (plan size)")
    ap.add_argument("--labels", default="benign", help="labels of the demo's sample to evaluate (comma-separated)")
    ap.add_argument("--sft-steps", type=int, default=11, help="SFT steps (the demo paces them by time)")
    ap.add_argument("--sft-only", action="store_true", help="train (or resume) the SFT stage and stop: no evaluation")
    ap.add_argument("--sft-export", help="evaluate this SFT export (trained with these settings) instead of training")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = demo.plan_for(args.budget_minutes)
    base_path, gguf = demo._base_model(plan, run_dir)
    labels = set(args.labels.split(","))
    examples = [ex for ex in demo.eval_examples(plan.eval_counts) if ex.label in labels]
    traces = run_dir / "sft_traces.jsonl"
    n_traces = demo._write_sft_traces(traces, demo.HARMFUL_COPIES, demo.SUPPORTIVE_COPIES)
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"run_dir={run_dir / 'sft'}",
            f"model.path={base_path}",
            f"model.gguf_file={gguf}",
            f"data.train={traces}",
            f"data.seq_len={plan.sft_seq}",
            f"data.batch_size={plan.sft_rows}",
            f"train.steps={args.sft_steps}",
            f"train.checkpoint_every={max(args.sft_steps // 3, 1)}",
            "train.log_every=1",
            *plan.sft_overrides,
        ],
    )
    _, fit, long_helpful = traces_fit(cfg)
    print(f"plan: {json.dumps(plan.to_json())}\n{len(examples)} eval prompts ({args.labels})", flush=True)
    print(f"{n_traces} SFT traces; {fit} fit seq_len {cfg.data.seq_len} uncut; {long_helpful} benign/borderline cut")
    if not args.sft_only:
        base = _eval(base_path, gguf, examples, plan, "baseline", run_dir / "baseline" / "results.json")
    export = Path(args.sft_export) if args.sft_export else run_dir / "sft" / "export"
    if not (export / "config.json").exists():
        if args.sft_export:
            raise SystemExit(f"--sft-export {export}: no config.json there")
        from safer_jax.training.sft_loop import train_sft

        t0 = time.time()
        res = train_sft(cfg)
        print(f"SFT: {res.get('step')} steps, {time.time() - t0:.0f} s, loss {res.get('loss')}", flush=True)
    if args.sft_only:
        print(f"SFT export: {export}")
        return
    sft = _eval(str(export), None, examples, plan, "sft", run_dir / "sft_eval" / "results.json")
    summary = {"traces": n_traces, "traces_fit": fit, "seq_len": cfg.data.seq_len, "labels": sorted(labels)}
    for label in sorted(labels):
        b, s = (m["by_label"][label]["mean_response_tokens"] for m in (base, sft))
        summary[label] = {"baseline": b, "sft": s, "ratio": s / b if b else None}
        print(f"{label}: mean response tokens baseline {b:.1f}, SFT {s:.1f}, ratio {s / b:.2f}")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
