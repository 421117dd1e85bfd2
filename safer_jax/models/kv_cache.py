"""The decoder's forward over a preallocated KV cache: prefill and one-token decode.

Cache layout `[L, B, K, S, H]` (layers, batch, kv heads, slots, head dim): kv-head-major, the
layout of attention's batched products, so a step reads each layer's keys and values as they
are stored rather than a transposed copy (`kv_major_attention`). Slot s of every
row holds the key/value of buffer column s. Prompts are LEFT-padded to a common length P,
so every row writes the same slots at each call (prefill: 0..P-1, decode step i: P+i) and
one `dynamic_update_slice` per layer serves the whole batch. `segment_ids [B, S]` marks
the left-padding slots 0 (never attended to); the still-empty slots to the right are masked
by causality (their slot index is past the query's). Sliding windows compare slot indices,
which equal position differences because each row's real tokens are contiguous.

The layer math is the full forward's: `layer_qkv` and `layer_output` from `decoder.py`;
only the cache write and the attention over the cache are new here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from safer_jax.models.attention import attention_mask, kv_major_attention
from safer_jax.models.config import DecoderConfig
from safer_jax.models.decoder import Decoder, layer_output, layer_qkv, rms_norm
from safer_jax.models.rope import rope_tables
from safer_jax.sharding import constrain, named_sharding

CACHE_AXES = ("layers", "batch", "act_kv_heads", "length", None)


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    segment_ids: jax.Array  # [B, S] int32: 0 = left padding, 1 = a token is or will be there


def cache_shape(cfg: DecoderConfig, batch: int, length: int) -> tuple[int, ...]:
    return (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)


def cache_sharding(cfg: DecoderConfig, mesh: Mesh, batch: int, length: int):
    """Batch on ("data", "fsdp"), kv heads on "tensor" where it divides them."""
    return named_sharding(mesh, CACHE_AXES, cache_shape(cfg, batch, length))


def init_cache(
    cfg: DecoderConfig,
    segment_ids: jax.Array,  # [B, S] 0 on left-padding slots
    mesh: Mesh | None = None,
) -> KVCache:
    """An empty cache (zeros, compute dtype) for `segment_ids.shape` = (batch, slots)."""
    b, s = segment_ids.shape
    zeros = constrain(jnp.zeros(cache_shape(cfg, b, s), jnp.dtype(cfg.dtype)), mesh, CACHE_AXES)
    return KVCache(zeros, zeros, jnp.asarray(segment_ids, jnp.int32))


def _cached_layer(cfg, mesh, p, x, sin, cos, k_all, v_all, layer, start, q_seg, kv_seg, q_idx, kv_idx, window):
    """One block: write this call's k/v at slots [start, start+T) of layer `layer`, attend to the cache."""
    w = {name: value.astype(x.dtype) for name, value in p.items()}
    q, k, v = layer_qkv(cfg, mesh, w, x, sin, cos)  # q [B, T, N, H]; k, v [B, T, K, H]
    at = (layer, 0, 0, start, 0)
    k, v = (a.transpose(0, 2, 1, 3)[None] for a in (k, v))  # [1, B, K, T, H]
    k_all = constrain(jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), at), mesh, CACHE_AXES)
    v_all = constrain(jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), at), mesh, CACHE_AXES)
    k_l = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(x.dtype)  # [B, K, S, H]
    v_l = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(x.dtype)
    o = kv_major_attention(q, k_l, v_l, attention_mask(q_seg, kv_seg, q_idx, kv_idx, window))
    return layer_output(cfg, mesh, w, x, o), k_all, v_all


def forward_cached(
    model: Decoder,
    input_ids: jax.Array,  # [B, T] tokens for slots [start, start + T)
    positions: jax.Array,  # [B, T] rope positions (0 at each row's first real token)
    start: jax.Array | int,  # scalar: the slot of column 0, the same for every row
    cache: KVCache,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """Final-normed hidden states `[B, T, D]` and the cache with these T slots written.

    Prefill is `start=0, T=P`; a decode step is `T=1` at `start=P+i`. Logits: `model.logits(h)`.
    """
    cfg = model.config
    b, t = input_ids.shape
    s = cache.k.shape[3]
    start = jnp.asarray(start, jnp.int32)
    q_idx = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_seg = jax.lax.dynamic_slice_in_dim(cache.segment_ids, start, t, axis=1)
    x = constrain(model.embed_tokens(input_ids), mesh, ("batch", "length", "act_embed"))
    sin, cos = rope_tables(positions, np.asarray(model.inv_freq, np.float32))
    names = model.layers.names
    params = {name: getattr(model.layers, name)[...] for name in names}

    def run(p, x, k_all, v_all, layer, window):
        return _cached_layer(
            cfg, mesh, p, x, sin, cos, k_all, v_all, layer, start, q_seg, cache.segment_ids, q_idx, kv_idx, window
        )

    k_all, v_all = cache.k, cache.v
    if cfg.scan_layers:
        windows = jnp.asarray(cfg.sliding_windows, jnp.int32)
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)

        def body(carry, xs):
            x, k_all, v_all = carry
            p, layer, window = xs
            return run(p, x, k_all, v_all, layer, window), None

        (x, k_all, v_all), _ = jax.lax.scan(body, (x, k_all, v_all), (params, layers, windows))
    else:
        for i in range(cfg.num_layers):
            p = {name: value[i] for name, value in params.items()}
            x, k_all, v_all = run(p, x, k_all, v_all, i, cfg.sliding_windows[i])
    h = rms_norm(x, model.final_norm[...], cfg.rms_norm_eps)
    return h, KVCache(k_all, v_all, cache.segment_ids)
