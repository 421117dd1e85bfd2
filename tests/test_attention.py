"""Attention backends against the `xla` reference: splash in Pallas interpret mode on CPU,
the cuDNN call's arguments (run through the XLA path of the same public function), and the
clear errors for a backend whose hardware is absent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safer_jax.models.attention import AttentionInputs, _cudnn_attention, attention, cudnn_arguments, require_hardware

B, T, N, K, H = 2, 128, 4, 2, 32


def _packed():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    seg = np.zeros((B, T), np.int32)
    seg[0, :50], seg[0, 50:110] = 1, 2  # two segments, then padding
    seg[1, :40], seg[1, 40:80], seg[1, 80:] = 1, 2, 3  # three segments, no padding
    idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return q, k, v, jnp.asarray(seg), jnp.asarray(idx)


def _real(x, seg):
    return np.asarray(x)[np.asarray(seg) > 0]  # rows of real tokens (padding outputs are unused)


def test_splash_matches_xla_interpret():
    window = 0  # windows: test_decoder_with_splash_matches_xla
    q, k, v, seg, idx = _packed()
    ref = attention(q, k, v, seg, seg, idx, idx, window, "xla")
    out = jax.jit(lambda q, k, v: attention(q, k, v, seg, seg, idx, idx, window, "splash"))(q, k, v)
    np.testing.assert_allclose(_real(out, seg), _real(ref, seg), atol=1e-5, rtol=1e-5)


def test_splash_gradient_matches_xla():
    q, k, v, seg, idx = _packed()
    w = jnp.asarray(np.asarray(seg)[:, :, None, None] > 0, jnp.float32)  # loss on real rows only

    def loss(backend):
        return lambda q, k, v: (attention(q, k, v, seg, seg, idx, idx, 0, backend) * w).sum()

    ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window, packed", [(0, True), (24, True), (0, False)])
def test_cudnn_arguments(window, packed):
    q, k, v, seg, idx = _packed()
    inp = AttentionInputs(seg, seg, idx, idx, window)
    kw = cudnn_arguments(inp, packed=packed)
    assert kw["is_causal"] is True  # cuDNN's causal mask type, not a dense causal mask
    np.testing.assert_array_equal(kw["query_seq_lengths"], [110, 128])
    np.testing.assert_array_equal(kw["key_value_seq_lengths"], [110, 128])
    assert kw.get("local_window_size") == ((window - 1, 0) if window else None)
    assert ("mask" in kw) == packed
    # the same arguments through the XLA implementation of the same public function
    out = _cudnn_attention(q, k, v, inp, packed=packed, implementation="xla")
    if packed:
        ref = attention(q, k, v, seg, seg, idx, idx, window, "xla")
    else:  # one segment a row: only the lengths separate the rows' tokens from padding
        one = jnp.where(seg > 0, 1, 0)
        ref = attention(q, k, v, one, one, idx, idx, window, "xla")
    np.testing.assert_allclose(_real(out, seg), _real(ref, seg), atol=1e-5, rtol=1e-5)


def test_backends_without_hardware_fail_clearly():
    q, k, v, seg, idx = _packed()
    with pytest.raises(ValueError, match="'cudnn' needs a GPU; this process runs on 'cpu'"):
        attention(q, k, v, seg, seg, idx, idx, 0, "cudnn")
    with pytest.raises(ValueError, match="'splash' needs a TPU"):
        require_hardware("splash", "cpu")
    with pytest.raises(ValueError, match="unknown"):
        require_hardware("flash", "gpu")
    require_hardware("cudnn", "gpu")
    require_hardware("splash", "tpu")


def test_decoder_with_splash_matches_xla(tmp_path):
    from flax import nnx

    from safer_jax.models import Decoder
    from safer_jax.models.config import DecoderConfig

    cfg = DecoderConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        sliding_windows=(16, 16),
    )
    with nnx.use_eager_sharding(False):
        model = Decoder(cfg, rngs=nnx.Rngs(0))
    _, _, _, seg, _ = _packed()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (B, T)), jnp.int32)
    graphdef, state = nnx.split(model)
    ref = model(ids, segment_ids=seg)
    model.config = cfg.replace(attention="splash")  # sliding windows equal on all layers: static under the scan
    graphdef, _ = nnx.split(model)
    out = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i, segment_ids=seg))(state, ids)
    np.testing.assert_allclose(_real(out, seg), _real(ref, seg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [0, 48])  # one block; three causal blocks of query rows, the last short
def test_cpu_layout_backward_equals_autodiff_float64(block, monkeypatch):
    """The XLA:CPU forms (`matmuls`' and `_cpu_attention`'s hand-written backward, what one-device
    CPU runs take) give the einsum path's loss and gradients: a two-layer decoder (one layer
    with a sliding window) on packed rows with padding, float64, against the same model with
    them switched off."""
    import dataclasses

    from flax import nnx

    import safer_jax.models.attention as att
    import safer_jax.models.decoder as dec
    from safer_jax.bench.shapes import SHAPES
    from safer_jax.models import Decoder, from_hf_config

    monkeypatch.setattr(att, "CPU_QUERY_BLOCK", block)
    seg = _packed()[3]
    with jax.enable_x64(True):
        cfg = from_hf_config(dict(SHAPES["tiny"]), where="test", dtype="float64", param_dtype="float64")
        cfg = dataclasses.replace(cfg, scan_layers=False, sliding_windows=(16, 0))
        with nnx.use_eager_sharding(False):
            model = Decoder(cfg, rngs=nnx.Rngs(0))
        gd, params = nnx.split(model)
        ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, seg.shape))

        def loss(p):
            logits = nnx.merge(gd, p)(ids, segment_ids=seg)
            return jnp.sum(jnp.where(seg[..., None] > 0, jnp.sin(logits), 0))

        results = {}
        for cpu in (True, False):
            dec._cpu_matmuls, saved = (lambda mesh, cpu=cpu: cpu), dec._cpu_matmuls
            try:
                results[cpu] = jax.jit(jax.value_and_grad(loss))(params)
            finally:
                dec._cpu_matmuls = saved
        for g, w in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False]), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-11)
