"""Logits parity with transformers for every family, scan on and off, and the export round trip."""

import numpy as np
import pytest
import torch
from tiny_models import FAMILY_CONFIGS, make_tiny

from safer_jax.models import from_pretrained, save_pretrained
from safer_jax.models.rope import inv_frequencies

T = 64


def right_padded_batch(vocab: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(2, T))
    mask = np.ones((2, T), np.int64)
    mask[1, 41:] = 0  # second row: 41 real tokens, then padding
    ids[1, 41:] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def assert_close_on_tokens(ours, ref, mask, tol=1e-4):
    sel = mask.astype(bool)
    np.testing.assert_allclose(ours[sel], ref[sel], rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", sorted(FAMILY_CONFIGS))
def test_family_logits_match_transformers_and_export_roundtrip(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    tm = make_tiny(kind, tmp_path / "hf")
    ids, mask = right_padded_batch(tm.config.vocab_size)
    ref = torch_logits(tm, ids, mask)
    seg = mask.astype(np.int32)
    for scan in (True, False):
        model = from_pretrained(tmp_path / "hf", scan_layers=scan)
        assert model.config.scan_layers is scan
        out = np.asarray(model(ids, segment_ids=seg))
        assert out.dtype == np.float32 and out.shape == (2, T, tm.config.vocab_size)
        assert_close_on_tokens(out, ref, mask)
    # export and reload in transformers: same logits
    save_pretrained(model, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert_close_on_tokens(torch_logits(back, ids, mask), ref, mask)
    if tm.config.tie_word_embeddings:
        from safetensors import safe_open

        with safe_open(str(tmp_path / "out" / "model.safetensors"), "numpy") as f:
            assert "lm_head.weight" not in f.keys()  # noqa: SIM118 (safe_open has no __contains__)


def test_llama3_rope_frequencies_match_transformers(tmp_path):
    tm = make_tiny("llama3", tmp_path)
    model = from_pretrained(tmp_path)
    ours = inv_frequencies(model.config)
    ref = tm.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # the scaling actually changed something: low frequencies are divided by the factor
    plain = inv_frequencies(model.config.replace(rope_scaling=()))
    assert not np.allclose(ours, plain)
    assert np.isclose(ours[-1], plain[-1] / 8.0)


def test_mistral_sliding_window_is_applied(tmp_path):
    """The window (8) is shorter than the sequence: a model without it gives other logits."""
    make_tiny("mistral", tmp_path)
    model = from_pretrained(tmp_path)
    assert model.config.sliding_windows == (8,) * 3
    ids, _ = right_padded_batch(160)
    with_window = np.asarray(model(ids))
    model.config = model.config.replace(sliding_windows=(0,) * 3)
    assert not np.allclose(with_window[:, 20:], np.asarray(model(ids))[:, 20:], atol=1e-3)


def test_packed_row_gives_each_example_its_own_logits(tmp_path):
    make_tiny("qwen2", tmp_path)
    model = from_pretrained(tmp_path)
    rng = np.random.RandomState(1)
    a, b = rng.randint(3, 160, size=23), rng.randint(3, 160, size=17)
    packed = np.concatenate([a, b, np.zeros(4, int)])[None]
    seg = np.array([[1] * 23 + [2] * 17 + [0] * 4])
    out = np.asarray(model(packed, segment_ids=seg))[0]  # positions derived from segments
    np.testing.assert_allclose(out[:23], np.asarray(model(a[None]))[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[23:40], np.asarray(model(b[None]))[0], atol=1e-5, rtol=1e-5)
    assert np.isfinite(out).all()  # padding rows: no NaN


def test_bfloat16_compute_and_params(tmp_path):
    tm = make_tiny("llama3", tmp_path)
    import jax.numpy as jnp

    model = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model.layers.wq[...].dtype == jnp.bfloat16
    mixed = from_pretrained(tmp_path, dtype="bfloat16", param_dtype="float32")
    assert mixed.layers.wq[...].dtype == jnp.float32
    ids, mask = right_padded_batch(160)
    ref = torch_logits(tm, ids, np.ones_like(mask))
    out = np.asarray(mixed(ids))
    assert out.dtype == np.float32
    # bf16 compute: same ranking of the top token on most positions
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_policies_do_not_change_logits_or_gradients(tmp_path, remat):
    import jax
    from flax import nnx

    make_tiny("qwen3", tmp_path)
    ids = np.random.RandomState(0).randint(3, 160, size=(2, 16))
    base = from_pretrained(tmp_path)
    other = from_pretrained(tmp_path, remat=remat)

    def loss(m):
        return m(ids).mean()

    g0 = nnx.grad(loss)(base)
    g1 = nnx.grad(loss)(other)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_attention_backends_agree(tmp_path):
    make_tiny("qwen2", tmp_path)
    ids, mask = right_padded_batch(160)
    a = np.asarray(from_pretrained(tmp_path)(ids, segment_ids=mask))
    b = np.asarray(from_pretrained(tmp_path, attention="jax")(ids, segment_ids=mask))
    sel = mask.astype(bool)
    np.testing.assert_allclose(a[sel], b[sel], rtol=1e-5, atol=1e-5)
