"""Tiny models built offline: a byte-level BPE tokenizer with a ChatML template trained on
given texts, and a random decoder, written as a HF folder. For `tiny.yaml`, tests and
`demo --quick`: runs in seconds, no hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` (ChatML) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    return fast


def build_tiny_model(out_dir: str | Path, texts: Iterable[str], family: str = "llama", vocab_size: int = 2048,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     intermediate_size: int = 128, seed: int = 0) -> Path:
    """Write a random `family` decoder and its tokenizer to `out_dir` (a HF folder)."""
    from flax import nnx

    from safer_jax.models.config import FAMILIES, DecoderConfig
    from safer_jax.models.decoder import Decoder
    from safer_jax.models.hf_io import save_pretrained

    if family not in FAMILIES:
        raise ValueError(f"family {family!r} unknown; choose from {sorted(FAMILIES)}")
    tok = build_tokenizer(texts, vocab_size)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = DecoderConfig(
        model_type=family, vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        max_position_embeddings=4096, tie_word_embeddings=True, qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3", bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=(eos,),
        pad_token_id=tok.pad_token_id)
    with nnx.use_eager_sharding(False):
        model = Decoder(cfg, rngs=nnx.Rngs(seed))
    return save_pretrained(model, out_dir, tokenizer=tok, overwrite=True)
