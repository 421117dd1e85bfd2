"""Flax NNX decoders loaded from and exported to Hugging Face weights."""

from safer_jax.models.config import FAMILIES, DecoderConfig, ModelConfigError, from_hf_config, to_hf_config
from safer_jax.models.decoder import Decoder
from safer_jax.models.hf_io import (
    CheckpointError,
    abstract_model,
    from_pretrained,
    param_shardings,
    save_pretrained,
)

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "Decoder",
    "DecoderConfig",
    "ModelConfigError",
    "abstract_model",
    "from_hf_config",
    "from_pretrained",
    "param_shardings",
    "save_pretrained",
    "to_hf_config",
]
