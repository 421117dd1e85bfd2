"""Tiny models of each supported chat family, with that family's special tokens and a chat
template (`tests/templates/*.jinja`) that behaves like the one published with its instruct
models. Built once per test session (`family_models` in conftest.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
)


@dataclasses.dataclass(frozen=True)
class ChatFamily:
    name: str
    model_type: str  # our decoder family
    template: str  # file under tests/templates
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    end_of_turn: str  # the token the template writes after an assistant turn
    post_bos: bool = False  # the tokenizer adds BOS itself (add_special_tokens=True), like Llama's
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)
    config_eos: tuple[str, ...] = ()  # config.json eos ids (default: eos)
    generation_eos: tuple[str, ...] = ()  # generation_config.json eos ids (none if empty)

    @property
    def chat_template(self) -> str:
        return (TEMPLATES / self.template).read_text()


FAMILIES = {
    "llama3.1": ChatFamily(
        "llama3.1",
        "llama",
        "llama3.1.jinja",
        LLAMA3_SPECIALS,
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        "<|eot_id|>",
        post_bos=True,
        config_eos=("<|end_of_text|>",),
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
    ),
    "llama3.2": ChatFamily(
        "llama3.2",
        "llama",
        "llama3.2.jinja",
        LLAMA3_SPECIALS,
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        "<|eot_id|>",
        post_bos=True,
        config_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
    ),
    "mistral": ChatFamily(
        "mistral",
        "mistral",
        "mistral-v0.3.jinja",
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        "<s>",
        "</s>",
        None,
        "</s>",
        post_bos=True,
    ),
    "qwen2.5": ChatFamily(
        "qwen2.5",
        "qwen2",
        "qwen2.5.jinja",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
    "qwen3": ChatFamily(
        "qwen3",
        "qwen3",
        "qwen3.jinja",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
        added=("<think>", "</think>"),
    ),
}


def family_tokenizer(fam: ChatFamily, texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `texts` with the family's special tokens and template."""
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing

    from safer_jax.models.tiny import build_tokenizer

    tok = build_tokenizer(
        texts, vocab_size, specials=fam.specials, bos=fam.bos, eos=fam.eos, pad=fam.pad, chat_template=fam.chat_template
    )
    if fam.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam.added])
    if fam.post_bos:
        bos_id = tok.convert_tokens_to_ids(fam.bos)
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, bos_id)]
        )
    return tok


def build_family_model(fam: ChatFamily, folder: Path, texts: list[str], num_layers: int = 1) -> Path:
    """A random decoder of the family's architecture (one layer: these models test templates and
    the CLI, and each layer's kernels cost compile time), its tokenizer and generation config."""
    from safer_jax.models.tiny import build_tiny_model

    tok = family_tokenizer(fam, texts)
    ids = lambda names: [tok.convert_tokens_to_ids(n) for n in names]  # noqa: E731
    gen = {"eos_token_id": ids(fam.generation_eos)} if fam.generation_eos else None
    if gen and fam.bos:
        gen["bos_token_id"] = tok.convert_tokens_to_ids(fam.bos)
    # one vocabulary size for all, the session `tiny` model's: families of one architecture, and
    # `configs/*/tiny.yaml` on the `tiny` model, compile to the same programs (a cache hit, not a compile)
    return build_tiny_model(
        folder,
        texts,
        family=fam.model_type,
        tokenizer=tok,
        eos_token_ids=ids(fam.config_eos or (fam.eos,)),
        generation_config=gen,
        pad_vocab_to=2048,
        num_layers=num_layers,
    )
