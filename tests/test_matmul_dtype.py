"""`matmul_dtype`: bf16 products accumulated in float32, parameters and activations in float32."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_models import make_tiny

from safer_jax.bench.work import BenchSpec
from safer_jax.models import from_pretrained
from safer_jax.models.config import DecoderConfig, ModelConfigError
from safer_jax.models.decoder import matmuls, project
from safer_jax.training.ref_cache import compute_settings


def _cos(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("mm_llama")
    return d, make_tiny("llama3", d)


def test_bf16_products_match_transformers_within_bf16_error(llama):
    folder, tm = llama
    ids = np.random.RandomState(0).randint(3, 160, size=(2, 32))
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(ids)).logits.float().numpy()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch_bf16 = tm(input_ids=torch.tensor(ids)).logits.float().numpy()  # transformers' own bf16 matmuls
    exact = np.asarray(from_pretrained(folder)(ids))
    mixed_model = from_pretrained(folder, matmul_dtype="bfloat16")
    assert mixed_model.config.matmul_dtype == "bfloat16"
    assert mixed_model.layers.wq[...].dtype == jnp.float32  # parameters stay float32
    mixed = np.asarray(mixed_model(ids))
    assert mixed.dtype == np.float32
    scale = np.abs(ref).max()
    err_exact = np.abs(exact - ref).max() / scale
    err_mixed = np.abs(mixed - ref).max() / scale
    err_torch = np.abs(torch_bf16 - ref).max() / scale
    assert err_exact < 1e-5
    # really rounded (float32 products match transformers to 1e-5), and no further from the float32
    # logits than torch's bf16 autocast is (it rounds the same products; activations stay float32 here)
    assert 1e-4 < err_mixed <= 1.5 * err_torch, (err_mixed, err_torch)
    assert (mixed.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_bf16_products_give_float32_gradients_close_to_exact(llama):
    folder, _ = llama
    ids = np.random.RandomState(1).randint(3, 160, size=(2, 24))

    def loss(m):
        lp = jax.nn.log_softmax(m(ids[:, :-1]), axis=-1)
        return -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1).mean()

    g0 = nnx.state(nnx.grad(loss)(from_pretrained(folder)), nnx.Param)
    g1 = nnx.state(nnx.grad(loss)(from_pretrained(folder, matmul_dtype="bfloat16")), nnx.Param)
    flat0, flat1 = dict(nnx.to_flat_state(g0)), dict(nnx.to_flat_state(g1))
    assert flat0.keys() == flat1.keys()
    for k in flat0:
        a, b = flat0[k][...], flat1[k][...]
        assert b.dtype == jnp.float32, k
        assert _cos(a, b) > 0.995, (k, _cos(a, b))


@pytest.mark.parametrize("devices", [1, 8])
def test_project_rounds_operands_on_both_paths(devices):
    """One device on CPU takes `matmuls` (custom VJP), a larger mesh the einsums: both round the
    operands to bf16 and accumulate in float32, forward and backward."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 16), np.float32))
    ws = (
        jnp.asarray(rng.standard_normal((16, 4, 8), np.float32)),
        jnp.asarray(rng.standard_normal((16, 24), np.float32)),
    )
    mesh = jax.make_mesh((devices,), ("data",))
    bf = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731

    def f(x, ws, compute):
        return sum((y * y).sum() for y in project(x, ws, mesh, compute=compute))

    ys = project(x, ws, mesh, compute="bfloat16")
    for y, w in zip(ys, ws, strict=True):
        want = jnp.einsum("BTK,KN->BTN", bf(x), bf(w).reshape(16, -1), precision="highest").reshape(y.shape)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-4)
    gx, gws = jax.grad(f, argnums=(0, 1))(x, ws, "bfloat16")
    ex, ews = jax.grad(f, argnums=(0, 1))(x, ws, None)
    assert gx.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in gws)
    for a, b in ((gx, ex), *zip(gws, ews, strict=True)):
        assert _cos(a, b) > 0.999 and not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
    """(lhs dtype, rhs dtype) of every dot of a compiled HLO module (instruction names are unique)."""
    dtypes = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    return [(dtypes[a], dtypes[b]) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the XLA:CPU layout trap")
def test_every_product_of_the_cpu_backward_stays_bf16():
    """XLA:CPU takes a bf16 dot whose operand is a bare transpose (column-major) in float32, which
    made the weight gradients as slow as float32 ones; `matmuls` writes `x^T` row-major."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 64), np.float32))
    ws = (
        jnp.asarray(rng.standard_normal((64, 96), np.float32)),
        jnp.asarray(rng.standard_normal((64, 32), np.float32)),
    )

    def f(x, ws):
        return sum((y * y).sum() for y in matmuls(x, ws, "bfloat16"))

    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, ws).compile().as_text()
    dots = _dot_operand_dtypes(hlo)
    assert len(dots) >= 5  # 2 forward, 2 input-gradient (maybe fused to 1), 2 weight-gradient
    assert all(d == ("bf16", "bf16") for d in dots), dots


def test_matmul_dtype_is_checked_and_keys_the_reference_cache():
    base = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1)
    base |= dict(num_heads=2, num_kv_heads=1, head_dim=4)
    with pytest.raises(ModelConfigError, match="matmul_dtype='int8'"):
        DecoderConfig(**base, matmul_dtype="int8")
    from safer_jax.config import ConfigError, SFTConfig, load_config

    assert load_config(SFTConfig, None, ["model.matmul_dtype=bfloat16"]).model.matmul_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=re.escape("model.matmul_dtype: 'bf16'")):
        load_config(SFTConfig, None, ["model.matmul_dtype=bf16"])
    with pytest.raises(ValueError, match="--matmul-dtype"):
        BenchSpec(matmul_dtype="int8")
    kw = dict(dtype="float32", param_dtype=None, attention="xla", span="step", ld_alpha=1.0, ld_reference=True)
    plain = compute_settings(**kw)
    assert "matmul_dtype" not in plain  # keys of existing float32 caches are unchanged
    assert compute_settings(**kw, matmul_dtype="bfloat16") != plain
