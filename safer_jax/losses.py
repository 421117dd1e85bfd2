"""Losses as pure functions on arrays: token log-probs in tiles, masked NLL.

Never imports models: callers pass final hidden states `[B, T, D]` and the output
projection `[D, V]`. Float32 logits of a whole batch are B*T*V*4 bytes (4.9 GB for B=2,
T=4096, V=151936), and so is their gradient, so `token_logps` never forms them: it tiles
the logits over sequence chunks and vocabulary chunks and carries a custom VJP.

Why a custom VJP rather than `jax.checkpoint` over sequence chunks (the earlier version):
autodiff of a sequence-chunked loop adds each chunk's `[D, V]` weight-gradient contribution
into a `[D, V]` accumulator, so the backward pass holds a second parameter-sized buffer
besides the gradient itself, plus a chunk's logits and their gradient over the whole
vocabulary (value_and_grad compiled alone at the sizes above with D=896, float32: 1762 MiB
of temporaries). Here the forward pass keeps only the per-token log-normaliser `[B, T]` as
a residual, and the backward pass walks vocabulary tiles in the outer loop: each tile's
slice of the weight gradient is finished within one outer step and written once into the
gradient buffer (which is the output), while the hidden-state gradient `[B, T, D]`, far
smaller than `[D, V]`, is the carry that accumulates. Temporaries are then a few
`[B, C, Vc]` tiles and `[D, Vc]` slices (184 MiB at the sizes above; tests/test_losses.py
checks the budget).

Tensor parallelism: the weights may be sharded on the vocabulary. A tile of contiguous
columns would live on one device, and slicing it in a loop makes the partitioner gather
the whole matrix. So the vocabulary is viewed as `[S, V/S]` (S blocks, S = gcd(V,
vocab_blocks)) and a tile takes the same column range from every block: with the
vocabulary split over up to S devices, each device's share of every tile is local (the
compiled step has no all-gather; the per-tile reductions over the vocabulary, [B, C]
statistics forward and the [B, C, D] hidden-state gradient backward, are all-reduces).

Metrics are (sum, denominator) pairs so gradient accumulation and multi-host means are
exact: divide only after summing every part.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _tiles(n: int, size: int) -> tuple[int, int]:
    """(tile size, tile count) covering n positions with tiles of at most `size`."""
    size = max(1, min(size, n))
    return size, -(-n // size)


def _tile_start(i: jax.Array, size: int, n: int) -> jax.Array:
    """Start of tile i, clamped so the tile stays in bounds.

    A ragged last tile is shifted back to end at n and overlaps its predecessor; position
    p of tile i is live iff p >= i * size, so every position is live in exactly one tile.
    This avoids padding (a copy of the hidden states, or of the weights for a ragged V).
    """
    return jnp.minimum(i * size, n - size)


class _Layout:
    """Static tiling of hidden `[B, T, D]` (sequence tiles of C) and weights `[D, V]` viewed
    as `[D, S, V/S]` (vocabulary tiles of K columns from each of the S blocks)."""

    def __init__(self, hidden: jax.Array, w: jax.Array, chunk: int, vocab_chunk: int, vocab_blocks: int):
        self.b, self.t, self.d = hidden.shape
        self.v = w.shape[1]
        self.acc = jnp.promote_types(hidden.dtype, jnp.float32)  # float32 at least (float64 in exactness tests)
        self.s = math.gcd(self.v, max(1, vocab_blocks))
        self.vs = self.v // self.s  # columns per block
        self.c, self.n_t = _tiles(self.t, chunk)
        self.k, self.n_v = _tiles(self.vs, -(-vocab_chunk // self.s))

    def token_tile(self, i: jax.Array, *xs: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """(live rows `[C]`, the `[B, C, ...]` slices of each x `[B, T, ...]`) for sequence tile i."""
        s = _tile_start(i, self.c, self.t)
        live = (s + lax.iota(jnp.int32, self.c)) >= i * self.c
        return live, [lax.dynamic_slice_in_dim(x, s, self.c, axis=1) for x in xs]

    def vocab_tile(self, j: jax.Array, w3: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(start in each block, live columns `[K]`, vocabulary ids `[S, K]`, weights `[D, S, K]`)."""
        u = _tile_start(j, self.k, self.vs)
        offs = u + lax.iota(jnp.int32, self.k)  # [K] column within each block
        ids = lax.iota(jnp.int32, self.s)[:, None] * self.vs + offs  # [S, K]
        return u, offs >= j * self.k, ids, lax.dynamic_slice_in_dim(w3, u, self.k, axis=2)


def _forward(
    hidden: jax.Array, w: jax.Array, targets: jax.Array, chunk: int, vocab_chunk: int, vocab_blocks: int
) -> tuple[jax.Array, jax.Array]:
    """(log p(targets) `[B, T]`, logsumexp of the logits `[B, T]`), both in the accumulation dtype.

    Online logsumexp over vocabulary tiles: running max m and running sum z of exp(logit - m).
    """
    lay = _Layout(hidden, w, chunk, vocab_chunk, vocab_blocks)
    b, c, acc = lay.b, lay.c, lay.acc
    w3 = w.reshape(lay.d, lay.s, lay.vs)  # [D, S, V/S]

    def token_tile(i: jax.Array, out: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lp_all, lse_all = out  # [B, T] each
        live_row, (h, tgt, old_lp, old_lse) = lay.token_tile(i, hidden, targets, lp_all, lse_all)  # h [B, C, D]

        def vocab_tile(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            m, z, picked = carry  # [B, C] each
            _, live, ids, wj = lay.vocab_tile(j, w3)
            logits = jnp.einsum("BCD,DSK->BCSK", h, wj, preferred_element_type=acc)
            logits = jnp.where(live, logits, -jnp.inf)
            m_new = jnp.maximum(m, logits.max((-2, -1)))  # finite: every tile has a live column
            z = z * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None, None]).sum((-2, -1))
            hit = (ids == tgt[..., None, None]) & live  # [B, C, S, K]
            picked = picked + jnp.where(hit, logits, 0.0).sum((-2, -1))
            return m_new, z, picked

        init = (jnp.full((b, c), -jnp.inf, acc), jnp.zeros((b, c), acc), jnp.zeros((b, c), acc))
        m, z, picked = lax.fori_loop(0, lay.n_v, vocab_tile, init)
        lse = m + jnp.log(z)  # [B, C]
        s = _tile_start(i, c, lay.t)
        lp_all = lax.dynamic_update_slice_in_dim(lp_all, jnp.where(live_row, picked - lse, old_lp), s, axis=1)
        lse_all = lax.dynamic_update_slice_in_dim(lse_all, jnp.where(live_row, lse, old_lse), s, axis=1)
        return lp_all, lse_all

    return lax.fori_loop(0, lay.n_t, token_tile, (jnp.zeros((b, lay.t), acc), jnp.zeros((b, lay.t), acc)))


def _backward(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    lse: jax.Array,
    g: jax.Array,
    chunk: int,
    vocab_chunk: int,
    vocab_blocks: int,
) -> tuple[jax.Array, jax.Array]:
    """(dL/dhidden `[B, T, D]`, dL/dw `[D, V]`) for cotangent g `[B, T]` of log p(targets).

    d log p(y) / d logit_v = [v == y] - softmax_v, recomputed tile by tile from the saved lse.
    Vocabulary tiles are the outer loop so each `[D, S, K]` slice of dw is summed over all
    tokens in a small carry and written once; dh `[B, T, D]` accumulates across outer steps.
    Tile products take operands in the input dtype and accumulate in float32 (or float64).
    """
    lay = _Layout(hidden, w, chunk, vocab_chunk, vocab_blocks)
    acc = lay.acc
    w3 = w.reshape(lay.d, lay.s, lay.vs)  # [D, S, V/S]
    g = g.astype(acc)

    def vocab_tile(j: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        dh, dw = carry  # [B, T, D] in acc, [D, S, V/S] in w's dtype
        u, live_col, ids, wj = lay.vocab_tile(j, w3)

        def token_tile(i: jax.Array, inner: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            dh, dwj = inner  # [B, T, D], [D, S, K]
            live_row, (h, tgt, lse_i, g_i, dh_i) = lay.token_tile(i, hidden, targets, lse, g, dh)
            g_i = jnp.where(live_row, g_i, 0.0)  # [B, C]: an overlapped row counts in its first tile only
            logits = jnp.einsum("BCD,DSK->BCSK", h, wj, preferred_element_type=acc)
            onehot = (ids == tgt[..., None, None]).astype(acc)  # [B, C, S, K]
            dlogits = g_i[..., None, None] * (onehot - jnp.exp(logits - lse_i[..., None, None]))
            dlogits = jnp.where(live_col, dlogits, 0.0).astype(hidden.dtype)  # [B, C, S, K]
            dh_i = dh_i + jnp.einsum("BCSK,DSK->BCD", dlogits, wj, preferred_element_type=acc)
            dh = lax.dynamic_update_slice_in_dim(dh, dh_i, _tile_start(i, lay.c, lay.t), axis=1)
            dwj = dwj + jnp.einsum("BCD,BCSK->DSK", h, dlogits, preferred_element_type=acc)
            return dh, dwj

        dh, dwj = lax.fori_loop(0, lay.n_t, token_tile, (dh, jnp.zeros((lay.d, lay.s, lay.k), acc)))
        old = lax.dynamic_slice_in_dim(dw, u, lay.k, axis=2).astype(acc)  # overlapped columns: tile j - 1 wrote them
        dw = lax.dynamic_update_slice_in_dim(dw, jnp.where(live_col, dwj, old).astype(dw.dtype), u, axis=2)
        return dh, dw

    init = (jnp.zeros((lay.b, lay.t, lay.d), acc), jnp.zeros((lay.d, lay.s, lay.vs), w.dtype))
    dh, dw = lax.fori_loop(0, lay.n_v, vocab_tile, init)
    return dh.astype(hidden.dtype), dw.reshape(lay.d, lay.v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tiled_token_logps(
    hidden: jax.Array, w: jax.Array, targets: jax.Array, chunk: int, vocab_chunk: int, vocab_blocks: int
) -> jax.Array:
    return _forward(hidden, w, targets, chunk, vocab_chunk, vocab_blocks)[0]


def _tiled_fwd(
    hidden: jax.Array, w: jax.Array, targets: jax.Array, chunk: int, vocab_chunk: int, vocab_blocks: int
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    lp, lse = _forward(hidden, w, targets, chunk, vocab_chunk, vocab_blocks)
    return lp, (hidden, w, targets, lse)  # residuals: the inputs and [B, T] statistics, no logits


def _tiled_bwd(
    chunk: int, vocab_chunk: int, vocab_blocks: int, res: tuple[jax.Array, ...], g: jax.Array
) -> tuple[jax.Array, jax.Array, None]:
    hidden, w, targets, lse = res
    dh, dw = _backward(hidden, w, targets, lse, g, chunk, vocab_chunk, vocab_blocks)
    return dh, dw, None  # targets are integers: no cotangent


_tiled_token_logps.defvjp(_tiled_fwd, _tiled_bwd)


DENSE_LOGITS_BYTES_CPU = 1 << 30  # on CPU, logits up to this size are formed whole (see `_dense_token_logps`)


def _dense_token_logps(hidden: jax.Array, w: jax.Array, targets: jax.Array) -> jax.Array:
    """One tile covering everything: plain autodiff of the full logits. The backward pass then
    reuses the forward's softmax, where the tiled VJP recomputes the logits (a fourth
    `[B*T, D] x [D, V]` product) and copies weight tiles; used on CPU when the whole
    `[B, T, V]` fits `DENSE_LOGITS_BYTES_CPU` (the profile in docs/benchmarks.md)."""
    acc = jnp.promote_types(hidden.dtype, jnp.float32)
    logits = jnp.einsum("BTD,DV->BTV", hidden, w, preferred_element_type=acc)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _masked_dense_token_logps(hidden: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """`_dense_token_logps` for the positions `mask` marks only; the others get 0 at no cost.

    The marked positions of the flattened `[B*T]` batch are moved to the front (a stable
    partition, so their order is kept) and the logits are formed whole for each tile of T of
    them; a tile past the last marked position is skipped (`lax.cond`), forward and backward.
    SFT's prompt tokens and packing padding, or every token outside a preference span, then
    cost none of the head's `[T, D] x [D, V]` products (the largest of a small model's step).
    """
    b, t, d = hidden.shape
    live = mask.reshape(b * t).astype(bool)
    order = jnp.argsort(~live, stable=True)  # [B*T]: marked positions first, in order
    count = live.sum()
    h = hidden.reshape(b * t, d)[order].reshape(b, t, d)
    tg = targets.reshape(b * t)[order].reshape(b, t)
    acc = jnp.promote_types(hidden.dtype, jnp.float32)
    tiles = [
        lax.cond(
            i * t < count,
            lambda h_i, t_i: _dense_token_logps(h_i[None], w, t_i[None])[0],
            lambda h_i, t_i: jnp.zeros((t,), acc),
            h[i],
            tg[i],
        )
        for i in range(b)
    ]
    lp = jnp.zeros((b * t,), acc).at[order].set(jnp.concatenate(tiles), unique_indices=True)
    return jnp.where(live, lp, 0.0).reshape(b, t)


def _auto_vocab_chunk(b: int, t: int, v: int, dtype: Any) -> int:
    """8192 columns a tile, or the whole vocabulary on CPU when the full logits are small enough."""
    full = b * t * v * jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    return v if jax.default_backend() == "cpu" and full <= DENSE_LOGITS_BYTES_CPU else 8192


@functools.partial(jax.jit, static_argnames=("chunk_size", "vocab_chunk", "vocab_blocks"))  # one compile when eager
def token_logps(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    chunk_size: int = 512,
    vocab_chunk: int | None = None,
    vocab_blocks: int = 16,
    mask: jax.Array | None = None,
) -> jax.Array:
    """log p(targets) `[B, T]` (float32, or float64 for float64 inputs) from hidden `[B, T, D]`,
    output weights `[D, V]` and integer targets `[B, T]`.

    `mask` `[B, T]` (optional) marks the positions whose log-prob the caller uses; the others
    are 0. Where the logits are formed whole (below), unmarked positions then cost nothing
    (`_masked_dense_token_logps`); the tiled path computes every position. The packing
    reorders positions across the whole batch, so a batch-sharded one is gathered for it (the
    whole-logits path is taken on CPU only).

    Logits are formed one `[B, chunk_size, ~vocab_chunk]` tile at a time (float32
    accumulation for bfloat16 inputs), in the forward pass and again in the backward pass;
    extra memory is a few such tiles plus one `[D, ~vocab_chunk]` gradient slice, never
    B*T*V. Neither T nor V needs to divide by its chunk. A tile's columns are
    `vocab_chunk / S` contiguous ids from each of S = gcd(V, vocab_blocks) equal blocks of
    the vocabulary, so vocabulary-sharded weights (up to S ways) are tiled without a
    gather. w is cast to hidden's dtype. `vocab_chunk=None` is 8192, or on CPU the whole
    vocabulary when the full logits fit `DENSE_LOGITS_BYTES_CPU`; when one tile covers
    everything (chunk_size >= T and vocab_chunk >= V) the logits are formed whole.
    """
    b, t, _ = hidden.shape
    v = w.shape[1]
    vocab_chunk = _auto_vocab_chunk(b, t, v, hidden.dtype) if vocab_chunk is None else vocab_chunk
    if chunk_size >= t and vocab_chunk >= v:
        if mask is not None:
            return _masked_dense_token_logps(hidden, w.astype(hidden.dtype), targets, mask)
        return _dense_token_logps(hidden, w.astype(hidden.dtype), targets)
    lp = _tiled_token_logps(hidden, w.astype(hidden.dtype), targets, chunk_size, vocab_chunk, vocab_blocks)
    return lp if mask is None else jnp.where(mask.astype(bool), lp, 0.0)


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
    """Length-regularized DPO (Park et al. 2024, "Disentangling Length from Quality in DPO").

    The RLHF objective penalises length: max E[r(x, y)] - alpha |y| - beta KL(pi || ref). Its
    optimum is pi(y) = ref(y) exp((r(x, y) - alpha |y|) / beta) / Z(x), so the reward implied by
    a policy is r = beta log(pi/ref) + alpha |y| + beta log Z. Under Bradley-Terry (Z cancels):

        loss = -log sig(beta [(logp - ref)(y_w) - (logp - ref)(y_l)] + alpha (|y_w| - |y_l|))

    The length difference is credited to the margin rather than learned: a pair whose chosen
    span is longer already has a larger margin, so it pushes the policy less (and a pair whose
    chosen span is shorter pushes it more), which is what moves the policy toward brevity.
    """
    delta = h["beta"] * ((pc - rc) - (pr - rr)) + h["alpha"] * (lc - lr)
    return -jax.nn.log_sigmoid(delta), h["beta"] * (pc - rc), h["beta"] * (pr - rr)


def _simpo(pc, pr, rc, rr, lc, lr, h):
    # reference-free: d = beta pc/|y_w| - beta pr/|y_l| - gamma
    wc, wr = h["beta"] * pc / lc, h["beta"] * pr / lr
    return _smoothed(wc - wr - h["gamma"], h["label_smoothing"]), wc, wr


PREFERENCE_LOSSES = {"sigmoid": _sigmoid, "ipo": _ipo, "sigmoid_norm": _sigmoid_norm, "rdpo": _rdpo, "simpo": _simpo}
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
