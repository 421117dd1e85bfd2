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
    acc = jnp.promote_types(h.dtype, jnp.float32)  # float32 at least (float64 in exactness tests)
    logits = jnp.einsum("BCD,DV->BCV", h, w, preferred_element_type=acc)
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


# ---------------------------------------------------------------- span log-probs (preference)


def span_logps(token_lp: jax.Array, span_mask: jax.Array, ld_alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Sums of token log-probs over each row's span, and span lengths, for stacked pairs.

    token_lp, span_mask `[2B, T]`: rows 0..B-1 chosen, B..2B-1 rejected. With LD-DPO
    (`ld_alpha` < 1), tokens past the shorter of the pair's two spans are weighted by
    `ld_alpha`: logp = sum_{i < l_min} lp_i + ld_alpha * sum_{i >= l_min} lp_i.
    """
    mask = span_mask.astype(token_lp.dtype)
    lengths = mask.sum(-1)  # [2B]
    if ld_alpha == 1.0:
        return (token_lp * mask).sum(-1), lengths
    b = lengths.shape[0] // 2
    shorter = jnp.minimum(lengths[:b], lengths[b:])
    shorter = jnp.concatenate([shorter, shorter])  # [2B]
    index = jnp.cumsum(mask, axis=-1) - 1.0  # position of each token within its span
    weight = jnp.where(index < shorter[:, None], 1.0, ld_alpha) * mask
    return (token_lp * weight).sum(-1), lengths


# ---------------------------------------------------------------- preference losses

DEFAULT_HPARAMS = {"beta": 0.1, "label_smoothing": 0.0, "alpha": 0.0, "gamma": 0.5, "rpo_lambda": 0.0}


def _smoothed(d: jax.Array, eps: float) -> jax.Array:
    return -(1.0 - eps) * jax.nn.log_sigmoid(d) - eps * jax.nn.log_sigmoid(-d)


def _sigmoid(pc, pr, rc, rr, lc, lr, h):
    # DPO / Step-DPO: Delta = beta [(pc - rc) - (pr - rr)]
    delta = h["beta"] * ((pc - rc) - (pr - rr))
    return _smoothed(delta, h["label_smoothing"]), h["beta"] * (pc - rc), h["beta"] * (pr - rr)


def _ipo(pc, pr, rc, rr, lc, lr, h):
    # IPO on length-averaged log-ratios (as TRL): (h - 1/(2 beta))^2
    x = (pc - rc) / lc - (pr - rr) / lr
    return (x - 1.0 / (2.0 * h["beta"])) ** 2, h["beta"] * (pc - rc), h["beta"] * (pr - rr)


def _sigmoid_norm(pc, pr, rc, rr, lc, lr, h):
    return _sigmoid(pc / lc, pr / lr, rc / lc, rr / lr, lc, lr, h)


def _rdpo(pc, pr, rc, rr, lc, lr, h):
    # length-regularized DPO (Park et al. 2024): -log sig(Delta - alpha (|y_w| - |y_l|))
    delta = h["beta"] * ((pc - rc) - (pr - rr)) - h["alpha"] * (lc - lr)
    return -jax.nn.log_sigmoid(delta), h["beta"] * (pc - rc), h["beta"] * (pr - rr)


def _simpo(pc, pr, rc, rr, lc, lr, h):
    # reference-free: d = beta pc/|y_w| - beta pr/|y_l| - gamma
    wc, wr = h["beta"] * pc / lc, h["beta"] * pr / lr
    return _smoothed(wc - wr - h["gamma"], h["label_smoothing"]), wc, wr


PREFERENCE_LOSSES = {"sigmoid": _sigmoid, "ipo": _ipo, "sigmoid_norm": _sigmoid_norm, "rdpo": _rdpo,
                     "simpo": _simpo}
REFERENCE_FREE = ("simpo",)


def preference_loss(
    loss_type: str,
    policy_chosen_logps: jax.Array,  # [B] span sums
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None,
    ref_rejected_logps: jax.Array | None,
    chosen_lengths: jax.Array,  # [B] span token counts
    rejected_lengths: jax.Array,
    **hparams: float,
) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """Per-pair losses `[B]` and metrics as (sum, denominator) pairs."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type {loss_type!r} unknown; choose from {sorted(PREFERENCE_LOSSES)}")
    unknown = set(hparams) - set(DEFAULT_HPARAMS)
    if unknown:
        raise ValueError(f"unknown preference hparam(s) {sorted(unknown)}; known: {sorted(DEFAULT_HPARAMS)}")
    h = {**DEFAULT_HPARAMS, **hparams}
    ft = jnp.promote_types(policy_chosen_logps.dtype, jnp.float32)
    pc, pr = policy_chosen_logps.astype(ft), policy_rejected_logps.astype(ft)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        if loss_type not in REFERENCE_FREE:
            raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
        rc = rr = jnp.zeros_like(pc)
    else:
        rc, rr = ref_chosen_logps.astype(ft), ref_rejected_logps.astype(ft)
    lc = jnp.maximum(chosen_lengths.astype(ft), 1.0)
    lr = jnp.maximum(rejected_lengths.astype(ft), 1.0)
    losses, reward_c, reward_r = PREFERENCE_LOSSES[loss_type](pc, pr, rc, rr, lc, lr, h)
    if h["rpo_lambda"]:
        losses = losses + h["rpo_lambda"] * (-pc / lc)  # SFT term on the chosen span, per pair
    n = jnp.asarray(pc.shape[0], ft)
    metrics = {
        "loss": (losses.sum(), n),
        "rewards/chosen": (reward_c.sum(), n),
        "rewards/rejected": (reward_r.sum(), n),
        "rewards/accuracy": ((reward_c > reward_r).astype(ft).sum(), n),
        "rewards/margin": ((reward_c - reward_r).sum(), n),
        "length/chosen": (lc.sum(), n),
        "length/rejected": (lr.sum(), n),
    }
    return losses, metrics
