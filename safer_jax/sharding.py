"""Mesh construction and the one logical-axis -> mesh-axis rules table.

Parameters and activations name their dimensions with logical axes ("embed", "heads", ...);
`LOGICAL_AXIS_RULES` maps each to mesh axes. A dimension that its mesh axes do not divide
(SmolLM2's 9 heads on tensor=2) is replicated on those axes instead of failing, and that
fallback is logged once per (logical axis, size, mesh axes).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from safer_jax.config import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("dcn", "data", "fsdp", "tensor")

# logical axis -> mesh axes (None = replicated). The single source of sharding truth.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "layers": None,
    "norm": None,
    # activations
    "batch": ("dcn", "data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}

_logged_fallbacks: set[tuple[str, int, tuple[str, ...]]] = set()


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("dcn", "data", "fsdp", "tensor") mesh with Auto axis types (compiler-propagated sharding).

    With `dcn` > 1 on a multi-slice TPU job, each slice holds one `dcn` index and the inner
    axes lie within a slice (`mesh_utils.create_hybrid_device_mesh`), so only the data-parallel
    gradient reduction crosses the slower network between slices.
    """
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    if os.environ.get("SAFER_JAX_TEST_DEVICE_ORDER") == "interleaved":  # test hook: processes' devices alternate
        rank = {d: sum(x.process_index == d.process_index for x in devices[:i]) for i, d in enumerate(devices)}
        devices = sorted(devices, key=lambda d: (rank[d], d.process_index))
    names = list(config.shape())
    sizes = list(config.shape().values())
    n = len(devices)
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {config.shape()}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {config.shape()}")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if n % known:
            raise ValueError(
                f"mesh: {n} devices ({jax.process_count()} processes) are not divisible by the fixed "
                f"axes {config.shape()}"
            )
        sizes[free[0]] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh: {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, but jax.devices() has "
            f"{n} ({jax.process_count()} processes); fix the mesh section of the config"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    slices = {getattr(d, "slice_index", None) for d in devices}
    if sizes[0] > 1 and None not in slices and len(slices) > 1:
        if len(slices) != sizes[0]:
            raise ValueError(f"mesh: dcn={sizes[0]} but the devices lie in {len(slices)} slices")
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh([1, *sizes[1:]], [sizes[0], 1, 1, 1], devices)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def batch_ways(mesh: Mesh | None) -> int:
    """How many ways the mesh splits the batch axis (1 without a mesh)."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in LOGICAL_AXIS_RULES["batch"] or ())


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for `logical_axes`; with `shape` and `mesh`, drop mesh axes that do not divide.

    A mesh axis is used at most once per spec (the first dimension that claims it wins), and
    mesh axes of size 1 are dropped so specs stay readable.
    """
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise KeyError(f"no sharding rule for logical axis {name!r}; known: {sorted(LOGICAL_AXIS_RULES)}")
        axes = tuple(a for a in (LOGICAL_AXIS_RULES[name] or ()) if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes:
                size = math.prod(mesh.shape[a] for a in axes)
                if shape[i] % size:
                    key = (name, int(shape[i]), axes)
                    if key not in _logged_fallbacks:
                        _logged_fallbacks.add(key)
                        log.warning(
                            "sharding: %s=%d is not divisible by mesh axes %s (size %d); replicating it there",
                            name,
                            shape[i],
                            axes,
                            size,
                        )
                    axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def constrain(x: jax.Array, mesh: Mesh | None, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; a no-op without a mesh (the same code path)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, x.shape))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
    """The global batch from each process's rows `[b, ...]`, batch-sharded on ("dcn", "data", "fsdp")."""
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        sharding = named_sharding(mesh, ("batch",) + (None,) * (v.ndim - 1), shape)
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


def row_origins(mesh: Mesh | None, local_rows: int) -> np.ndarray:
    """`[N, 2]` (process, local row) of every row of a global batch that `shard_batch` assembles
    from `local_rows` rows per process, in global order, on every process.

    `make_array_from_process_local_data` places each process's rows on that process's devices
    in device order, so the global order follows the mesh's device order, which the code that
    splits rows into pairs must not assume blindly: this says what it actually is.
    """
    n_proc = jax.process_count()
    local = np.stack([np.full(local_rows, jax.process_index(), np.int32), np.arange(local_rows, dtype=np.int32)], 1)
    if mesh is None or n_proc == 1:
        return local
    from jax.experimental import multihost_utils

    glob = shard_batch({"origin": local}, mesh)["origin"]
    return np.asarray(multihost_utils.process_allgather(glob, tiled=True)).reshape(n_proc * local_rows, 2)
