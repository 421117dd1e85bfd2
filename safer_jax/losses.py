"""Losses as pure functions on arrays: token log-probs in chunks, masked NLL.

Never imports models: callers pass final hidden states `[B, T, D]` and the output
projection `[D, V]`. Log-probs are computed over sequence chunks under `jax.checkpoint`,
so float32 logits of the whole batch (B*T*V*4 bytes, 4.9 GB for B=2, T=4096, V=151936)
never exist at once, in the forward or the backward pass.

Metrics are (sum, denominator) pairs so gradient accumulation and multi-host means are
exact: divide only after summing every part.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_logps(h: jax.Array, w: jax.Array, targets: jax.Array) -> jax.Array:
    """h [B, C, D], w [D, V], targets [B, C] -> log p(target) [B, C] in float32."""
    logits = jnp.einsum("BCD,DV->BCV", h, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse


def token_logps(hidden: jax.Array, w: jax.Array, targets: jax.Array, chunk_size: int = 512) -> jax.Array:
    """log p(targets) `[B, T]` (float32) from hidden `[B, T, D]` and output weights `[D, V]`.

    The sequence is cut into chunks of `chunk_size`; each chunk's logits are recomputed in
    the backward pass instead of stored (peak extra memory B * chunk * V * 4 bytes).
    """
    b, t, d = hidden.shape
    w = w.astype(hidden.dtype)
    if t <= chunk_size:
        return jax.checkpoint(_chunk_logps)(hidden, w, targets)
    pad = (-t) % chunk_size
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk_size
    hs = hidden.reshape(b, n, chunk_size, d).swapaxes(0, 1)  # [N, B, C, D]
    ts = targets.reshape(b, n, chunk_size).swapaxes(0, 1)  # [N, B, C]
    fn = jax.checkpoint(_chunk_logps)
    out = jax.lax.map(lambda x: fn(x[0], w, x[1]), (hs, ts))  # [N, B, C]
    return out.swapaxes(0, 1).reshape(b, n * chunk_size)[:, :t]


def masked_nll(logps: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over weighted tokens, sum of weights): the mean is their ratio."""
    weights = weights.astype(jnp.float32)
    return -(logps * weights).sum(), weights.sum()
