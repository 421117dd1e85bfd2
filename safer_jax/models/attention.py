"""Attention: one function, backends chosen by name, all taking indices and segment ids.

The mask is causal by token index, restricted to the same segment (segment id 0 is padding
and is never attended to), and optionally to a sliding window (`q - kv < window`, as
transformers). Fully masked query rows (padding) get finite scores, so no NaN appears.

Backends:
- `xla` (the reference, what CPU tests run) and `jax` (`jax.nn.dot_product_attention`'s
  XLA path) take the dense `[B, T, S]` mask.
- `cudnn` (GPU): `jax.nn.dot_product_attention(implementation="cudnn")` with cuDNN's causal
  mask type (the upper triangle is never computed), the rows' real lengths as
  `query_seq_lengths` / `key_value_seq_lengths` (padding skipped) and the window as
  `local_window_size`. The public API has no segment ids, so packed rows (several segments)
  add a same-segment mask, which cuDNN applies as a bias; `cudnn_rows` omits it, for
  batches of one segment a row (preference pairs, unpacked SFT).
- `splash` (TPU): Pallas splash attention, a causal (or local, for a window) lazy mask with
  segment ids, grouped-query heads as its MQA kernel vmapped over kv heads. On CPU it runs in
  Pallas interpret mode (tests), never for speed.

On XLA:CPU with one device the decoder passes `cpu_layout=True`: the `xla` backend's values
with a hand-written backward whose products need no transposed copy of the `[G*T, S]`
scores (`_cpu_attention_bwd`; the profile in docs/benchmarks.md), computed in causal blocks of
query rows that skip the keys after the block (`CPU_QUERY_BLOCK`).

The fused backends serve the training forward (`T == S`, index = position in the row, as
`Decoder.hidden_states` passes it). The KV cache's prefill and decode steps run
`kv_major_attention`, the `xla` path's math over the cache's `[B, K, S, H]` layout, whatever
the backend.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What a backend may use besides q, k, v: segment ids, indices `[B, T]` / `[B, S]`, window."""

    q_segment_ids: jax.Array
    kv_segment_ids: jax.Array
    q_index: jax.Array
    kv_index: jax.Array
    window: jax.Array | int

    def mask(self) -> jax.Array:
        return attention_mask(self.q_segment_ids, self.kv_segment_ids, self.q_index, self.kv_index, self.window)

    def static_window(self) -> int | None:
        """The window as a Python int (0 = none), or None when it is traced (scanned layers)."""
        if isinstance(self.window, int):
            return self.window
        try:
            return int(self.window)
        except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            return None


def _xla_attention(q, k, v, inp: AttentionInputs):
    """Reference backend: explicit einsums, softmax in float32 (what CPU tests run)."""
    mask = inp.mask()
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # softmax in float32 at least
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=acc)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def _grouped(x: jax.Array, kv: int) -> jax.Array:
    """`[B, T, N, H]` -> `[B, K, G*T, H]`: each kv head's query group as one row block."""
    b, t, n, h = x.shape
    return x.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, n // kv * t, h)


def _ungrouped(x: jax.Array, t: int) -> jax.Array:
    """`[B, K, G*T, H]` -> `[B, T, N, H]` (inverse of `_grouped`)."""
    b, kv, gt, h = x.shape
    return x.reshape(b, kv, gt // t, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, kv * (gt // t), h)


def _kv_major_parts(q, kt, vt, mask):
    """Attention of q `[B, T, N, H]` over kv-head-major keys and values `[B, K, S, H]`."""
    b, t, n, h = q.shape
    kv = kt.shape[1]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qg = _grouped(q, kv)  # [B, K, G*T, H]
    m = jnp.broadcast_to(mask[:, None, None], (b, 1, n // kv, t, mask.shape[-1])).reshape(b, 1, n // kv * t, -1)
    scores = jnp.einsum("BKMH,BKSH->BKMS", qg, kt, preferred_element_type=acc) * (h**-0.5)  # [B, K, G*T, S]
    probs = jax.nn.softmax(jnp.where(m, scores, jnp.finfo(acc).min), axis=-1).astype(vt.dtype)
    out = _ungrouped(jnp.einsum("BKMS,BKSH->BKMH", probs, vt), t)
    return out, (qg, kt, vt, probs, m)


def _cpu_parts(q, k, v, mask):
    return _kv_major_parts(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)  # k, v -> [B, K, S, H]


def kv_major_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, K, S, H] kv-head-major, as the KV cache stores them
    v: jax.Array,  # [B, K, S, H]
    mask: jax.Array,  # [B, T, S] bool, from `attention_mask`
) -> jax.Array:
    """The `xla` backend's attention `[B, T, N, H]` over keys and values laid out `[B, K, S, H]`:
    the KV-cache forward's, whose batched products then read the cache as it is stored
    instead of a transposed copy of it per layer and step."""
    return _kv_major_parts(q, k, v, mask)[0]


@jax.custom_vjp
def _cpu_attention_core(q, k, v, mask):
    return _cpu_parts(q, k, v, mask)[0]


def _cpu_attention_fwd(q, k, v, mask):
    return _cpu_parts(q, k, v, mask)


def _cpu_attention_bwd(res, dout):
    """The softmax-attention backward with every product in a form YNNPACK takes as it is: the
    key and value gradients as `q^T @ dS` and `dO^T @ P` with the small `[H, G*T]` sides
    written transposed, where autodiff's form makes XLA:CPU write the `[G*T, S]` score
    gradient and probabilities transposed."""
    qg, kt, vt, probs, m = res
    t, h = dout.shape[1], qg.shape[-1]
    acc = jnp.promote_types(qg.dtype, jnp.float32)
    do = _grouped(dout, kt.shape[1])  # [B, K, G*T, H]
    dp = jnp.einsum("BKMH,BKSH->BKMS", do, vt, preferred_element_type=acc)
    pf = probs.astype(acc)
    ds = jnp.where(m, pf * (dp - jnp.sum(dp * pf, axis=-1, keepdims=True)), 0) * (h**-0.5)
    ds = ds.astype(qg.dtype)  # [B, K, G*T, S]
    dq = _ungrouped(jnp.einsum("BKMS,BKSH->BKMH", ds, kt), t)
    qt = jax.lax.optimization_barrier(qg.transpose(0, 1, 3, 2))  # [B, K, H, G*T]
    dot = jax.lax.optimization_barrier(do.transpose(0, 1, 3, 2))
    dk = jnp.einsum("BKHM,BKMS->BKHS", qt, ds).transpose(0, 3, 1, 2)  # [B, S, K, H]
    dv = jnp.einsum("BKHM,BKMS->BKHS", dot, probs).transpose(0, 3, 1, 2)
    return dq.astype(qg.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), None


_cpu_attention_core.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


CPU_QUERY_BLOCK = 128  # query rows per block of the CPU path (0 = one block)


def _cpu_attention(q, k, v, inp: AttentionInputs):
    """The `xla` backend's values with a hand-written backward laid out for XLA:CPU (one device).

    Block-causal: query rows `[a, b)` attend keys `[0, b)` only, so the fully masked upper
    blocks of `[T, S]` are never formed (at T = 512 in blocks of 128, 10 of 16 blocks: 37.5%
    less score work, forward and backward). This needs what the decoder passes, `T == S`
    and index = position in the row, where no query attends a later row."""
    mask = inp.mask()
    t, blk = q.shape[1], CPU_QUERY_BLOCK
    if t != k.shape[1] or blk <= 0 or t <= blk:
        return _cpu_attention_core(q, k, v, mask)
    outs = []
    for a in range(0, t, blk):
        b = min(a + blk, t)
        outs.append(_cpu_attention_core(q[:, a:b], k[:, :b], v[:, :b], mask[:, a:b, :b]))
    return jnp.concatenate(outs, axis=1)


def _jax_attention(q, k, v, inp: AttentionInputs):
    """`jax.nn.dot_product_attention`'s XLA path with the dense mask."""
    return jax.nn.dot_product_attention(q, k, v, mask=inp.mask()[:, None, :, :])


def cudnn_arguments(inp: AttentionInputs, packed: bool = True) -> dict[str, Any]:
    """Keyword arguments of `jax.nn.dot_product_attention` for the cuDNN kernel: causal mask
    type, real row lengths (padding is segment 0 at the end of a row), the window, and with
    `packed` a same-segment mask `[B, 1, T, S]` for rows that hold several segments."""
    window = inp.static_window()
    if window is None:
        raise ValueError(
            "attention 'cudnn' needs a static sliding window: set model.scan_layers=false for "
            "models whose layers use different windows"
        )
    kw: dict[str, Any] = {
        "is_causal": True,
        "query_seq_lengths": (inp.q_segment_ids != 0).sum(-1).astype(jnp.int32),
        "key_value_seq_lengths": (inp.kv_segment_ids != 0).sum(-1).astype(jnp.int32),
    }
    if window > 0:
        kw["local_window_size"] = (window - 1, 0)  # q - kv < window: window - 1 keys to the left
    if packed:
        kw["mask"] = (inp.q_segment_ids[:, :, None] == inp.kv_segment_ids[:, None, :])[:, None]
    return kw


def _cudnn_attention(q, k, v, inp: AttentionInputs, packed: bool = True, implementation: str | None = "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **cudnn_arguments(inp, packed))


def _splash_kernel(t: int, heads: int, window: int, interpret: bool) -> Any:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window > 0:
        one = sa.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    else:
        one = sa.CausalMask((t, t))
    block = min(512, t)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sa.make_splash_mqa_single_device(sa.MultiHeadMask([one] * heads), block_sizes=sizes, interpret=interpret)


def _splash_attention(q, k, v, inp: AttentionInputs, interpret: bool | None = None):
    """Splash attention: per example and kv head, the MQA kernel over that head's query group."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    window = inp.static_window()
    if window is None:
        raise ValueError(
            "attention 'splash' needs a static sliding window: set model.scan_layers=false for "
            "models whose layers use different windows"
        )
    b, t, n, h = q.shape
    kv = k.shape[2]
    if t % 128 and t > 128:
        raise ValueError(f"attention 'splash': sequence length {t} must be a multiple of 128")
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    kernel = _splash_kernel(t, n // kv, window, interpret)
    qg = (q * (h**-0.5)).reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]

    def one(qe, ke, ve, seg):  # [K, G, T, H], [K, S, H], [K, S, H], [T]
        ids = sa.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qe, ke, ve)

    out = jax.vmap(one)(qg, kt, vt, inp.q_segment_ids)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


ATTENTION_BACKENDS: dict[str, Callable] = {
    "xla": _xla_attention,
    "jax": _jax_attention,
    "cudnn": _cudnn_attention,
    "cudnn_rows": functools.partial(_cudnn_attention, packed=False),
    "splash": _splash_attention,
}
FUSED = ("cudnn", "cudnn_rows", "splash")  # training/prefill kernels (T == S)
HARDWARE = {"cudnn": ("gpu",), "cudnn_rows": ("gpu",), "splash": ("tpu",)}  # backends that need an accelerator


def require_hardware(backend: str, platform: str | None = None) -> None:
    """Raise a clear error for an unknown backend, or one whose hardware is absent."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose from {sorted(ATTENTION_BACKENDS)}")
    platform = platform or jax.default_backend()
    if backend in HARDWARE and platform not in HARDWARE[backend]:
        raise ValueError(
            f"attention backend {backend!r} needs a {' or '.join(HARDWARE[backend]).upper()}; "
            f"this process runs on {platform!r} (use attention 'xla' here)"
        )


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
    cpu_layout: bool = False,
) -> jax.Array:
    """Grouped-query attention `[B, T, N, H]`; K must divide N. `cpu_layout` (XLA:CPU, one
    device) runs the `xla` backend with the backward of `_cpu_attention_bwd`, block-causal by
    row: it takes `T == S` with index = position in the row, as `Decoder.hidden_states` passes."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose from {sorted(ATTENTION_BACKENDS)}")
    if backend in FUSED and q.shape[1] != k.shape[1]:
        backend = "xla"  # a KV-cache decode step: the fused kernels here are for the full forward
    if backend in ("cudnn", "cudnn_rows"):
        require_hardware(backend)  # the splash backend may run in interpret mode on CPU (tests)
    inp = AttentionInputs(q_segment_ids, kv_segment_ids, q_index, kv_index, window)
    if backend == "xla" and cpu_layout:
        return _cpu_attention(q, k, v, inp)
    return ATTENTION_BACKENDS[backend](q, k, v, inp)
