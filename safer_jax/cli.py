"""`safer-jax` command line: thin wrappers over the library.

Run `safer-jax --help`; each subcommand documents its own flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from safer_jax.paths import as_path


def _load_tokenizer(path: str, gguf_file: str | None):
    from safer_jax.data.tokenize import load_tokenizer

    return load_tokenizer(path, gguf_file)


def _chat_tokenizer(args: argparse.Namespace, path: str, gguf_file: str | None):
    """The shared chat tokenization (template arguments, system prompt) for chat and generate."""
    from safer_jax.data.tokenize import ChatTokenizer

    return ChatTokenizer(_load_tokenizer(path, gguf_file), args.system_prompt, template_kwargs=_template_kwargs(args))


def _template_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    import json

    raw = getattr(args, "chat_template_kwargs", None)
    if not raw:
        return {}
    try:
        kw = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat-template-kwargs: not JSON ({e.msg}): {raw!r}") from None
    if not isinstance(kw, dict):
        raise ValueError(f"--chat-template-kwargs: expected a JSON object, got {raw!r}")
    return kw


def _logit_bias(items: list[str] | None) -> tuple[tuple[int, float], ...]:
    out = []
    for item in items or ():
        tid, sep, val = item.partition("=")
        try:
            out.append((int(tid), float(val)))
        except ValueError:
            raise ValueError(f"--logit-bias {item!r}: expected TOKEN_ID=VALUE, e.g. 2=5.0") from None
        if not sep:
            raise ValueError(f"--logit-bias {item!r}: expected TOKEN_ID=VALUE, e.g. 2=5.0")
    return tuple(out)


def cmd_convert(args: argparse.Namespace) -> int:
    from safer_jax.models import from_pretrained
    from safer_jax.training.export import save_hf

    t0 = time.time()
    model = from_pretrained(args.src, gguf_file=args.gguf_file, dtype=args.dtype)
    tok = _load_tokenizer(args.src, args.gguf_file)
    out = save_hf(model, args.to, tokenizer=tok, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(
        f"wrote {out} ({model.config.model_type}, {model.config.num_params() / 1e6:.1f}M params, "
        f"{time.time() - t0:.1f}s)"
    )
    return 0


def _model_location(model: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """`--model` (a hub id resolved once to its local snapshot), or the embedded SmolLM2-135M-Instruct
    for no model or `smollm2`."""
    from safer_jax.hub import resolve_path
    from safer_jax.models.embedded import smollm2_location

    if model in (None, "smollm2"):
        folder, gguf = smollm2_location()
        return str(folder), gguf
    return str(resolve_path(model, gguf_file)), gguf_file


def _sampling(args: argparse.Namespace):
    """SamplingConfig from the flags: greedy unless a temperature, top-k or top-p is given."""
    from safer_jax.generate import SamplingConfig

    sampled = any(getattr(args, k, None) is not None for k in ("temperature", "top_k", "top_p"))
    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        greedy=getattr(args, "greedy", False) or not sampled,
        temperature=args.temperature if args.temperature is not None else 1.0,
        top_k=args.top_k or 0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        seed=args.seed,
        stop_strings=tuple(args.stop or ()),
        logit_bias=_logit_bias(getattr(args, "logit_bias", None)),
    )


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default without sampling flags)")
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable); EOS ids always stop")
    p.add_argument("--system-prompt", default=None, help="default: the chat template's own")
    p.add_argument(
        "--logit-bias", action="append", metavar="ID=VALUE", help="add VALUE to token ID's logit (repeatable)"
    )
    p.add_argument(
        "--chat-template-kwargs",
        default=None,
        metavar="JSON",
        help="keyword arguments of the chat template, e.g. '{\"enable_thinking\": false}'",
    )


def _chat_once(model, tok, prompt: str, max_new_tokens: int, sampling=None, system_prompt: str | None = None) -> str:
    from safer_jax.generate import SamplingConfig, generate_chat

    sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
    rows = generate_chat(
        model, tok, [{"id": 0, "prompt": prompt}], sampling, system_prompt=system_prompt, progress=False
    )
    return rows[0]["text"]


def cmd_chat(args: argparse.Namespace) -> int:
    from safer_jax.models import from_pretrained

    path, gguf = _model_location(args.model, args.gguf_file)
    model = from_pretrained(path, gguf_file=gguf)
    tok = _chat_tokenizer(args, path, gguf)
    sampling = _sampling(args)
    prompts = args.prompt or []
    if prompts:
        for p in prompts:
            print(f">>> {p}\n{_chat_once(model, tok, p, args.max_new_tokens, sampling, args.system_prompt)}\n")
        return 0
    while True:
        try:
            p = input(">>> ")
        except EOFError:
            return 0
        if p.strip():
            print(_chat_once(model, tok, p, args.max_new_tokens, sampling, args.system_prompt))


def _read_prompt_rows(path: str) -> list[dict]:
    """Rows of a prompts JSONL, each with `prompt` (str) or `messages`; errors name file and line."""
    from safer_jax.data.records import DataError, read_jsonl

    rows = []
    for line, obj in read_jsonl(path):
        if "messages" in obj:
            msgs = obj["messages"]
            if not (
                isinstance(msgs, list)
                and msgs
                and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs
                )
            ):
                raise DataError("must be a non-empty list of {role, content} strings", path, line, "messages")
        elif "prompt" in obj:
            if not isinstance(obj["prompt"], str):
                raise DataError(f"must be a string, got {type(obj['prompt']).__name__}", path, line, "prompt")
        else:
            raise DataError("the row needs 'prompt' (a string) or 'messages' (a chat)", path, line)
        rows.append({**obj, "id": obj.get("id", f"line{line}")})
    return rows


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from safer_jax.generate import generate_chat
    from safer_jax.models import from_pretrained

    rows = _read_prompt_rows(args.prompts)  # before loading the model: bad input fails fast
    path, gguf = _model_location(args.model, args.gguf_file)
    model = from_pretrained(path, gguf_file=gguf)
    tok = _chat_tokenizer(args, path, gguf)
    t0 = time.time()
    results = generate_chat(model, tok, rows, _sampling(args), batch_size=args.batch_size)
    out = as_path(args.out)  # a file path or a bucket URL
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row, res in zip(rows, results):
            f.write(json.dumps({**row, **res}, ensure_ascii=False) + "\n")
    n = sum(r["completion_tokens"] for r in results)
    dt = time.time() - t0
    print(
        f"wrote {len(results)} rows to {out}: {n} new tokens in {dt:.1f}s ({n / max(dt, 1e-9):.1f} tokens/s); "
        f"finish reasons {_finish_counts(results)}"
    )
    return 0


def _finish_counts(rows: list[dict]) -> dict[str, int]:
    """How many rows stopped at an end token (`stop`), at the token limit (`length`), or at a stop string."""
    import collections

    return dict(collections.Counter(str(r.get("finish_reason")) for r in rows))


def cmd_demo(args: argparse.Namespace) -> int:
    """Baseline eval, SFT, preference optimization, eval again and a report, on the embedded default."""
    from safer_jax.demo import run_demo

    run_dir = args.run_dir or ("runs/demo-quick" if args.quick else "runs/demo")
    run_demo(
        run_dir,
        quick=args.quick,
        full=args.full,
        budget_minutes=args.time_budget,
        use_cache=not args.no_cache,
        baseline_only=args.baseline_only,
    )
    return 0


def _rules(path: str | None):
    from safer_jax.data.rules import load_rules

    return load_rules(path)


def cmd_synthesize(args: argparse.Namespace) -> int:
    from safer_jax.data.records import SkipReport
    from safer_jax.data.synthesis import OpenAITeacher, TemplateTeacher, load_prompts, synthesize

    rules = _rules(args.rules)
    report = SkipReport()
    prompts = load_prompts(args.prompts, rules, skip_invalid=args.skip_invalid, report=report)
    if args.teacher == "template":
        teacher = TemplateTeacher(rules, seed=args.seed)
    elif args.teacher == "openai":
        if not args.base_url or not args.model:
            raise ValueError("--teacher openai needs --base-url and --model")
        import os

        teacher = OpenAITeacher(
            rules,
            args.base_url,
            args.model,
            api_key=os.environ.get(args.api_key_env),
            max_retries=args.max_retries,
            timeout=args.timeout,
            rate_limit=args.rate_limit,
        )
    else:
        if not args.model:
            raise ValueError("--teacher local needs --model (a model folder)")
        from safer_jax.teacher_local import LocalTeacher

        teacher = LocalTeacher(rules, args.model, gguf_file=args.gguf_file)
    responses = None
    if args.responses:
        from safer_jax.self_distill import load_responses

        responses = load_responses(args.responses)
    res = synthesize(
        prompts,
        teacher,
        rules,
        args.out,
        rejects=args.rejects,
        concurrency=args.concurrency,
        repair=args.repair,
        responses=responses,
    )
    print(
        f"wrote {res.written} traces ({res.repaired} with a repaired rule title), {res.rejected} rejects; "
        f"{res.skipped_done} already done"
    )
    if report.total:
        print(report.summary())
    return 0


def _process_index() -> int:
    import jax

    return jax.process_index()


def cmd_distill_responses(args: argparse.Namespace) -> int:
    import json

    from safer_jax.self_distill import DISTILL_LABELS, answer_prompts, filter_file, load_responses

    labels = tuple(args.labels.split(",")) if args.labels else DISTILL_LABELS
    rows = []
    with open(args.prompts, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.prompts}:{n}: not JSON ({e})") from None
                if not isinstance(row, dict) or "id" not in row or "prompt" not in row:
                    raise ValueError(f"{args.prompts}:{n}: a row needs 'id' and 'prompt'")
                if row.get("label", labels[0]) in labels:
                    rows.append(row)
    if args.skip_ids:
        skip = set(load_responses(args.skip_ids))
        rows = [r for r in rows if str(r["id"]) not in skip]
    i, n = (int(x) for x in args.shard.split("/"))
    answer_prompts(
        rows[i::n],
        args.out,
        model=args.model,
        backend=args.backend,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        redo_cut=args.redo_cut,
        temperature=args.temperature,
        top_p=args.top_p,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    if args.filtered:
        kept, dropped = filter_file([*(args.prefer or []), args.out], args.filtered)
        print(f"kept {kept} answers in {args.filtered}, dropped {dropped} (reasons in {args.filtered}.dropped.jsonl)")
    return 0


def cmd_make_pairs(args: argparse.Namespace) -> int:
    import json

    from safer_jax.data.pairs import make_pairs
    from safer_jax.data.pipeline import load_traces
    from safer_jax.data.records import SkipReport

    rules = _rules(args.rules)
    report = SkipReport()
    traces = load_traces(args.traces, rules, skip_invalid=args.skip_invalid, report=report)
    pairs = make_pairs(traces, rules, seed=args.seed, span=args.span)
    out = as_path(args.out)
    if _process_index() == 0:  # one writer in a multi-process job; the pairs are the same on every process
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    kinds: dict[str, int] = {}
    for p in pairs:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    print(f"wrote {len(pairs)} pairs from {len(traces)} traces to {out}: {kinds}")
    if report.total:
        print(report.summary())
    return 0


def _train(args: argparse.Namespace, config_cls: type, train: Any) -> int:
    from safer_jax.config import load_config
    from safer_jax.training.run import TrainingStopped

    cfg = load_config(config_cls, args.config, args.overrides)
    try:
        res = train(cfg)
    except TrainingStopped as e:
        print(f"safer-jax {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    if res.get("preempted"):
        print(f"preempted at step {res['step']}; checkpoint saved")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from safer_jax.config import SFTConfig
    from safer_jax.training.sft_loop import train_sft

    return _train(args, SFTConfig, train_sft)


def cmd_prefopt(args: argparse.Namespace) -> int:
    from safer_jax.config import PrefOptConfig
    from safer_jax.training.prefopt_loop import train_prefopt

    return _train(args, PrefOptConfig, train_prefopt)


def cmd_ref_logps(args: argparse.Namespace) -> int:
    from safer_jax.config import PrefOptConfig, load_config
    from safer_jax.training.prefopt_loop import ref_logps_command

    cfg = load_config(PrefOptConfig, args.config, args.overrides)
    logps, where, hit = ref_logps_command(cfg)
    print(f"{'reused' if hit else 'wrote'} reference log-probs of {len(logps)} pairs: {where}")
    return 0


def cmd_rounds(args: argparse.Namespace) -> int:
    """On-policy rounds: sample, judge each step, pair at the first faulty step, train, evaluate."""
    from safer_jax.config import RoundsConfig, load_config
    from safer_jax.rounds import RoundsError, run_rounds

    cfg = load_config(RoundsConfig, args.config, args.overrides)
    try:
        res = run_rounds(cfg)
    except RoundsError as e:
        print(f"safer-jax rounds: error: {e}", file=sys.stderr)
        return 3
    print(f"wrote {res['report']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from safer_jax.training.export import export_checkpoint

    out = export_checkpoint(args.run_dir, args.to, step=args.step, overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Answer eval sets, score refusals and traces, write results.json, report.md and plots to --out."""
    import os

    from safer_jax.evaluation import OpenAIJudge, ScoreOptions, evaluate, load_eval_sets
    from safer_jax.evaluation.sets import parse_columns

    examples = load_eval_sets(args.sets, columns=parse_columns(args.columns), limit=args.limit)
    judge = None
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise ValueError("--judge-url and --judge-model go together")
        judge = OpenAIJudge(args.judge_url, args.judge_model, api_key=os.environ.get(args.judge_api_key_env))
    t0 = time.time()
    res, base, paths = evaluate(
        args.model,
        examples,
        args.out,
        _sampling(args),
        gguf_file=args.gguf_file,
        baseline=args.baseline,
        baseline_gguf_file=args.baseline_gguf_file,
        batch_size=args.batch_size,
        judge=judge,
        system_prompt=args.system_prompt,
        progress=not args.quiet,
        options=ScoreOptions(helpful_min_overlap=args.helpful_min_overlap),
        chat_template_kwargs=_template_kwargs(args),
    )
    for name, r in (("baseline", base), ("model", res)):
        if r is not None:
            m = r.metrics["overall"]
            pct = {
                k: "-" if m[k] is None else f"{100 * m[k]:.1f}%"
                for k in ("harmful_compliance", "over_refusal", "helpfulness", "unfinished_rate")
            }
            print(
                f"{name}: {m['n']} prompts; harmful compliance {pct['harmful_compliance']}, over-refusal "
                f"{pct['over_refusal']}, helpfulness {pct['helpfulness']}, unfinished {pct['unfinished_rate']}; "
                f"finish reasons {_finish_counts(r.rows)}"
            )
    print(f"wrote {paths['report']} and {len(paths) - 1} more files in {time.time() - t0:.1f}s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """JAX step against transformers (+ TRL) in PyTorch on the same work; table and JSON record."""
    from safer_jax.bench import BenchSpec, run_bench, table

    spec = BenchSpec(
        model=args.model,
        task=args.task,
        seq=args.seq,
        batch=args.batch,
        dtype=args.dtype,
        steps=args.steps,
        seed=args.seed,
        lr=args.lr,
        attention=args.attention,
        matmul_dtype=args.matmul_dtype,
        torch_compile=args.torch_compile,
        profile=args.profile or "",
    )
    record = run_bench(spec, with_torch=args.torch, json_path=args.json, command=" ".join(["safer-jax", *sys.argv[1:]]))
    print(table(record))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safer-jax", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log loading progress")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a HF folder, hub id or GGUF file to a plain HF folder")
    c.add_argument("--from", dest="src", required=True, help="HF folder or hub id (with --gguf-file: its folder)")
    c.add_argument("--gguf-file", default=None, help="GGUF file name inside --from")
    c.add_argument("--to", required=True, help="output folder (must be empty unless --overwrite)")
    c.add_argument("--dtype", default="float32", help="parameter dtype written (float32, bfloat16)")
    c.add_argument("--max-shard-size", default="5GiB", help="safetensors shard size, e.g. 2GB")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_convert)

    ch = sub.add_parser("chat", help="talk to a model (default: the embedded SmolLM2-135M-Instruct)")
    ch.add_argument("--model", default=None, help="HF folder or hub id (default or `smollm2`: the embedded model)")
    ch.add_argument("--gguf-file", default=None)
    ch.add_argument("--prompt", action="append", help="answer these prompts and exit")
    _add_sampling_flags(ch, max_new_tokens=128)
    ch.set_defaults(fn=cmd_chat)

    ge = sub.add_parser("generate", help="answer a JSONL of prompts in batches (KV-cache sampler)")
    ge.add_argument("--model", required=True, help="HF folder or hub id; `smollm2`: the embedded model")
    ge.add_argument("--gguf-file", default=None)
    ge.add_argument("--prompts", required=True, help="JSONL rows {id, prompt} or {id, messages}")
    ge.add_argument("--out", required=True, help="JSONL: each input row plus text, reasoning, response, ...")
    ge.add_argument("--batch-size", type=int, default=8)
    _add_sampling_flags(ge, max_new_tokens=256)
    ge.set_defaults(fn=cmd_generate)

    sy = sub.add_parser("synthesize", help="write Ex-Ante traces for labelled prompts with a teacher")
    sy.add_argument("--prompts", required=True, help="JSONL of {id, prompt, label, rules, reference?}")
    sy.add_argument("--rules", default=None, help="rules folder (default: configs/rules)")
    sy.add_argument("--teacher", choices=["template", "openai", "local"], default="template")
    sy.add_argument("--out", required=True)
    sy.add_argument("--rejects", default=None, help="side file of rejects (default: OUT.rejects.jsonl)")
    sy.add_argument("--base-url", default=None, help="openai: e.g. http://127.0.0.1:8000/v1")
    sy.add_argument("--model", default=None, help="openai: model name; local: model folder")
    sy.add_argument("--gguf-file", default=None)
    sy.add_argument("--api-key-env", default="OPENAI_API_KEY")
    sy.add_argument("--concurrency", type=int, default=8)
    sy.add_argument("--max-retries", type=int, default=5)
    sy.add_argument("--timeout", type=float, default=60.0)
    sy.add_argument("--rate-limit", type=float, default=None, help="max requests per second")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--skip-invalid", action="store_true", help="count and skip bad prompt records")
    sy.add_argument(
        "--repair",
        action="store_true",
        help="replace a wrongly cited rule title from the rulebook instead of rejecting the trace",
    )
    sy.add_argument(
        "--responses",
        default=None,
        help="JSONL {id, response} (from `distill-responses --filtered`): "
        "final responses of benign and borderline traces",
    )
    sy.set_defaults(fn=cmd_synthesize)

    dr = sub.add_parser(
        "distill-responses",
        help="the base model answers benign and borderline prompts "
        "(resumable), then refusals, loops and unfinished answers are filtered out",
    )
    dr.add_argument("--prompts", required=True, help="JSONL of {id, prompt, label}")
    dr.add_argument("--out", required=True, help="raw answers, appended as they end; a rerun resumes")
    dr.add_argument("--filtered", default=None, help="also write the answers that pass the filter here")
    dr.add_argument("--model", default="smollm2", help="HF folder or hub id; `smollm2`: the embedded model")
    dr.add_argument("--backend", choices=["torch", "jax"], default="torch")
    dr.add_argument("--labels", default=None, help="comma-separated labels to answer (default: benign,borderline)")
    dr.add_argument("--batch-size", type=int, default=32)
    dr.add_argument("--max-new-tokens", type=int, default=320)
    dr.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy CPU)")
    dr.add_argument(
        "--redo-cut",
        action="store_true",
        help="answer again the rows cut at a smaller --max-new-tokens (their new answer replaces the old one)",
    )
    dr.add_argument("--shard", default="0/1", help="i/n: answer every n-th prompt from the i-th (parallel runs)")
    dr.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: nucleus sampling")
    dr.add_argument("--top-p", type=float, default=1.0)
    dr.add_argument("--num-samples", type=int, default=1, help="samples per prompt (needs --temperature > 0)")
    dr.add_argument("--seed", type=int, default=0)
    dr.add_argument(
        "--skip-ids",
        default=None,
        help="JSONL {id, response}: prompts not to answer (e.g. the fit greedy answers, to rejection-sample the rest)",
    )
    dr.add_argument(
        "--prefer",
        action="append",
        help="raw answers that come before --out as candidates for --filtered (e.g. the greedy pass); repeatable",
    )
    dr.set_defaults(fn=cmd_distill_responses)

    mp = sub.add_parser("make-pairs", help="offline step pairs from traces by controlled corruption")
    mp.add_argument("--traces", required=True)
    mp.add_argument("--rules", default=None)
    mp.add_argument("--out", required=True)
    mp.add_argument("--span", choices=["step", "to_end"], default="step")
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--skip-invalid", action="store_true")
    mp.set_defaults(fn=cmd_make_pairs)

    sf = sub.add_parser("sft", help="supervised fine-tuning on Ex-Ante traces (a run folder that exists resumes)")
    sf.add_argument("--config", default=None, help="configs/sft/NAME.yaml")
    sf.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. run_dir=runs/x train.steps=100")
    sf.set_defaults(fn=cmd_sft)

    po = sub.add_parser("prefopt", help="step-level preference optimization (a run folder that exists resumes)")
    po.add_argument("--config", default=None, help="configs/prefopt/NAME.yaml")
    po.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. preference.loss_type=ipo")
    po.set_defaults(fn=cmd_prefopt)

    rl = sub.add_parser("ref-logps", help="compute (or find) the cached reference log-probs of a prefopt config")
    rl.add_argument("--config", default=None, help="configs/prefopt/NAME.yaml")
    rl.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    rl.set_defaults(fn=cmd_ref_logps)

    ro = sub.add_parser(
        "rounds", help="on-policy step-level preference rounds: sample, judge, pair, train, evaluate (resumes)"
    )
    ro.add_argument("--config", default=None, help="configs/rounds/NAME.yaml")
    ro.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ro.set_defaults(fn=cmd_rounds)

    ex = sub.add_parser("export", help="export a run's checkpoint to a HF folder")
    ex.add_argument("run_dir")
    ex.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    ex.add_argument("--to", required=True)
    ex.add_argument("--dtype", default=None, help="parameter dtype written (default: the run's)")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(fn=cmd_export)

    ev = sub.add_parser("eval", help="safety evaluation: harmful compliance, over-refusal, traces; writes a report")
    ev.add_argument("--model", required=True, help="model folder, hub id, or smollm2 (the embedded default)")
    ev.add_argument("--gguf-file", default=None)
    ev.add_argument(
        "--baseline",
        default=None,
        help="model to compare against (folder, hub id, smollm2) or an earlier results.json / --out",
    )
    ev.add_argument("--baseline-gguf-file", default=None)
    ev.add_argument(
        "--sets",
        nargs="+",
        default=["bundled"],
        help="bundled, PRESET=PATH (advbench, harmbench, strongreject, xstest, jbb, jbb_benign) or NAME=PATH[:preset]",
    )
    ev.add_argument(
        "--columns",
        default=None,
        help="column overrides for file sets, e.g. prompt=question,label=y,default_label=harmful",
    )
    ev.add_argument("--limit", type=int, default=None, help="at most N prompts per set, stratified by label")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    ev.add_argument("--judge-model", default=None)
    ev.add_argument("--judge-api-key-env", default="OPENAI_API_KEY")
    ev.add_argument("--out", required=True, help="output folder (results.json, report.md, *.png)")
    ev.add_argument(
        "--helpful-min-overlap",
        type=float,
        default=0.0,
        help="benign answers count as helpful only with this ROUGE-L recall of the reference (0: answered)",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_sampling_flags(ev, 256)
    ev.set_defaults(fn=cmd_eval)

    be = sub.add_parser("bench", help="throughput: the JAX step against PyTorch (transformers, TRL) on the same work")
    be.add_argument(
        "--model",
        default="tiny",
        help="tiny, smollm2, llama3.2-1b, qwen2.5-1.5b, llama3.1-8b (random weights) or a HF folder",
    )
    be.add_argument("--task", default="sft", help="sft or prefopt (sigmoid DPO, frozen reference)")
    be.add_argument("--seq", type=int, default=512)
    be.add_argument("--batch", type=int, default=4, help="rows (sft) or pairs (prefopt) per step")
    be.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16 (float32 parameters)")
    be.add_argument(
        "--matmul-dtype",
        default=None,
        help="JAX matmul operand dtype (bfloat16: bf16 products, float32 accumulation; default: --dtype)",
    )
    be.add_argument("--steps", type=int, default=4, help="steps per side; step 1 is the untimed warm-up")
    be.add_argument("--torch", action="store_true", help="also run the PyTorch eager baseline")
    be.add_argument("--torch-compile", action="store_true", help="the PyTorch baseline under torch.compile")
    be.add_argument("--attention", default="xla", help="JAX attention backend: xla, jax, cudnn (GPU), splash (TPU)")
    be.add_argument("--profile", default=None, metavar="DIR", help="write a jax.profiler trace and the compiled HLO")
    be.add_argument("--json", default=None, metavar="FILE", help="write the record here")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--lr", type=float, default=1e-4)
    be.set_defaults(fn=cmd_bench)

    d = sub.add_parser("demo", help="align the embedded default end to end: eval, SFT, preference, eval, report")
    d.add_argument("--run-dir", default=None, help="run folder (default runs/demo; an existing one resumes)")
    d.add_argument("--quick", action="store_true", help="the same pipeline on a tiny random model (minutes)")
    d.add_argument("--full", action="store_true", help="all bundled data and eval prompts (hours on CPU)")
    d.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="wall time of the stages: each gets a share, training runs until its share is spent "
        "(default 30; 3 with --quick)",
    )
    d.add_argument(
        "--no-cache", action="store_true", help="recompute the baseline evaluation instead of using its cached result"
    )
    d.add_argument("--baseline-only", action="store_true", help="evaluate the baseline (filling the cache) and stop")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from safer_jax.distributed import DistributedError, initialize

    try:
        initialize(log=lambda m: print(m, flush=True))  # SAFER_JAX_DISTRIBUTED=1: join the job first
    except DistributedError as e:
        print(f"safer-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.fn(args)
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # our errors name the file and key: no traceback
        print(f"safer-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from safer_jax.runtime_env import console_entry

    console_entry()
