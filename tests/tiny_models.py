"""Tiny random transformers models of every supported family, saved to a folder (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY_CONFIGS = {
    "llama3": dict(
        model_type="llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        max_position_embeddings=128,
    ),
    "mistral": dict(model_type="mistral", sliding_window=8),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True),
}


def make_tiny(kind: str, folder: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random model of family `kind` with std-0.2 weights and non-trivial norms and biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(FAMILY_CONFIGS[kind])
    model_type = kw.pop("model_type")
    base = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    base.update(overrides)
    cfg = AutoConfig.for_model(model_type, **base)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model
