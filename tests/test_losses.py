"""Preference losses against independent float64 NumPy formulas; LD-DPO gathering; tiled token
log-probs against full logits (values, gradients, bfloat16, sharding); compiled memory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from safer_jax.losses import preference_loss, span_logps, token_logps
from safer_jax.training.preference import reference_ld_alpha


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def reference_numpy(kind, pc, pr, rc, rr, lc, lr, beta=0.1, eps=0.0, alpha=0.0, gamma=0.5, rpo=0.0):
    if kind == "sigmoid":
        d = beta * ((pc - rc) - (pr - rr))
        out = -(1 - eps) * np_logsig(d) - eps * np_logsig(-d)
    elif kind == "ipo":
        h = (pc - rc) / lc - (pr - rr) / lr
        out = (h - 1 / (2 * beta)) ** 2
    elif kind == "sigmoid_norm":
        d = beta * ((pc / lc - rc / lc) - (pr / lr - rr / lr))
        out = -(1 - eps) * np_logsig(d) - eps * np_logsig(-d)
    elif kind == "rdpo":
        d = beta * ((pc - rc) - (pr - rr)) + alpha * (lc - lr)  # Park et al. 2024, eq. 9: the length is credited
        out = -np_logsig(d)
    elif kind == "simpo":
        d = beta * pc / lc - beta * pr / lr - gamma
        out = -(1 - eps) * np_logsig(d) - eps * np_logsig(-d)
    return out + rpo * (-pc / lc)


def random_inputs(seed=0, b=64):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.uniform(-500, -5, b) for _ in range(4))
    lc, lr = rng.integers(5, 400, b).astype(np.float64), rng.integers(5, 400, b).astype(np.float64)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize(
    "kind, hp",
    [
        ("sigmoid", {}),
        ("sigmoid", {"beta": 0.3, "label_smoothing": 0.1}),
        ("ipo", {"beta": 0.5}),
        ("sigmoid_norm", {"beta": 2.0}),
        ("rdpo", {"alpha": 0.01}),
        ("simpo", {"beta": 2.0, "gamma": 1.0}),
        ("simpo", {"label_smoothing": 0.2}),
        ("sigmoid", {"rpo_lambda": 0.5}),
    ],
)
def test_losses_match_float64_numpy(kind, hp):
    pc, pr, rc, rr, lc, lr = random_inputs()
    want = reference_numpy(
        kind,
        pc,
        pr,
        rc,
        rr,
        lc,
        lr,
        beta=hp.get("beta", 0.1),
        eps=hp.get("label_smoothing", 0.0),
        alpha=hp.get("alpha", 0.0),
        gamma=hp.get("gamma", 0.5),
        rpo=hp.get("rpo_lambda", 0.0),
    )
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got, metrics = preference_loss(kind, f(pc), f(pr), f(rc), f(rr), f(lc), f(lr), **hp)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    total, n = metrics["loss"]
    np.testing.assert_allclose(float(total) / float(n), want.mean(), rtol=1e-5)


def test_hand_computed_values():
    one = lambda v: jnp.asarray([v], jnp.float32)  # noqa: E731
    # sigmoid: beta 0.1, (pc - rc) - (pr - rr) = (-10 + 12) - (-20 + 15) = 7 -> -log sig(0.7)
    loss, m = preference_loss("sigmoid", one(-10.0), one(-20.0), one(-12.0), one(-15.0), one(4), one(5))
    assert math.isclose(float(loss[0]), math.log1p(math.exp(-0.7)), rel_tol=1e-6)
    assert math.isclose(float(m["rewards/margin"][0]), 0.7, rel_tol=1e-5)
    assert float(m["rewards/accuracy"][0]) == 1.0
    # ipo: h = 2/4 - (-5)/5 = 1.5; beta 0.1 -> (1.5 - 5)^2 = 12.25
    loss, _ = preference_loss("ipo", one(-10.0), one(-20.0), one(-12.0), one(-15.0), one(4), one(5))
    assert math.isclose(float(loss[0]), 12.25, rel_tol=1e-6)
    # simpo: beta 2, gamma 0.5: d = 2(-10/4) - 2(-20/5) - 0.5 = -5 + 8 - 0.5 = 2.5; no reference needed
    loss, _ = preference_loss("simpo", one(-10.0), one(-20.0), None, None, one(4), one(5), beta=2.0)
    assert math.isclose(float(loss[0]), math.log1p(math.exp(-2.5)), rel_tol=1e-6)


def test_policy_equal_to_reference_gives_log_two():
    pc, pr, _, _, lc, lr = random_inputs(1)
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, _ = preference_loss("sigmoid", f(pc), f(pr), f(pc), f(pr), f(lc), f(lr))
    np.testing.assert_allclose(np.asarray(loss), math.log(2.0), rtol=1e-6)


def test_bad_arguments():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="unknown preference hparam"):
        preference_loss("sigmoid", x, x, x, x, x + 1, x + 1, betta=0.2)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss("sigmoid", x, x, None, None, x + 1, x + 1)
    with pytest.raises(ValueError, match="unknown"):
        preference_loss("kto", x, x, x, x, x + 1, x + 1)


def test_rdpo_credits_a_longer_chosen_span_and_its_gradient_matches_finite_differences():
    """R-DPO per Park et al. (2024): with alpha > 0 a pair whose chosen span is longer has a lower
    loss than plain DPO (the length difference is credited to the margin), a shorter one a higher."""
    f = lambda *v: jnp.asarray(v, jnp.float32)  # noqa: E731
    pc, pr, rc, rr = f(-30.0, -30.0), f(-32.0, -32.0), f(-31.0, -31.0), f(-31.5, -31.5)
    lc, lr = f(60.0, 20.0), f(20.0, 60.0)  # pair 0: chosen longer; pair 1: chosen shorter
    dpo, _ = preference_loss("sigmoid", pc, pr, rc, rr, lc, lr)
    rdpo, _ = preference_loss("rdpo", pc, pr, rc, rr, lc, lr, alpha=0.01)
    assert float(rdpo[0]) < float(dpo[0]) and float(rdpo[1]) > float(dpo[1])
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        x0 = jnp.asarray(rng.uniform(-60, -5, 8), jnp.float64)  # policy chosen, rejected for 4 pairs
        ref = jnp.asarray(rng.uniform(-60, -5, 8), jnp.float64)
        lens = jnp.asarray(rng.integers(5, 80, 8), jnp.float64)

        def total(x):
            loss, _ = preference_loss("rdpo", x[:4], x[4:], ref[:4], ref[4:], lens[:4], lens[4:], beta=0.2, alpha=0.05)
            return loss.sum()

        grad = np.asarray(jax.grad(total)(x0))
        eps = 1e-6
        fd = [(float(total(x0.at[i].add(eps))) - float(total(x0.at[i].add(-eps)))) / (2 * eps) for i in range(8)]
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def _trl_loss(policy_lp, ref_lp, completion, beta, ld_alpha, precomputed_ref=None):
    """TRL 1.16's `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py, the LD-DPO lines: policy at
    `logps = shared_logps + self.ld_alpha * tail_logps`, reference at `ref_logps = ref_shared_logps +
    self.ld_alpha * ref_tail_logps`) run on stub models that return the given per-token log-probs.
    With `precomputed_ref` (chosen, rejected sums), TRL's precomputed-reference branch is taken."""
    import types
    from collections import defaultdict
    from contextlib import nullcontext

    import torch
    from trl.trainer.dpo_trainer import DPOTrainer

    n, t = completion.shape

    def stub(per_token):
        out = types.SimpleNamespace(
            log_probs=torch.tensor(per_token),
            entropy=torch.zeros(n, t - 1),
            mean_logits=torch.zeros(n, t - 1),
            is_top1=torch.zeros(n, t - 1, dtype=torch.bool),
        )
        model = lambda **kw: out  # noqa: E731
        return types.SimpleNamespace(__call__=model, training=True, is_gradient_checkpointing=False), model

    policy_ns, policy = stub(policy_lp)
    _, ref = stub(ref_lp)
    acc = types.SimpleNamespace(
        device=torch.device("cpu"),
        gather_for_metrics=lambda x: x,
        gather=lambda x: x,
        unwrap_model=lambda m: m,
        autocast=nullcontext,
    )
    trainer = types.SimpleNamespace(
        model=policy_ns,
        ref_model=ref,
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=precomputed_ref is not None,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": torch.tensor(completion),
    }
    if precomputed_ref is not None:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = (torch.tensor(v) for v in precomputed_ref)
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, False)
    return float(loss), trainer._metrics["train"]


@pytest.mark.parametrize("ld_alpha", [0.5, 0.0])
def test_ld_dpo_matches_trl_1_16(ld_alpha):
    """Span log-probs (`span_logps`, policy and reference as `reference_ld_alpha` says) and the sigmoid
    loss, as `preference_objective` composes them, against TRL 1.16's DPO trainer on random inputs.
    TRL weights the reference too (our default, `ld_reference=True`); with precomputed, unweighted
    reference log-probs TRL weights the policy only, which is our `ld_reference=False`."""
    rng = np.random.default_rng(11)
    b, t, beta = 4, 24, 0.1
    completion = np.zeros((2 * b, t), np.int64)
    for i in range(2 * b):
        start = rng.integers(2, 8)
        completion[i, start : start + rng.integers(3, t - start)] = 1
    mask = completion[:, 1:].astype(np.float32)  # the scored positions of the shifted targets
    policy_lp = (rng.uniform(-6, -0.05, (2 * b, t - 1)) * mask).astype(np.float32)
    ref_lp = (rng.uniform(-6, -0.05, (2 * b, t - 1)) * mask).astype(np.float32)

    def ours(ld_reference):
        f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        pol, lengths = span_logps(f(policy_lp), f(mask), ld_alpha)
        ref, _ = span_logps(f(ref_lp), f(mask), reference_ld_alpha(ld_alpha, ld_reference))
        losses, metrics = preference_loss(
            "sigmoid", pol[:b], pol[b:], ref[:b], ref[b:], lengths[:b], lengths[b:], beta=beta
        )
        return float(losses.mean()), metrics

    want, trl_metrics = _trl_loss(policy_lp, ref_lp, completion, beta, ld_alpha)
    got, metrics = ours(ld_reference=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/margin"][0]) / b, trl_metrics["rewards/margins"][0], rtol=1e-4)
    plain = (ref_lp * mask).sum(-1)
    want_policy_only, _ = _trl_loss(policy_lp, ref_lp, completion, beta, ld_alpha, (plain[:b], plain[b:]))
    np.testing.assert_allclose(ours(ld_reference=False)[0], want_policy_only, rtol=1e-5)
    assert abs(want_policy_only - want) > 1e-3  # the two conventions differ on these inputs


def test_ld_dpo_weighting_matches_numpy():
    rng = np.random.default_rng(3)
    b, t = 3, 40
    lp = rng.uniform(-8, -0.01, (2 * b, t))
    mask = np.zeros((2 * b, t))
    starts = rng.integers(0, 10, 2 * b)
    lens = rng.integers(3, 25, 2 * b)
    for i in range(2 * b):
        mask[i, starts[i] : starts[i] + lens[i]] = 1
    for alpha in (1.0, 0.5, 0.0):
        sums, lengths = span_logps(jnp.asarray(lp, jnp.float32), jnp.asarray(mask), ld_alpha=alpha)
        want = []
        for i in range(2 * b):
            short = min(lens[i % b], lens[b + i % b])
            toks = lp[i, starts[i] : starts[i] + lens[i]]
            want.append(toks[:short].sum() + alpha * toks[short:].sum())
        np.testing.assert_allclose(np.asarray(sums), want, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(lengths), lens)


def test_token_logps_chunked_equals_full():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, (2, 37)))
    full = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), -1)
    want = jnp.take_along_axis(full, t[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(token_logps(h, w, t, chunk_size=8)), np.asarray(want), rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda h: token_logps(h, w, t, 8).sum())(h)
    g2 = jax.grad(
        lambda h: jnp.take_along_axis(jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), -1), t[..., None], -1).sum()
    )(h)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- tiled token log-probs (issue #5)


def full_logits_logps(h, w, t):
    """The naive reference: logits of the whole batch `[B, T, V]`, then log_softmax."""
    logits = jnp.einsum("BTD,DV->BTV", h, w)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), t[..., None], -1)[..., 0]


@pytest.mark.parametrize(
    "b, t, d, v, chunk, vocab_chunk",
    [
        (2, 37, 16, 50, 8, 7),  # T % chunk and V % vocab_chunk nonzero: both last tiles overlap their predecessor
        (3, 40, 8, 64, 8, 16),  # both divide
        (2, 5, 4, 9, 512, 8192),  # chunks larger than T and V: one tile
        (2, 11, 5, 17, 3, 1),  # one vocabulary column per tile
    ],
)
def test_token_logps_value_and_gradients_equal_full_logits_float64(b, t, d, v, chunk, vocab_chunk):
    rng = np.random.default_rng(t * v)
    with jax.enable_x64(True):
        h = jnp.asarray(rng.normal(size=(b, t, d)))
        w = jnp.asarray(rng.normal(size=(d, v)))
        tgt = jnp.asarray(rng.integers(0, v, (b, t)))
        ct = jnp.asarray(rng.normal(size=(b, t)))  # a general cotangent, not only ones

        def tiled(h, w):
            return token_logps(h, w, tgt, chunk, vocab_chunk=vocab_chunk)

        def full(h, w):
            return full_logits_logps(h, w, tgt)

        def grads(fn):
            return jax.jit(jax.grad(lambda h, w: (fn(h, w) * ct).sum(), argnums=(0, 1)))(h, w)

        lp, want_lp = tiled(h, w), jax.jit(full)(h, w)
        (dh, dw), (want_dh, want_dw) = grads(tiled), grads(full)
        assert lp.dtype == dh.dtype == dw.dtype == jnp.float64
        lp, want_lp, dh, want_dh, dw, want_dw = map(np.asarray, (lp, want_lp, dh, want_dh, dw, want_dw))
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "marked, chunk, vocab_chunk",
    [
        ({0: [2, 3, 4], 1: [9], 2: [0, 3, 4, 7, 8]}, 10, None),  # 9 marked: 1 of 3 tiles of T computed
        ({0: range(10), 2: [1]}, 10, None),  # 11 marked: 2 tiles computed, the second with one
        ({}, 10, None),  # nothing marked: every tile skipped
        ({0: [2, 3, 4], 1: [9], 2: [0, 3, 4, 7, 8]}, 4, 7),  # the tiled VJP: values masked
    ],
)
def test_token_logps_mask_equals_full_logits_on_marked_positions_float64(marked, chunk, vocab_chunk):
    """`mask`: marked positions get the full-logits log-prob and gradients, the others 0 and no
    gradient. B*T = 3 * 10; where the logits are formed whole (chunk >= T, vocab_chunk >= V) the
    marked positions are packed into tiles of T and tiles past them are skipped."""
    rng = np.random.default_rng(3)
    b, t, d, v = 3, 10, 6, 23
    mask = np.zeros((b, t), bool)
    for row, cols in marked.items():
        mask[row, list(cols)] = True
    with jax.enable_x64(True):
        h = jnp.asarray(rng.normal(size=(b, t, d)))
        w = jnp.asarray(rng.normal(size=(d, v)))
        tgt = jnp.asarray(rng.integers(0, v, (b, t)))
        ct = jnp.asarray(rng.normal(size=(b, t)))

        def masked(h, w):
            return token_logps(h, w, tgt, chunk, vocab_chunk=vocab_chunk or v, mask=jnp.asarray(mask))

        def full(h, w):
            return jnp.where(mask, full_logits_logps(h, w, tgt), 0.0)

        def grads(fn):
            return jax.jit(jax.grad(lambda h, w: (fn(h, w) * ct).sum(), argnums=(0, 1)))(h, w)

        lp, want_lp = jax.jit(masked)(h, w), jax.jit(full)(h, w)
        (dh, dw), (want_dh, want_dw) = grads(masked), grads(full)
        lp, want_lp, dh, want_dh, dw, want_dw = map(np.asarray, (lp, want_lp, dh, want_dh, dw, want_dw))
    assert (lp[~mask] == 0).all() and (lp[mask] < 0).all()
    assert (dh[~mask] == 0).all()
    np.testing.assert_allclose(lp, want_lp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-10, atol=1e-12)


def test_token_logps_mask_skips_the_head_products_of_unmarked_tiles():
    """The masked whole-logits head is one conditional per tile of T positions, and the
    skipped branch holds no product: a tile without marked positions costs no head dot."""
    b, t, d, v = 2, 8, 4, 11
    h, w = jnp.ones((b, t, d)), jnp.ones((d, v))
    tgt, mask = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, t), bool)
    fn = token_logps.__wrapped__ if hasattr(token_logps, "__wrapped__") else token_logps
    jaxpr = jax.make_jaxpr(lambda h: fn(h, w, tgt, t, vocab_chunk=v, mask=mask))(h)
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == b
    for e in conds:
        skipped, computed = e.params["branches"]  # index 0: the predicate is false
        assert "dot_general" not in str(skipped) and "dot_general" in str(computed)
    out = jax.jit(lambda h: fn(h, w, tgt, t, vocab_chunk=v, mask=mask))(h)
    assert (np.asarray(out) == 0).all()


def test_token_logps_bfloat16_inputs_accumulate_in_float32():
    """bfloat16 hidden with float32 weights: log-probs come back float32 and match float32
    logits of the bfloat16-rounded inputs; gradients keep each input's dtype."""
    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.normal(size=(2, 33, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(32, 70)) / 4, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, 70, (2, 33)))
    lp = token_logps(h, w, tgt, 8, vocab_chunk=16)
    assert lp.dtype == jnp.float32
    want = full_logits_logps(h.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32), tgt)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(want), rtol=1e-4, atol=1e-4)
    dh, dw = jax.jit(jax.grad(lambda h, w: token_logps(h, w, tgt, 8, vocab_chunk=16).sum(), argnums=(0, 1)))(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    want_dh, want_dw = jax.jit(
        jax.grad(lambda h, w: full_logits_logps(h.astype(jnp.float32), w, tgt).sum(), argnums=(0, 1))
    )(h, w.astype(jnp.bfloat16).astype(jnp.float32))
    for got, ref in ((dh, want_dh), (dw, want_dw)):  # tile gradients are formed from bfloat16 operands
        ref = np.asarray(ref)
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0.02, atol=0.02 * np.abs(ref).max())


def test_token_logps_sharded_on_batch_and_vocab_equals_unsharded():
    """As the train step shards them: hidden on batch, weights on vocab (tensor parallel).
    Each device tiles its own vocabulary shard: nothing is all-gathered."""
    rng = np.random.default_rng(11)
    mesh = jax.make_mesh((2, 4), ("batch", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with jax.enable_x64(True):
        h = jnp.asarray(rng.normal(size=(4, 21, 8)))
        w = jnp.asarray(rng.normal(size=(8, 52)))
        tgt = jnp.asarray(rng.integers(0, 52, (4, 21)))
        ct = jnp.asarray(rng.normal(size=(4, 21)))
        f = jax.value_and_grad(lambda h, w: (token_logps(h, w, tgt, 8, vocab_chunk=10) * ct).sum(), argnums=(0, 1))
        want_v, (want_dh, want_dw) = jax.jit(f)(h, w)
        shard = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))  # noqa: E731
        sharded = (shard(h, "batch"), shard(w, None, "tensor"))
        got_v, (dh, dw) = jax.jit(f)(*sharded)
        assert "all-gather" not in jax.jit(f).lower(*sharded).compile().as_text()
        assert dw.sharding.spec == PartitionSpec(None, "tensor")
        got_v, want_v, dh, want_dh, dw, want_dw = map(np.asarray, (got_v, want_v, dh, want_dh, dw, want_dw))
    np.testing.assert_allclose(got_v, want_v, rtol=1e-12)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-10, atol=1e-13)


def test_span_logprob_gradient_temporaries_within_an_eighth_of_full_logits():
    """Issue #5: `value_and_grad` of span log-prob gathering, compiled alone, at batch 2,
    sequence 4096 and Qwen2.5-0.5B's output layer (hidden 896, vocabulary 151936; tied
    embeddings), with default chunks. Full float32 logits would be B*T*V*4 = 4.6 GiB; the
    budget for temporaries is an eighth of that. The weight gradient (D*V*4 = 519 MiB) is an
    output, not a temporary. Lowered from ShapeDtypeStructs: nothing is allocated."""
    b, t, v, d = 2, 4096, 151936, 896

    def span_sum(hidden, w, targets, span_mask):
        sums, _ = span_logps(token_logps(hidden, w, targets), span_mask)  # [B]: row 0 chosen, row 1 rejected
        return sums.sum()

    sds = jax.ShapeDtypeStruct
    args = (sds((b, t, d), jnp.float32), sds((d, v), jnp.float32), sds((b, t), jnp.int32), sds((b, t), jnp.float32))
    compiled = jax.jit(jax.value_and_grad(span_sum, argnums=(0, 1))).lower(*args).compile()
    mem = compiled.memory_analysis()
    assert mem is not None
    temp, budget, mib = mem.temp_size_in_bytes, b * t * v * 4 // 8, 2**20
    print(
        f"span log-prob value_and_grad (B={b}, T={t}, V={v}, D={d}): temporaries {temp / mib:.1f} MiB, "
        f"budget B*T*V*4/8 = {budget / mib:.1f} MiB; outputs {mem.output_size_in_bytes / mib:.1f} MiB"
    )
    assert 0 < temp <= budget
