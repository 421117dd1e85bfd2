"""The one Flax NNX decoder: Llama, Mistral, Qwen2/2.5 and Qwen3 by config.

Layer parameters are stored stacked, `[L, ...]`, in both execution modes: `scan_layers`
runs them with `jax.lax.scan` (compile time flat in depth), otherwise an unrolled Python
loop slices them. Checkpoints, sharding rules and the HF mapping are thus identical in both
modes. Every parameter carries `logical_axes` metadata that `safer_jax.sharding` resolves.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from safer_jax.models.attention import attention
from safer_jax.models.config import DecoderConfig
from safer_jax.models.rope import apply_rope, inv_frequencies, rope_tables
from safer_jax.sharding import constrain

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as transformers: statistics in float32, scaled in the input dtype."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions `[B, T]` restarting at 0 at each segment start (packed rows)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


# name -> (per-layer shape fn, logical axes, init) for the stacked layer parameters
def layer_param_specs(cfg: DecoderConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    specs = {
        "attn_norm": ((d,), ("norm",), "ones"),
        "wq": ((d, n, h), ("embed", "heads", "head_dim"), "normal"),
        "wk": ((d, k, h), ("embed", "kv_heads", "head_dim"), "normal"),
        "wv": ((d, k, h), ("embed", "kv_heads", "head_dim"), "normal"),
        "wo": ((n, h, d), ("heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ((d,), ("norm",), "ones"),
        "w_gate": ((d, f), ("embed", "mlp"), "normal"),
        "w_up": ((d, f), ("embed", "mlp"), "normal"),
        "w_down": ((f, d), ("mlp", "embed"), "normal"),
    }
    if cfg.qkv_bias:
        specs |= {
            "bq": ((n, h), ("heads", "head_dim"), "zeros"),
            "bk": ((k, h), ("kv_heads", "head_dim"), "zeros"),
            "bv": ((k, h), ("kv_heads", "head_dim"), "zeros"),
        }
    if cfg.o_bias:
        specs["bo"] = ((d,), ("norm",), "zeros")
    if cfg.qk_norm:
        specs |= {"q_norm": ((h,), ("norm",), "ones"), "k_norm": ((h,), ("norm",), "ones")}
    return specs


def _init(kind: str, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """N(0, 0.02) weights, ones for norms, zeros for biases.

    Traced (under `nnx.eval_shape` or `jit`) the draw is jax.random's. Eager, it is drawn on the
    host from a numpy generator seeded by `key`: jax.random.normal compiles one XLA program per
    shape (about 1.5 s each on CPU), which made building a small random model take tens of seconds.
    """
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    try:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    except jax.errors.TracerArrayConversionError:
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    rng = np.random.default_rng(seed)
    return jnp.asarray((0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(jnp.dtype(dtype)))


def _cpu_matmuls(mesh: Mesh | None) -> bool:
    """Whether the block takes the XLA:CPU forms (`matmuls`, attention's `cpu_layout`): on CPU
    with one device. Sharded meshes and accelerators keep plain einsums, whose transposes
    their compilers fold into the matmuls."""
    return jax.default_backend() == "cpu" and (mesh is None or mesh.size == 1)


def _cast(x: jax.Array, compute: str | None) -> jax.Array:
    return x if compute is None else x.astype(compute)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmuls(x: jax.Array, ws: tuple[jax.Array, ...], compute: str | None = None) -> tuple[jax.Array, ...]:
    """`x @ w` for each `w` of `ws`: x `[M, K]`, each w `[K, N_i]` -> `[M, N_i]` in x's dtype.

    Same values as the einsums; the point is the backward on XLA:CPU. Autodiff's weight
    gradient `x^T @ g` contracts the major axis of both activations, and XLA:CPU then writes
    each `g` (`[M, N_i]`, the larger side) transposed and runs an Eigen dot. Here `x^T` is
    written once (the smaller side, shared by every weight of the group) and each weight
    gradient is a plain `[K, M] x [M, N_i]` product, which YNNPACK takes as it is.

    `compute` (e.g. "bfloat16"): the operands of every product (x, w and, backward, the
    cotangents) are rounded to it and accumulated in x's dtype, as a TPU's default-precision
    matmul does; CPUs with bf16 dot units (AMX, AVX512-BF16) run these several times faster
    than float32 products (docs/benchmarks.md).
    """
    xc = _cast(x, compute)
    return tuple(jnp.matmul(xc, _cast(w, compute), preferred_element_type=x.dtype) for w in ws)


def _matmuls_fwd(x, ws, compute):
    return matmuls(x, ws, compute), (_cast(x, compute), ws)  # x kept in the compute dtype, ws as given


def _matmuls_bwd(compute, res, gs):
    x, ws = res
    out_dtype = gs[0].dtype  # the forward's result dtype: the original x's
    gs = tuple(_cast(g, compute) for g in gs)
    wc = tuple(_cast(w, compute) for w in ws)
    dx = sum(
        jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)
        for g, w in zip(gs, wc, strict=True)
    )  # [M, K]
    m, k = x.shape
    # [K, M] written once, row-major, not folded back into the dots: XLA:CPU gives a bare
    # transpose a column-major layout, and then takes a bf16 product in float32.
    xt = jax.lax.optimization_barrier(x.T.reshape(k * m)).reshape(k, m)
    dws = tuple(
        jnp.matmul(xt, g, preferred_element_type=out_dtype).astype(w.dtype) for g, w in zip(gs, ws, strict=True)
    )
    return dx, dws


matmuls.defvjp(_matmuls_fwd, _matmuls_bwd)


def project(
    x: jax.Array, ws: tuple[jax.Array, ...], mesh: Mesh | None, in_dims: int = 1, compute: str | None = None
) -> tuple[jax.Array, ...]:
    """`x [B, T, *in]` times each `w [*in, *out_i]` over the `in_dims` input axes -> `[B, T, *out_i]`.

    `compute`: the products' operand dtype (see `matmuls`); results stay in x's dtype."""
    if not _cpu_matmuls(mesh):
        letters = "abcdefgh"
        ins = letters[:in_dims]
        out = []
        xc = _cast(x, compute)
        for w in ws:
            outs = letters[in_dims : w.ndim]
            out.append(
                jnp.einsum(f"BT{ins},{ins}{outs}->BT{outs}", xc, _cast(w, compute), preferred_element_type=x.dtype)
            )
        return tuple(out)
    b, t = x.shape[:2]
    k = int(np.prod(x.shape[2:]))
    flat = matmuls(x.reshape(b * t, k), tuple(w.reshape(k, -1) for w in ws), compute)
    return tuple(y.reshape(b, t, *w.shape[in_dims:]) for y, w in zip(flat, ws, strict=True))


def layer_qkv(
    cfg: DecoderConfig,
    mesh: Mesh | None,
    w: dict[str, jax.Array],  # one layer's parameters in the compute dtype
    x: jax.Array,  # [B, T, D]
    sin: jax.Array,  # [B, T, H]
    cos: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention inputs of one block: q `[B, T, N, H]`, k and v `[B, T, K, H]`, rope applied.

    Shared by the full forward and the KV-cache forward (`models/kv_cache.py`), so both
    compute exactly the same projections.
    """
    h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    q, k, v = project(h, (w["wq"], w["wk"], w["wv"]), mesh, compute=cfg.matmul_dtype)
    if cfg.qkv_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    q = constrain(apply_rope(q, sin, cos), mesh, ("batch", "length", "act_heads", None))
    k = constrain(apply_rope(k, sin, cos), mesh, ("batch", "length", "act_kv_heads", None))
    v = constrain(v, mesh, ("batch", "length", "act_kv_heads", None))
    return q, k, v


def layer_output(
    cfg: DecoderConfig,
    mesh: Mesh | None,
    w: dict[str, jax.Array],
    x: jax.Array,  # [B, T, D] the block's input (residual stream)
    o: jax.Array,  # [B, T, N, H] attention output
) -> jax.Array:
    """The rest of one block after attention: output projection, residual, SwiGLU MLP."""
    (o,) = project(o, (w["wo"],), mesh, in_dims=2, compute=cfg.matmul_dtype)
    if cfg.o_bias:
        o = o + w["bo"]
    x = constrain(x + o, mesh, ("batch", "length", "act_embed"))
    h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    gate, up = project(h, (w["w_gate"], w["w_up"]), mesh, compute=cfg.matmul_dtype)
    act = constrain(jax.nn.silu(gate) * up, mesh, ("batch", "length", "act_mlp"))
    (down,) = project(act, (w["w_down"],), mesh, compute=cfg.matmul_dtype)
    x = x + down
    return constrain(x, mesh, ("batch", "length", "act_embed"))


def layer_forward(
    cfg: DecoderConfig,
    mesh: Mesh | None,
    p: dict[str, jax.Array],  # one layer's parameters (no leading L)
    x: jax.Array,  # [B, T, D]
    sin: jax.Array,  # [B, T, H]
    cos: jax.Array,
    segment_ids: jax.Array,  # [B, T]
    index: jax.Array,  # [B, T]
    window: jax.Array | int,
) -> jax.Array:
    """One pre-norm block: x + attn(norm(x)); x + swiglu(norm(x))."""
    w = {k: v.astype(x.dtype) for k, v in p.items()}
    q, k, v = layer_qkv(cfg, mesh, w, x, sin, cos)
    cpu = _cpu_matmuls(mesh)
    o = attention(q, k, v, segment_ids, segment_ids, index, index, window, cfg.attention, cpu_layout=cpu)
    return layer_output(cfg, mesh, w, x, o)


class DecoderLayers(nnx.Module):
    """All transformer blocks, parameters stacked on a leading `layers` axis."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.names = tuple(layer_param_specs(cfg))
        pdt = jnp.dtype(cfg.param_dtype)
        for name, (shape, axes, kind) in layer_param_specs(cfg).items():
            value = _init(kind, rngs.params(), (cfg.num_layers, *shape), pdt)
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))

    def __call__(self, cfg, mesh, x, sin, cos, segment_ids, index):
        params = {name: getattr(self, name)[...] for name in self.names}
        fn = functools.partial(layer_forward, cfg, mesh)
        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            static = (6,) if (not cfg.scan_layers or len(set(cfg.sliding_windows)) == 1) else ()  # the window
            fn = jax.checkpoint(fn, policy=policy, prevent_cse=not cfg.scan_layers, static_argnums=static)
        k = cfg.freeze_layers  # blocks [0, k) take no gradient: a run of their own, behind stop_gradient
        spans = [(0, k, True), (k, cfg.num_layers, False)] if k else [(0, cfg.num_layers, False)]
        for lo, hi, frozen in spans:
            if hi == lo:
                continue
            part = {name: v[lo:hi] for name, v in params.items()}  # [hi - lo, ...]
            part = jax.lax.stop_gradient(part) if frozen else part
            if cfg.scan_layers:
                x = self._scan(cfg, fn, part, cfg.sliding_windows[lo:hi], x, sin, cos, segment_ids, index)
            else:
                for i in range(hi - lo):
                    p = {name: v[i] for name, v in part.items()}
                    x = fn(p, x, sin, cos, segment_ids, index, cfg.sliding_windows[lo + i])
        return x

    @staticmethod
    def _scan(cfg, fn, params, windows_list, x, sin, cos, segment_ids, index):
        windows = jnp.asarray(windows_list, jnp.int32)
        same = len(set(cfg.sliding_windows)) == 1  # one window for all layers: static (fused kernels need it)

        def body(carry, layer):
            p, window = layer
            window = cfg.sliding_windows[0] if same else window
            return fn(p, carry, sin, cos, segment_ids, index, window), None

        x, _ = jax.lax.scan(body, x, (params, windows))
        return x


class Decoder(nnx.Module):
    """Causal LM. `model(input_ids [B, T], positions=None, segment_ids=None)` -> logits f32 `[B, T, V]`."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={cfg.remat!r} unknown; choose from {sorted(REMAT_POLICIES)}")
        self.config = cfg
        self.mesh = mesh
        pdt = jnp.dtype(cfg.param_dtype)
        v, d = cfg.vocab_size, cfg.hidden_size
        self.embed = nnx.Param(_init("normal", rngs.params(), (v, d), pdt), logical_axes=("vocab", "embed"))
        self.layers = DecoderLayers(cfg, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((d,), pdt), logical_axes=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(_init("normal", rngs.params(), (d, v), pdt), logical_axes=("embed", "vocab"))
        self.inv_freq = tuple(inv_frequencies(cfg).tolist())  # static: plain floats, hashable

    def hidden_states(
        self,
        input_ids: jax.Array,  # [B, T] int
        positions: jax.Array | None = None,  # [B, T]
        segment_ids: jax.Array | None = None,  # [B, T], 0 = padding
    ) -> jax.Array:
        """Final-normed hidden states `[B, T, D]` in the compute dtype (for chunked losses)."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if positions is None:
            positions = segment_positions(segment_ids)
        positions = jnp.asarray(positions, jnp.int32)
        index = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        x = self.embed_tokens(input_ids)
        sin, cos = rope_tables(positions, np.asarray(self.inv_freq, np.float32))
        x = self.layers(cfg, self.mesh, x, sin, cos, segment_ids, index)
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings `[B, T, D]` in the compute dtype."""
        x = jnp.take(self._embedding(), input_ids, axis=0).astype(jnp.dtype(self.config.dtype))
        return constrain(x, self.mesh, ("batch", "length", "act_embed"))

    def _embedding(self) -> jax.Array:
        """The `[V, D]` table; behind stop_gradient when blocks are frozen (`freeze_layers`), so
        that no gradient reaches them through it, nor the table through a tied head."""
        e = self.embed[...]
        return jax.lax.stop_gradient(e) if self.config.freeze_layers else e

    def output_weights(self) -> jax.Array:
        """The `[D, V]` output projection (the embedding, transposed, when tied)."""
        return self._embedding().T if self.config.tie_word_embeddings else self.lm_head[...]

    def head_operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(hidden `[B, T, D]`, output weights `[D, V]`) as the head's product takes them: in
        `matmul_dtype` where set, else in the hidden states' dtype. Losses accumulate in float32."""
        c = jnp.dtype(self.config.matmul_dtype or x.dtype)
        return x.astype(c), self.output_weights().astype(c)

    def logits(self, x: jax.Array) -> jax.Array:
        """Float32 logits `[B, T, V]` from final-normed hidden states `[B, T, D]`."""
        acc = jnp.promote_types(x.dtype, jnp.float32)  # float32 logits (float64 under x64 tests)
        x, w = self.head_operands(x)
        logits = jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=acc)
        return constrain(logits, self.mesh, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids, positions=None, segment_ids=None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))
