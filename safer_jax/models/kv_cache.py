"""The decoder's forward over a preallocated KV cache: prefill and one-token decode.

The cache is one key and one value buffer per layer, each `[B, K, S, H]` (batch, kv heads,
slots, head dim), and the cached forward unrolls the layers whatever `scan_layers` says. A
stacked `[L, ...]` cache carried through a layer scan made XLA:CPU copy the whole cache at
every layer of every step: at batch 64 and 640 slots, the attention alone over SmolLM2's 30
layers took 3.2 s a step that way and 0.12 s with a buffer per layer
(docs/benchmarks.md). Per-layer buffers in the decode loop's carry are updated in place (the
loop state is donated). The kv-head-major layout is that of attention's batched products,
so a step reads each layer's keys and values as stored (`kv_major_attention`).

Slot s of every row holds the key/value of buffer column s. Prompts are LEFT-padded to a
common length P, so every row writes the same slots at each call (prefill: 0..P-1, decode
step i: P+i) and one `dynamic_update_slice` per layer serves the whole batch.
`segment_ids [B, S]` marks the left-padding slots 0 (never attended to); the still-empty
slots to the right are masked by causality (their slot index is past the query's). Sliding
windows compare slot indices, which equal position differences because each row's real
tokens are contiguous.

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

CACHE_AXES = ("batch", "act_kv_heads", "length", None)  # of each layer's [B, K, S, H] buffer


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer [B, K, S, H]
    v: tuple[jax.Array, ...]  # per layer [B, K, S, H]
    segment_ids: jax.Array  # [B, S] int32: 0 = left padding, 1 = a token is or will be there

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]


def cache_shape(cfg: DecoderConfig, batch: int, length: int) -> tuple[int, ...]:
    """The shape of one layer's key (or value) buffer."""
    return (batch, cfg.num_kv_heads, length, cfg.head_dim)


def cache_sharding(cfg: DecoderConfig, mesh: Mesh, batch: int, length: int):
    """Of each layer's buffer: batch on ("data", "fsdp"), kv heads on "tensor" where it divides them."""
    return named_sharding(mesh, CACHE_AXES, cache_shape(cfg, batch, length))


def init_cache(
    cfg: DecoderConfig,
    segment_ids: jax.Array,  # [B, S] 0 on left-padding slots
    mesh: Mesh | None = None,
) -> KVCache:
    """An empty cache (zeros, compute dtype) for `segment_ids.shape` = (batch, slots)."""
    b, s = segment_ids.shape

    def zeros() -> tuple[jax.Array, ...]:
        return tuple(
            constrain(jnp.zeros(cache_shape(cfg, b, s), jnp.dtype(cfg.dtype)), mesh, CACHE_AXES)
            for _ in range(cfg.num_layers)
        )

    return KVCache(zeros(), zeros(), jnp.asarray(segment_ids, jnp.int32))


def _cached_layer(cfg, mesh, p, x, sin, cos, k_cache, v_cache, start, mask):
    """One block: write this call's k/v at slots [start, start+T) of the layer's buffers, attend to them."""
    w = {name: value.astype(x.dtype) for name, value in p.items()}
    q, k, v = layer_qkv(cfg, mesh, w, x, sin, cos)  # q [B, T, N, H]; k, v [B, T, K, H]
    at = (0, 0, start, 0)
    k_cache = constrain(
        jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), at), mesh, CACHE_AXES
    )
    v_cache = constrain(
        jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), at), mesh, CACHE_AXES
    )
    o = kv_major_attention(q, k_cache.astype(x.dtype), v_cache.astype(x.dtype), mask)
    return layer_output(cfg, mesh, w, x, o), k_cache, v_cache


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
    s = cache.slots
    start = jnp.asarray(start, jnp.int32)
    q_idx = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_seg = jax.lax.dynamic_slice_in_dim(cache.segment_ids, start, t, axis=1)
    x = constrain(model.embed_tokens(input_ids), mesh, ("batch", "length", "act_embed"))
    sin, cos = rope_tables(positions, np.asarray(model.inv_freq, np.float32))
    params = {name: getattr(model.layers, name)[...] for name in model.layers.names}
    masks = {
        window: attention_mask(q_seg, cache.segment_ids, q_idx, kv_idx, window)  # [B, T, S]
        for window in sorted(set(cfg.sliding_windows))
    }
    k_all, v_all = list(cache.k), list(cache.v)
    for i in range(cfg.num_layers):  # unrolled: see the module docstring
        p = {name: value[i] for name, value in params.items()}
        x, k_all[i], v_all[i] = _cached_layer(
            cfg, mesh, p, x, sin, cos, k_all[i], v_all[i], start, masks[cfg.sliding_windows[i]]
        )
    h = rms_norm(x, model.final_norm[...], cfg.rms_norm_eps)
    return h, KVCache(tuple(k_all), tuple(v_all), cache.segment_ids)
