"""`safer-jax` command line: thin wrappers over the library.

Run `safer-jax --help`; each subcommand documents its own flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from safer_jax.models.embedded import smollm2_location


def _load_tokenizer(path: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    from safer_jax.models.hf_io import resolve_path

    return AutoTokenizer.from_pretrained(str(resolve_path(path, gguf_file)), gguf_file=gguf_file)


def cmd_convert(args: argparse.Namespace) -> int:
    from safer_jax.models import from_pretrained, save_pretrained

    t0 = time.time()
    model = from_pretrained(args.src, gguf_file=args.gguf_file, dtype=args.dtype)
    tok = _load_tokenizer(args.src, args.gguf_file)
    out = save_pretrained(model, args.to, tokenizer=tok, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"wrote {out} ({model.config.model_type}, {model.config.num_params() / 1e6:.1f}M params, "
          f"{time.time() - t0:.1f}s)")
    return 0


def _chat_once(model, tok, prompt: str, max_new_tokens: int) -> str:
    from safer_jax.generate import greedy_generate

    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    eos = {tok.eos_token_id, *model.config.eos_token_id} - {None}
    out = greedy_generate(model, ids, max_new_tokens, eos_ids=tuple(eos))
    return tok.decode(out, skip_special_tokens=True)


def cmd_chat(args: argparse.Namespace) -> int:
    from safer_jax.models import from_pretrained

    if args.model:
        path, gguf = args.model, args.gguf_file
    else:
        folder, gguf = smollm2_location()
        path = str(folder)
    model = from_pretrained(path, gguf_file=gguf)
    tok = _load_tokenizer(path, gguf)
    prompts = args.prompt or []
    if prompts:
        for p in prompts:
            print(f">>> {p}\n{_chat_once(model, tok, p, args.max_new_tokens)}\n")
        return 0
    while True:
        try:
            p = input(">>> ")
        except EOFError:
            return 0
        if p.strip():
            print(_chat_once(model, tok, p, args.max_new_tokens))


def cmd_demo(args: argparse.Namespace) -> int:
    """Until the full demo lands: the embedded default model answers one chat prompt."""
    from safer_jax.models import from_pretrained

    folder, gguf = smollm2_location()
    print(f"loading SmolLM2-135M-Instruct from {folder / gguf} ...", flush=True)
    t0 = time.time()
    model = from_pretrained(str(folder), gguf_file=gguf)
    tok = _load_tokenizer(str(folder), gguf)
    print(f"loaded in {time.time() - t0:.1f}s; {model.config.num_params() / 1e6:.0f}M parameters", flush=True)
    for p in args.prompt or ["What is the capital of France?"]:
        t0 = time.time()
        print(f">>> {p}\n{_chat_once(model, tok, p, args.max_new_tokens)}\n({time.time() - t0:.1f}s)", flush=True)
    return 0


def _rules(path: str | None):
    from safer_jax.data.rules import load_rules

    return load_rules(path)


def cmd_synthesize(args: argparse.Namespace) -> int:
    from safer_jax.data.records import SkipReport
    from safer_jax.data.synthesis import LocalTeacher, OpenAITeacher, TemplateTeacher, load_prompts, synthesize

    rules = _rules(args.rules)
    report = SkipReport()
    prompts = load_prompts(args.prompts, rules, skip_invalid=args.skip_invalid, report=report)
    if args.teacher == "template":
        teacher = TemplateTeacher(rules, seed=args.seed)
    elif args.teacher == "openai":
        if not args.base_url or not args.model:
            raise ValueError("--teacher openai needs --base-url and --model")
        import os

        teacher = OpenAITeacher(rules, args.base_url, args.model, api_key=os.environ.get(args.api_key_env),
                                max_retries=args.max_retries, timeout=args.timeout, rate_limit=args.rate_limit)
    else:
        if not args.model:
            raise ValueError("--teacher local needs --model (a model folder)")
        teacher = LocalTeacher(rules, args.model, gguf_file=args.gguf_file)
    res = synthesize(prompts, teacher, rules, args.out, rejects=args.rejects, concurrency=args.concurrency)
    print(f"wrote {res.written} traces, {res.rejected} rejects; {res.skipped_done} already done")
    if report.total:
        print(report.summary())
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    kinds: dict[str, int] = {}
    for p in pairs:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    print(f"wrote {len(pairs)} pairs from {len(traces)} traces to {out}: {kinds}")
    if report.total:
        print(report.summary())
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from safer_jax.config import SFTConfig, load_config
    from safer_jax.training.run import TrainingStopped
    from safer_jax.training.sft_loop import train_sft

    cfg = load_config(SFTConfig, args.config, args.overrides)
    try:
        res = train_sft(cfg)
    except TrainingStopped as e:
        print(f"safer-jax sft: stopped: {e}", file=sys.stderr)
        return 3
    if res.get("preempted"):
        print(f"preempted at step {res['step']}; checkpoint saved")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from safer_jax.training.export import export_checkpoint

    out = export_checkpoint(args.run_dir, args.to, step=args.step, overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote {out}")
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
    ch.add_argument("--model", default=None)
    ch.add_argument("--gguf-file", default=None)
    ch.add_argument("--prompt", action="append", help="answer these prompts and exit")
    ch.add_argument("--max-new-tokens", type=int, default=128)
    ch.set_defaults(fn=cmd_chat)

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
    sy.set_defaults(fn=cmd_synthesize)

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

    ex = sub.add_parser("export", help="export a run's checkpoint to a HF folder")
    ex.add_argument("run_dir")
    ex.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    ex.add_argument("--to", required=True)
    ex.add_argument("--dtype", default=None, help="parameter dtype written (default: the run's)")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(fn=cmd_export)

    d = sub.add_parser("demo", help="the embedded default end to end")
    d.add_argument("--prompt", action="append")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.set_defaults(fn=cmd_demo)
    return p


def _maybe_init_distributed() -> None:
    """Multi-host runs (TPU pods, multi-node GPU): SAFER_JAX_DISTRIBUTED=1 calls
    jax.distributed.initialize(), which reads the coordinator from the environment
    (Cloud TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
    import os

    if os.environ.get("SAFER_JAX_DISTRIBUTED") == "1":
        import jax

        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _maybe_init_distributed()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # our errors name the file and key: no traceback
        print(f"safer-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
