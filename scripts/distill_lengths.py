"""Issue 15 data check: benign/borderline training response length vs the base model's own answers.

    python scripts/distill_lengths.py [--tokens]

Per training prompt, "training" is the bundled trace's final response and "base greedy" is the base
model's greedy answer in `smollm2_answers.jsonl` (512-token budget; an answer cut there counts with
its 512 tokens, a lower bound of its length); "320 tokens" is the first pass of the same greedy answers,
cut at 320 new tokens as issue 15 measured the base model (and as `safer-jax evaluate` does by
default: greedy, 320 new tokens, a cut answer counted as it stands). Rows: every prompt of the label; the prompts whose
greedy answer passed the filter (training = that answer, so the ratio is 1 by construction); the
others (training = the first fit rejection sample from `smollm2_samples.jsonl`, else the template
reference). Words are whitespace-split; `--tokens` adds SmolLM2 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics

from safer_jax.data import bundled
from safer_jax.self_distill import _previous, drop_reason, load_responses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", action="store_true")
    args = ap.parse_args()
    count = [("words", lambda s: len(s.split()))]
    if args.tokens:
        from safer_jax.data.tokenize import load_tokenizer
        from safer_jax.models.embedded import smollm2_location

        folder, gguf = smollm2_location()
        tok = load_tokenizer(str(folder), gguf)
        count.append(("tokens", lambda s: len(tok.encode(s, add_special_tokens=False))))
    traces = {
        t["id"]: t for t in map(json.loads, bundled("train_traces.jsonl").read_text().splitlines()) if t.get("id")
    }
    greedy = {r["id"]: r for r in _previous(bundled("smollm2_answers.jsonl")).values()}
    first: dict[str, dict] = {}  # the first pass (320 tokens): the first line per id
    for line in bundled("smollm2_answers.jsonl").read_text().splitlines():
        r = json.loads(line)
        first.setdefault(r["id"], r)
    fit = load_responses(bundled("smollm2_answers.fit.jsonl"))
    print(
        "| training prompts | n | unit | training response | base greedy, 512 tokens | training / base "
        "| base greedy, 320 tokens | training / base |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label in ("benign", "borderline"):
        ids = sorted(k for k, t in traces.items() if t["label"] == label and k in greedy)
        g_fit = [k for k in ids if drop_reason(greedy[k]) is None]
        rest = [k for k in ids if drop_reason(greedy[k]) is not None]
        rest_sampled = [k for k in rest if k in fit]
        groups = [
            ("all", ids),
            ("greedy answer fit", g_fit),
            ("greedy unfit", rest),
            ("greedy unfit, sample fit", rest_sampled),
            ("greedy unfit, no fit answer (reference kept)", [k for k in rest if k not in fit]),
        ]
        for name, group in groups:
            if not group:
                continue
            for unit, fn in count:
                t = statistics.fmean(fn(traces[k]["response"]) for k in group)
                b = statistics.fmean(fn(greedy[k]["response"]) for k in group)
                b320 = statistics.fmean(fn(first[k]["response"]) for k in group)
                print(
                    f"| {label}: {name} | {len(group)} | {unit} | {t:.1f} | {b:.1f} | {t / b:.2f} "
                    f"| {b320:.1f} | {t / b320:.2f} |"
                )


if __name__ == "__main__":
    main()
