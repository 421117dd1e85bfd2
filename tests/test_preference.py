"""The step-level preference step: log 2 at the reference, span-only gradients, learning, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from safer_jax.config import MeshConfig
from safer_jax.data.pairs import make_pairs
from safer_jax.data.pipeline import PipelineConfig, preference_dataset
from safer_jax.data.rules import load_rules
from safer_jax.losses import DEFAULT_HPARAMS, span_logps, token_logps
from safer_jax.models import from_pretrained
from safer_jax.sharding import make_mesh, shard_batch
from safer_jax.training.preference import pair_span_logps, preference_step
from safer_jax.training.sft import init_state


def pair_batch(traces, ct, n_pairs=4, seed=0, seq_len=384):
    pairs = make_pairs(traces[:12], load_rules(), seed=seed)
    it = iter(preference_dataset(pairs, ct, PipelineConfig(seq_len=seq_len, batch_size=n_pairs, seed=seed)))
    return {k: jnp.asarray(v) for k, v in next(it).items()}


def setup(d, mesh=None, dtype="float32"):
    model = from_pretrained(d, mesh=mesh, dtype=dtype)
    graphdef, params = nnx.split(model)
    ref = jax.tree.map(jnp.copy, params)
    return graphdef, params, ref


def test_loss_is_log_two_when_policy_equals_reference(tiny, traces):
    """At the reference the loss is log 2 and every reward is zero, to float32 rounding: the
    policy's span sums come from the differentiated forward and the reference's from a plain
    one, two XLA programs that are equal in exact arithmetic but may round a sum differently
    in its last place (a margin of -7.6e-7 seen here is beta x 1/16 of an ulp of the largest sum)."""
    d, ct = tiny
    graphdef, params, ref = setup(d)
    tx = optax.sgd(0.0)
    batch = pair_batch(traces, ct)
    _, m = jax.jit(lambda s, b, r: preference_step(s, b, r, graphdef=graphdef, tx=tx))(
        init_state(params, tx), batch, ref
    )
    sums, _ = jax.jit(lambda p: pair_span_logps(p, graphdef, batch, 512))(ref)  # [2B]
    beta = DEFAULT_HPARAMS["beta"]
    ulp = float(np.spacing(np.float32(np.abs(np.asarray(sums)).max())))
    assert np.abs(np.asarray(sums)).min() > 1.0  # real span sums, not empty spans
    assert math.isclose(float(m["loss"]), math.log(2.0), rel_tol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert abs(float(m[key])) <= beta * 2 * ulp, (key, float(m[key]), beta * ulp)
    assert abs(float(m["rewards/margin"])) <= beta * 4 * ulp, (float(m["rewards/margin"]), beta * ulp)


def test_only_span_tokens_carry_gradient():
    """Changing the labels of context tokens (outside the span) changes neither value nor gradient."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(4, 30, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
    targets = rng.integers(0, 40, (4, 30))
    mask = np.zeros((4, 30))
    mask[:, 12:20] = 1
    other = targets.copy()
    other[:, :12] = rng.integers(0, 40, (4, 12))  # new context labels
    other[:, 20:] = rng.integers(0, 40, (4, 10))

    def f(h, t):
        s, _ = span_logps(token_logps(h, w, jnp.asarray(t), chunk_size=8), jnp.asarray(mask))
        return (s * jnp.arange(1.0, 5.0)).sum()

    v1, g1 = jax.value_and_grad(f)(h, targets)
    v2, g2 = jax.value_and_grad(f)(h, other)
    assert float(v1) == float(v2)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    assert np.abs(np.asarray(g1)[:, 12:20]).sum() > 0 and np.abs(np.asarray(g1)[:, :12]).sum() == 0


def test_training_raises_margin_and_accuracy_and_leaves_the_reference_alone(tiny, traces):
    d, ct = tiny
    graphdef, params, ref = setup(d)
    ref_before = jax.tree.map(np.asarray, ref)
    policy_before = jax.tree.map(np.asarray, params)
    tx = optax.adam(1e-3)
    step = jax.jit(lambda s, b, r: preference_step(s, b, r, graphdef=graphdef, tx=tx, hparams={"beta": 0.5}))
    state = init_state(params, tx)
    batch = pair_batch(traces, ct)
    hist = []
    for _ in range(8):
        state, m = step(state, batch, ref)
        hist.append({k: float(v) for k, v in m.items()})
    print("margin", [round(h["rewards/margin"], 3) for h in hist], "accuracy", [h["rewards/accuracy"] for h in hist])
    assert hist[-1]["rewards/margin"] > hist[0]["rewards/margin"] + 0.1
    assert hist[-1]["rewards/accuracy"] > hist[0]["rewards/accuracy"] or hist[-1]["rewards/accuracy"] == 1.0
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert any(
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(policy_before), jax.tree.leaves(state.params))
    )
    for a, b in zip(jax.tree.leaves(ref_before), jax.tree.leaves(ref)):
        assert np.array_equal(a, np.asarray(b))


def test_sharded_preference_step_matches_unsharded(tiny, traces):
    d, ct = tiny
    batch = pair_batch(traces, ct, n_pairs=4)
    ident = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda g, s, p=None: (g, s))

    def loss_and_grads(mesh):
        graphdef, params, ref = setup(d, mesh, dtype="float64")
        state = init_state(jax.tree.map(jnp.zeros_like, params), ident, mesh).replace(params=params)
        b = shard_batch({k: np.asarray(v) for k, v in batch.items()}, mesh) if mesh is not None else batch
        new, m = jax.jit(lambda s, b, r: preference_step(s, b, r, graphdef=graphdef, tx=ident, hparams={"beta": 0.5}))(
            state, b, ref
        )
        grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new.params, params)
        return float(m["loss"]), grads

    # float64: tensor-parallel partial sums round differently in float32 (measured up to 5.6e-7
    # absolute on gradients); in float64 any real sharding error would remain visible
    with jax.enable_x64(True):
        l0, g0 = loss_and_grads(None)
        l1, g1 = loss_and_grads(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    assert g0["layers"]["wq"][...].dtype == np.float64
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)
