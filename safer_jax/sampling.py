"""Logits filters and the token draw of the sampler, as pure functions on `[B, V]` logits.

Same rules and order as transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and
`TopPLogitsWarper` (the tests compare them on random logits), so a sampling config means
the same thing in both libraries.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Sampler(NamedTuple):
    """The static (compile-time) part of a SamplingConfig."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit), applied before any filter


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Logits `[B, V]` below the k-th largest set to -inf (ties with it kept, as transformers)."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter `[B, V]`: drop the least likely tokens whose cumulative mass is <= 1 - p.

    Same rule as transformers' `TopPLogitsWarper`: ascending sort, cumulative softmax, the
    most likely token always kept.
    """
    order = jnp.argsort(logits, axis=-1)  # ascending
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - p).at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)  # back to vocab order
    return jnp.where(remove, -jnp.inf, logits)


def process_logits(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """Temperature, then top-k, then top-p (transformers' order); `[B, V]` float32."""
    if sampler.temperature != 1.0:
        logits = logits / sampler.temperature
    if sampler.top_k > 0:
        logits = top_k_filter(logits, sampler.top_k)
    if sampler.top_p < 1.0:
        logits = top_p_filter(logits, sampler.top_p)
    return logits


def sample_tokens(logits: jax.Array, key: jax.Array, sampler: Sampler) -> jax.Array:
    """Next tokens `[B]` int32 from logits `[B, V]` (plus the sampler's logit bias)."""
    if sampler.logit_bias:
        ids = jnp.asarray([i for i, _ in sampler.logit_bias], jnp.int32)
        logits = logits.at[:, ids].add(jnp.asarray([v for _, v in sampler.logit_bias], logits.dtype))
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, process_logits(logits, sampler), axis=-1).astype(jnp.int32)
