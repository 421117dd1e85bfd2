"""Rotary position embeddings (HF "rotate half" layout) with default, linear and llama3 scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.models.config import DecoderConfig


def inv_frequencies(cfg: DecoderConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` (float32), as transformers computes them."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    s = cfg.rope_scaling_dict
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(s["factor"])
    elif kind == "llama3":
        factor = s["factor"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        # wavelengths longer than the original context are slowed by `factor`; short ones kept;
        # the band between is interpolated smoothly (Llama 3.1 paper, section 3.2).
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported")
    return inv


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """sin, cos `[B, T, head_dim]` in float32 for integer positions `[B, T]`."""
    freqs = jnp.einsum("BT,F->BTF", positions.astype(jnp.float32), jnp.asarray(inv_freq))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.sin(emb), jnp.cos(emb)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x `[B, T, N, H]`; sin/cos `[B, T, H]`. x*cos + rotate_half(x)*sin in x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    sin = sin[:, :, None, :].astype(x.dtype)
    cos = cos[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
