"""Tiny models built offline: a byte-level BPE tokenizer with a ChatML template trained on
given texts, and a random decoder, written as a HF folder. For `tiny.yaml`, tests and
`demo --quick`: runs in seconds, no hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    specials: Sequence[str] = SPECIALS,
    bos: str | None = "<|im_start|>",
    eos: str = "<|im_end|>",
    pad: str | None = "<|endoftext|>",
    chat_template: str = CHATML,
):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`; by default ChatML (other
    families' special tokens and templates for tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=None)
    fast.chat_template = chat_template
    return fast


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    family: str = "llama",
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    tokenizer: Any = None,
    eos_token_ids: Sequence[int] = (),
    generation_config: dict[str, Any] | None = None,
    pad_vocab_to: int = 0,
) -> Path:
    """Write a random `family` decoder and its tokenizer (default: a ChatML one trained on `texts`)
    to `out_dir` (a HF folder); `eos_token_ids` default to the tokenizer's EOS. `pad_vocab_to`
    gives the embedding more rows than the tokenizer has ids (as real models round their vocabularies)."""
    from flax import nnx

    from safer_jax.models.config import FAMILIES, DecoderConfig
    from safer_jax.models.decoder import Decoder
    from safer_jax.models.hf_io import save_pretrained

    if family not in FAMILIES:
        raise ValueError(f"family {family!r} unknown; choose from {sorted(FAMILIES)}")
    tok = tokenizer if tokenizer is not None else build_tokenizer(texts, vocab_size)
    cfg = DecoderConfig(
        model_type=family,
        vocab_size=max(len(tok), pad_vocab_to),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tuple(eos_token_ids) or (tok.eos_token_id,),
        pad_token_id=tok.pad_token_id,
        generation_config_json=json.dumps(generation_config) if generation_config else "",
    )
    with nnx.use_eager_sharding(False):
        model = Decoder(cfg, rngs=nnx.Rngs(seed))
    return save_pretrained(model, out_dir, tokenizer=tok, overwrite=True)
