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

    Same rule as transformers' `TopPLogitsWarper` (in ascending order of probability, a token
    goes when the mass up to and including it is <= 1 - p; the most likely token always stays),
    found without sorting: a sort of `[B, V]` costs seconds a decode step on CPU at V = 49152.
    The removed tokens are those below a threshold probability, the smallest probability q
    whose "mass of tokens with probability <= q" exceeds 1 - p. That mass only grows with q,
    so a bisection over the bit patterns of the float32 probabilities (ordered as integers,
    since they are non-negative) finds q exactly in 32 rounds of one `[B, V]` masked sum.
    It differs only at exact ties with q (it keeps every tied token, where transformers' sort
    keeps an order-dependent subset) and where 1 - p falls within a rounding error of a partial
    sum (its masked sums add in another order than transformers' cumsum: one token can flip).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # [B, V], monotone in probs (all >= 0)
    target = 1.0 - p

    def grows(t: jax.Array) -> jax.Array:  # [B]: mass of the tokens with bits <= t exceeds 1 - p
        return jnp.sum(jnp.where(bits <= t[:, None], probs, 0.0), axis=-1) > target

    def bisect(_, lo_hi):  # invariant: grows(hi), not grows(lo)
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = grows(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    top = jnp.max(bits, axis=-1)  # [B] the most likely token; hi only moves down from it, so it stays
    _, hi = jax.lax.fori_loop(0, 32, bisect, (jnp.full_like(top, -1), top))
    return jnp.where(bits < hi[:, None], -jnp.inf, logits)


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
