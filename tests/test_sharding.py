"""Sharding on 8 fake CPU devices: the rules table decides every parameter's placement."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_models import make_tiny

from safer_jax import sharding
from safer_jax.config import MeshConfig
from safer_jax.models import from_pretrained
from safer_jax.sharding import logical_to_spec, make_mesh

MESH = MeshConfig(data=2, fsdp=2, tensor=2)

# hand-written from DESIGN.md's table: embed->fsdp; heads, kv_heads, mlp, vocab->tensor
EXPECTED_QWEN2 = {
    "embed": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "final_norm": P(None),
    "layers/attn_norm": P(None, None),
    "layers/mlp_norm": P(None, None),
    "layers/wq": P(None, "fsdp", "tensor", None),
    "layers/wk": P(None, "fsdp", "tensor", None),
    "layers/wv": P(None, "fsdp", "tensor", None),
    "layers/wo": P(None, "tensor", None, "fsdp"),
    "layers/bq": P(None, "tensor", None),
    "layers/bk": P(None, "tensor", None),
    "layers/bv": P(None, "tensor", None),
    "layers/w_gate": P(None, "fsdp", "tensor"),
    "layers/w_up": P(None, "fsdp", "tensor"),
    "layers/w_down": P(None, "tensor", "fsdp"),
}


def params(model):
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_make_mesh_sizes_and_auto_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1)).shape)["fsdp"] == 8
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh(MeshConfig(data=3, fsdp=2, tensor=2))
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh(MeshConfig(data=-1, fsdp=-1, tensor=1))


def test_dcn_axis_is_data_parallel():
    """Across slices only the batch is split: dcn joins the batch axes, parameters never use it."""
    from safer_jax.sharding import batch_ways, logical_to_spec

    mesh = make_mesh(MeshConfig(dcn=2, data=1, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 2, "tensor": 2}
    assert batch_ways(mesh) == 4
    assert logical_to_spec(("batch", "length"), (8, 16), mesh) == jax.sharding.PartitionSpec(("dcn", "fsdp"), None)
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    with pytest.raises(ValueError, match=r"jax.devices\(\) has 8"):
        make_mesh(MeshConfig(dcn=2, data=1, fsdp=4, tensor=2))


def test_logical_to_spec_replicates_what_does_not_divide(caplog):
    mesh = make_mesh(MESH)
    sharding._logged_fallbacks.clear()
    with caplog.at_level(logging.WARNING, logger="safer_jax.sharding"):
        assert logical_to_spec(("embed", "heads", "head_dim"), (64, 9, 16), mesh) == P("fsdp", None, None)
        assert logical_to_spec(("embed", "heads", "head_dim"), (64, 9, 16), mesh) == P("fsdp", None, None)
    assert sum("heads=9" in r.message for r in caplog.records) == 1
    assert logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), (2, 5), mesh) == P(None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",), (4,), mesh)


def test_sharded_parameters_follow_the_table_and_logits_match(tmp_path):
    make_tiny("qwen2", tmp_path)
    mesh = make_mesh(MESH)
    sharded = from_pretrained(tmp_path, mesh=mesh)
    plain = from_pretrained(tmp_path)
    got = params(sharded)
    assert set(got) == set(EXPECTED_QWEN2)
    for name, spec in EXPECTED_QWEN2.items():
        arr = got[name]
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), (name, arr.sharding.spec, spec)
        # each device holds only its shard, not a full copy
        shard_elems = arr.addressable_shards[0].data.size
        expect = arr.size // np.prod([mesh.shape[a] for s in spec if s for a in ((s,) if isinstance(s, str) else s)])
        assert shard_elems == expect, name
    ids = np.random.RandomState(0).randint(3, 160, size=(4, 24))
    out = jitted_logits(sharded, ids)
    assert out.sharding.spec[0] == ("data", "fsdp")
    want = np.asarray(plain(ids))
    # float32: tensor=2 adds row-parallel partial sums (o_proj, down_proj) in another order,
    # so logits differ by rounding only (measured max 1.6e-5 on |logits| <= 6.8)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(sharded(ids)), want, rtol=1e-4, atol=1e-4)


def jitted_logits(model, ids):
    graphdef, state = nnx.split(model)
    batch = sharding.shard_batch({"ids": ids}, model.mesh)["ids"] if model.mesh is not None else ids
    return jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(state, batch)


def test_sharded_logits_equal_unsharded_exactly_up_to_rounding(tmp_path):
    """In float64 rounding vanishes (measured 2e-14): any sharding error would remain."""
    make_tiny("qwen2", tmp_path)
    ids = np.random.RandomState(0).randint(3, 160, size=(8, 24))
    with jax.enable_x64(True):
        want = np.asarray(from_pretrained(tmp_path, dtype="float64")(ids))
        got = np.asarray(jitted_logits(from_pretrained(tmp_path, dtype="float64", mesh=make_mesh(MESH)), ids))
    assert got.dtype == np.float64
    print(f"float64 sharded vs unsharded max |diff| = {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got - want).max() < 1e-10
