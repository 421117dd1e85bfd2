"""The step-level preference step: chosen and rejected in one forward, span log-probs, loss.

Batches are `[2B, T]` (chosen rows, then rejected rows) with `span_mask` marking the
differing step (or step k to the end); the context carries no loss. The log-prob of token
t is read from position t-1, so inputs are ids[:, :-1] and targets ids[:, 1:].

The reference is either a frozen parameter state on the same mesh (no optimizer state,
`stop_gradient`), or precomputed log-probs passed in the batch (`ref_logps`, `[2B]`).

LD-DPO (`ld_alpha` < 1) weights the policy's tokens past the shorter span and, with
`ld_reference` (the default), the reference's the same way, as TRL 1.16 does
(`trl/trainer/dpo_trainer.py`: `_compute_loss` reuses the policy's `shared_mask` and
`tail_mask` for the reference, and `compute_ref_log_probs` weights precomputed ones), so the
log-ratios compare like with like and the loss at step 0 is log 2. `ld_reference=False`
weights the policy only (TRL 0.x skipped the weighting for the reference model).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from safer_jax.losses import preference_loss, span_logps, token_logps
from safer_jax.training.sft import TrainState, accumulate_grads, apply_gradients


def reference_ld_alpha(ld_alpha: float, ld_reference: bool) -> float:
    """The LD-DPO weight the reference's span log-probs are gathered with (1 = unweighted)."""
    return ld_alpha if ld_reference else 1.0


def pair_span_logps(
    params: Any, graphdef: Any, batch: dict[str, jax.Array], chunk: int, ld_alpha: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """(span log-prob sums `[2B]`, span lengths `[2B]`) under `params`."""
    model = nnx.merge(graphdef, params)
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    hidden = model.hidden_states(ids[:, :-1], pos[:, :-1], seg[:, :-1])
    span = batch["span_mask"][:, 1:]
    lp = token_logps(*model.head_operands(hidden), ids[:, 1:], chunk, mask=span > 0)
    return span_logps(lp, span, ld_alpha)


def preference_objective(
    params: Any,
    ref_params: Any,
    graphdef: Any,
    batch: dict[str, jax.Array],
    *,
    loss_type: str,
    hparams: dict[str, float],
    chunk: int,
    ld_alpha: float,
    ld_reference: bool = True,
) -> tuple[jax.Array, dict[str, Any]]:
    """Sum of per-pair losses (the step divides by the global pair count) and metrics."""
    logps, lengths = pair_span_logps(params, graphdef, batch, chunk, ld_alpha)
    b = logps.shape[0] // 2
    if "ref_logps" in batch:
        ref = batch["ref_logps"]
    elif ref_params is not None:
        ref, _ = pair_span_logps(
            jax.lax.stop_gradient(ref_params), graphdef, batch, chunk, reference_ld_alpha(ld_alpha, ld_reference)
        )
    else:
        ref = None
    losses, metrics = preference_loss(
        loss_type,
        logps[:b],
        logps[b:],
        None if ref is None else ref[:b],
        None if ref is None else ref[b:],
        lengths[:b],
        lengths[b:],
        **hparams,
    )
    return losses.sum(), metrics


def preference_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    ref_params: Any = None,
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    loss_type: str = "sigmoid",
    hparams: dict[str, float] | None = None,
    chunk: int = 512,
    ld_alpha: float = 1.0,
    accum: int = 1,
    blocks: int = 1,
    skip_nonfinite: bool = False,
    ld_reference: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `[2B, T]` pair rows (B pairs over `accum` microbatches; `blocks`
    per-process blocks, see `pair_layout`); the loss is the mean over all B pairs, exactly."""
    fn = functools.partial(
        preference_objective,
        graphdef=graphdef,
        loss_type=loss_type,
        hparams=dict(hparams or {}),
        chunk=chunk,
        ld_alpha=ld_alpha,
        ld_reference=ld_reference,
    )
    micro = pair_layout(batch, accum, blocks)
    _, metrics, grads = accumulate_grads(lambda p, b: fn(p, ref_params, batch=b), state.params, micro, accum)
    n = metrics["loss"][1]
    grads = jax.tree.map(lambda g: g / n, grads)
    grad_norm = optax.tree.norm(grads)
    out = {k: s / d for k, (s, d) in metrics.items()}
    bad = ~(jnp.isfinite(out["loss"]) & jnp.isfinite(grad_norm))
    new = apply_gradients(state, grads, tx, bad & skip_nonfinite)
    out.update(grad_norm=grad_norm, nonfinite=bad, padding=jnp.mean(batch["segment_ids"] == 0))
    return new, out


class RowOrderError(ValueError):
    """The global batch's rows are not the processes' blocks in process order: pairs would not match."""


def check_pair_rows(mesh: Any, local_pairs: int) -> None:
    """Fail before any step if the assembled global batch would not pair chosen and rejected rows.

    Each process feeds `2 * local_pairs` rows (its chosen block, then its rejected block);
    `pair_layout` assumes the global batch holds those blocks whole, in process order.
    """
    from safer_jax.sharding import row_origins

    origins = row_origins(mesh, 2 * local_pairs)  # [N, 2] (process, local row)
    expect = np.stack(
        [
            np.repeat(np.arange(jax.process_count()), 2 * local_pairs),
            np.tile(np.arange(2 * local_pairs), jax.process_count()),
        ],
        1,
    )
    if not np.array_equal(origins, expect):
        bad = int(np.argmax(np.any(origins != expect, axis=1)))
        raise RowOrderError(
            f"the mesh's device order assembles the global batch out of process order (global row {bad} holds "
            f"process {origins[bad, 0]}'s row {origins[bad, 1]}, expected process {expect[bad, 0]}'s row "
            f"{expect[bad, 1]}): chosen and rejected rows would not pair up. Build the mesh from jax.devices() "
            "in their default order (each process's devices contiguous)"
        )


def pair_layout(batch: dict[str, jax.Array], accum: int = 1, blocks: int = 1) -> dict[str, jax.Array]:
    """Reorder pair rows into `accum` contiguous `[2b, ...]` microbatches (chosen block, rejected block).

    Rows arrive as `blocks` per-process blocks, each chosen-then-rejected (the global batch is
    the processes' local batches concatenated): `[P, 2, b_local]` -> `[A, 2, B / A]`.
    """
    if accum == 1 and blocks == 1:
        return batch
    out = {}
    for k, v in batch.items():
        rows = v.shape[0]
        if rows % (2 * blocks):
            raise ValueError(f"{rows} pair rows do not split into {blocks} process blocks")
        pairs = rows // 2
        if pairs % accum:
            raise ValueError(f"{pairs} pairs per step do not split into train.grad_accum={accum} microbatches")
        x = v.reshape(blocks, 2, pairs // blocks, *v.shape[1:]).swapaxes(0, 1)  # [2, P, b_local, ...]
        x = x.reshape(2, accum, pairs // accum, *v.shape[1:]).swapaxes(0, 1)  # [A, 2, b, ...]
        out[k] = x.reshape(v.shape)
    return out
