"""The SFT train state and step: a module-level pure function, jitted once with shardings.

The step takes a global batch `[A * b, T]` (A = gradient-accumulation microbatches) and
scans the microbatches, summing token losses and gradients; it divides once by the total
number of loss tokens, so accumulation equals one large batch exactly (a token-weighted
mean, not a mean of means).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from safer_jax.losses import masked_nll, token_logps
from safer_jax.sharding import named_sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of the model's Params
    opt_state: Any


def init_state(params: Any, tx: optax.GradientTransformation, mesh: Mesh | None = None) -> TrainState:
    """Optimizer moments are created under jit so each inherits its parameter's sharding;
    scalars (step, optimizer counts) are replicated over the mesh."""
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=_jitted_init(tx)(params))
    if mesh is None:
        return state
    rep = NamedSharding(mesh, PartitionSpec())
    on_mesh = lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, rep)  # noqa: E731
    return jax.tree.map(on_mesh, state)


@functools.lru_cache(maxsize=16)
def _jitted_init(tx: optax.GradientTransformation) -> Any:
    """One jitted `tx.init` per optimizer (`make_optimizer` returns one object per config)."""
    return jax.jit(tx.init)


def sft_loss(params: Any, graphdef: Any, batch: dict[str, jax.Array], chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum of token NLL over loss tokens, number of loss tokens) for one microbatch."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["weights"] > 0  # prompt and padding tokens: no head products where the logits are whole
    logps = token_logps(*model.head_operands(hidden), batch["targets"], chunk, mask=mask)
    return masked_nll(logps, batch["weights"])


def _split_micro(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


def accumulate_grads(loss_fn: Any, params: Any, batch: dict[str, jax.Array], accum: int) -> tuple[jax.Array, Any, Any]:
    """(loss sum, aux, gradient of the loss sum), loss, aux and gradient summed over `accum` microbatches.

    `loss_fn(params, microbatch) -> (loss sum, aux)`, aux a pytree of sums (token counts,
    (sum, denominator) metrics), so the caller divides once by the totals.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (total, aux), grads = grad_fn(params, batch)
        return total, aux, grads
    micro = _split_micro(batch, accum)

    def body(carry, mb):
        (loss, a), g = grad_fn(params, mb)
        return jax.tree.map(jnp.add, carry, (loss, a, g)), None

    first = jax.tree.map(lambda x: x[0], micro)
    out_shape, _ = jax.eval_shape(grad_fn, params, first)  # (loss sum, aux)
    zeros = (*jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape), jax.tree.map(jnp.zeros_like, params))
    (total, aux, grads), _ = jax.lax.scan(body, zeros, micro)
    return total, aux, grads


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation, skip: jax.Array) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(skip, b, a), new, old)  # noqa: E731
    return TrainState(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state)
    )


def sft_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    accum: int = 1,
    chunk: int = 512,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    loss_fn = functools.partial(sft_loss, graphdef=graphdef, chunk=chunk)
    total, denom, grads = accumulate_grads(lambda p, b: loss_fn(p, batch=b), state.params, batch, accum)
    denom = jnp.maximum(denom, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = total / denom
    grad_norm = optax.tree.norm(grads)
    bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    new = apply_gradients(state, grads, tx, bad & skip_nonfinite)
    return new, {"loss": loss, "grad_norm": grad_norm, "tokens": denom, "nonfinite": bad}


def state_shardings(state: TrainState) -> Any:
    return jax.tree.map(lambda x: x.sharding, state)


def batch_shardings(mesh: Mesh | None, batch_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    if mesh is None:
        return {k: None for k in batch_shapes}
    return {k: named_sharding(mesh, ("batch",) + (None,) * (len(s) - 1), s) for k, s in batch_shapes.items()}


def _jit_step(step_fn: Any, static: dict[str, Any], in_sh: Any, out_sh: Any) -> Any:
    return jax.jit(functools.partial(step_fn, **static), in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0,))


@functools.lru_cache(maxsize=8)
def _cached_jit_step(step_fn: Any, static: tuple[Any, ...], in_sh: tuple[Any, Any], out_sh: tuple[Any, Any]) -> Any:
    return _jit_step(step_fn, dict(static), jax.tree.unflatten(*in_sh), jax.tree.unflatten(*out_sh))


def _jitted_step(step_fn: Any, static: dict[str, Any], in_sh: tuple[Any, ...], out_sh: tuple[Any, ...]) -> Any:
    """`jax.jit` of the step with its shardings and the state donated, reused (the last 8) while
    the step function, its static arguments and every sharding are equal: a second run in one
    process (a test, a notebook, the next preference round) gets JAX's traced, lowered and
    compiled program back. Static arguments that cannot be hashed: a fresh jit."""
    (i_leaves, i_def), (o_leaves, o_def) = jax.tree.flatten(in_sh), jax.tree.flatten(out_sh)
    try:
        return _cached_jit_step(
            step_fn, tuple(sorted(static.items())), (i_def, tuple(i_leaves)), (o_def, tuple(o_leaves))
        )
    except TypeError:
        return _jit_step(step_fn, static, in_sh, out_sh)


def compile_step(
    step_fn: Any,
    state: TrainState,
    batch: dict[str, jax.Array],
    mesh: Mesh | None,
    log: Any = print,
    extra: tuple[Any, ...] = (),
    **static: Any,
) -> Any:
    """Jit with explicit in/out shardings and state donation; compile ahead of time; log memory.

    `extra` are further arguments (a frozen reference's parameters), passed after the batch,
    never donated, kept in their current shardings.
    """
    s_sh = state_shardings(state)
    b_sh = batch_shardings(mesh, {k: v.shape for k, v in batch.items()})
    e_sh = tuple(jax.tree.map(lambda x: x.sharding, e) for e in extra)
    rep = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    fn = _jitted_step(step_fn, static, (s_sh, b_sh, *e_sh), (s_sh, rep))
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in batch.items()}
    compiled = fn.lower(state, abstract_batch, *extra).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        gib = 2**30
        log(
            f"compiled step: arguments {mem.argument_size_in_bytes / gib:.3f} GiB, outputs "
            f"{mem.output_size_in_bytes / gib:.3f} GiB, temporaries {mem.temp_size_in_bytes / gib:.3f} GiB "
            f"(per device)"
        )
    return compiled
