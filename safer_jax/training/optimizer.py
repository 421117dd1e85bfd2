"""optax AdamW with warm-up then decay, global-norm clipping, and no decay on norms and biases."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from safer_jax.config import OptimizerConfig

NO_DECAY = ("norm", "bq", "bk", "bv", "bo")  # parameter names (last path element) exempt from weight decay


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warm = max(0, cfg.warmup_steps)
    decay_steps = max(1, total_steps - warm)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}: choose cosine, linear or constant")
    if not warm:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def _path_keys(path: tuple[Any, ...]) -> list[str]:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    return [str(k) for k in keys if k is not None and str(k) not in ("value", "raw_value")]


def _path_name(path: tuple[Any, ...]) -> str:
    keys = _path_keys(path)
    return keys[-1] if keys else ""


def keep_frozen(freeze_layers: int) -> optax.GradientTransformation:
    """Zero updates for what `model.freeze_layers` freezes: the embedding table and rows
    `[0, freeze_layers)` of every stacked block parameter (`[L, ...]`). Their gradients are already
    zero (the model stops them); this keeps weight decay and any later transform off them too."""

    def zero(path: tuple[Any, ...], u: Any) -> Any:
        keys = _path_keys(path)
        if keys and keys[0] == "embed":
            return jnp.zeros_like(u)
        if keys and keys[0] == "layers":
            return u.at[:freeze_layers].set(0)
        return u

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree_util.tree_map_with_path(zero, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices, not norms or biases."""
    return jax.tree_util.tree_map_with_path(lambda p, _: not _path_name(p).endswith(NO_DECAY), params)


@functools.lru_cache(maxsize=32)
def make_optimizer(cfg: OptimizerConfig, total_steps: int, freeze_layers: int = 0) -> optax.GradientTransformation:
    """One object per (config, steps, frozen blocks): a step jitted with it is found again by
    `compile_step`. `freeze_layers` is `model.freeze_layers` (`keep_frozen`)."""
    sched = schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    if freeze_layers:
        parts.append(keep_frozen(freeze_layers))
    return optax.chain(*parts)
