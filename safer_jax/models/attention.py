"""Attention: one function, backends chosen by name, all taking indices and segment ids.

The mask is causal by token index, restricted to the same segment (segment id 0 is padding
and is never attended to), and optionally to a sliding window (`q - kv < window`, as
transformers). Fully masked query rows (padding) get finite scores, so no NaN appears.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def attention_mask(
    q_segment_ids: jax.Array,  # [B, T]
    kv_segment_ids: jax.Array,  # [B, S]
    q_index: jax.Array,  # [B, T]
    kv_index: jax.Array,  # [B, S]
    window: jax.Array | int = 0,
) -> jax.Array:
    """Boolean `[B, T, S]`: may query t attend to key s."""
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    mask = causal & same
    window = jnp.asarray(window)
    in_window = (q_index[:, :, None] - kv_index[:, None, :]) < window
    return mask & ((window <= 0) | in_window)


def _xla_attention(q, k, v, mask):
    """Reference backend: explicit einsums, softmax in float32 (what CPU tests run)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # softmax in float32 at least
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=acc)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def _jax_attention(q, k, v, mask, implementation=None):
    """`jax.nn.dot_product_attention` (XLA everywhere; `cudnn` picks the fused GPU kernel)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation=implementation)


ATTENTION_BACKENDS: dict[str, Callable] = {
    "xla": _xla_attention,
    "jax": _jax_attention,
    "cudnn": lambda q, k, v, mask: _jax_attention(q, k, v, mask, implementation="cudnn"),
}


HARDWARE = {"cudnn": ("gpu",), "splash": ("tpu",)}  # backends that need an accelerator, and which


def require_hardware(backend: str, platform: str | None = None) -> None:
    """Raise a clear error for an unknown backend, or one whose hardware is absent."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose from {sorted(ATTENTION_BACKENDS)}")
    platform = platform or jax.default_backend()
    if backend in HARDWARE and platform not in HARDWARE[backend]:
        raise ValueError(f"attention backend {backend!r} needs a {' or '.join(HARDWARE[backend]).upper()}; "
                         f"this process runs on {platform!r} (use attention 'xla' here)")


def attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_index: jax.Array,
    kv_index: jax.Array,
    window: jax.Array | int = 0,
    backend: str = "xla",
) -> jax.Array:
    """Grouped-query attention `[B, T, N, H]`; K must divide N."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose from {sorted(ATTENTION_BACKENDS)}")
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index, window)
    return ATTENTION_BACKENDS[backend](q, k, v, mask)
