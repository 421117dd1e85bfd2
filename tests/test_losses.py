"""Preference losses against independent float64 NumPy formulas; LD-DPO gathering; memory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safer_jax.losses import preference_loss, span_logps, token_logps


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
        d = beta * ((pc - rc) - (pr - rr)) - alpha * (lc - lr)
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


@pytest.mark.parametrize("kind, hp", [
    ("sigmoid", {}), ("sigmoid", {"beta": 0.3, "label_smoothing": 0.1}), ("ipo", {"beta": 0.5}),
    ("sigmoid_norm", {"beta": 2.0}), ("rdpo", {"alpha": 0.01}), ("simpo", {"beta": 2.0, "gamma": 1.0}),
    ("simpo", {"label_smoothing": 0.2}), ("sigmoid", {"rpo_lambda": 0.5}),
])
def test_losses_match_float64_numpy(kind, hp):
    pc, pr, rc, rr, lc, lr = random_inputs()
    want = reference_numpy(kind, pc, pr, rc, rr, lc, lr, beta=hp.get("beta", 0.1), eps=hp.get("label_smoothing", 0.0),
                           alpha=hp.get("alpha", 0.0), gamma=hp.get("gamma", 0.5), rpo=hp.get("rpo_lambda", 0.0))
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


def test_ld_dpo_weighting_matches_numpy():
    rng = np.random.default_rng(3)
    b, t = 3, 40
    lp = rng.uniform(-8, -0.01, (2 * b, t))
    mask = np.zeros((2 * b, t))
    starts = rng.integers(0, 10, 2 * b)
    lens = rng.integers(3, 25, 2 * b)
    for i in range(2 * b):
        mask[i, starts[i]:starts[i] + lens[i]] = 1
    for alpha in (1.0, 0.5, 0.0):
        sums, lengths = span_logps(jnp.asarray(lp, jnp.float32), jnp.asarray(mask), ld_alpha=alpha)
        want = []
        for i in range(2 * b):
            short = min(lens[i % b], lens[b + i % b])
            toks = lp[i, starts[i]:starts[i] + lens[i]]
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
    g2 = jax.grad(lambda h: jnp.take_along_axis(jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), -1),
                                                t[..., None], -1).sum())(h)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-5)

