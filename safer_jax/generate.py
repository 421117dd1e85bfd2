"""Minimal greedy decoding without a KV cache (compiled once per buffer length).

A stop-gap so `safer-jax chat` and the demo can show a model's answer; the batched
KV-cache sampler replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safer_jax.models.decoder import Decoder


def greedy_generate(
    model: Decoder, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy continuation of one prompt; stops at any of `eos_ids`."""
    graphdef, state = nnx.split(model)
    n = len(prompt_ids)
    buf = np.zeros((1, n + max_new_tokens), np.int32)
    buf[0, :n] = prompt_ids

    @jax.jit
    def next_token(state, ids, t):  # ids [1, L]; returns argmax of logits at t - 1
        m = nnx.merge(graphdef, state)
        seg = (jnp.arange(ids.shape[1]) < t).astype(jnp.int32)[None]
        logits = m(ids, segment_ids=seg)
        return jnp.argmax(logits[0, t - 1])

    out: list[int] = []
    for t in range(n, n + max_new_tokens):
        tok = int(next_token(state, jnp.asarray(buf), t))
        out.append(tok)
        buf[0, t] = tok
        if tok in eos_ids:
            break
    return out
