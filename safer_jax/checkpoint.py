"""Orbax checkpoints of a pytree train state plus the grain iterator. Knows no training code.

Saves are asynchronous and keep the newest N. Orbax writes each step to a temporary
folder and renames it when complete, so `latest_step()` only ever sees complete
checkpoints: a process killed mid-save resumes from the previous one. Restoring takes an
abstract target (ShapeDtypeStructs with shardings), so a checkpoint restores onto another
mesh shape.

The folder is an `etils.epath` path: local, or a bucket URL that orbax (through
tensorstore) writes to directly.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from safer_jax.paths import as_path, is_remote

# Orbax writes a replicated array in parallel from its replicas, each one a slice taken by a jitted
# program compiled per shape and offset. Below this size a slice saves no time, and the compiles
# (dozens per save of a small model, about 0.2 s each on CPU) cost more than the write.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 8 << 20
_absl = logging.getLogger("absl")
_level = _absl.level
_absl.setLevel(logging.ERROR)  # orbax warns that the handler is replaced, which is the point
try:
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL),
        override=True,
    )
finally:
    _absl.setLevel(_level)


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True):
        # tensorstore needs absolute local paths; bucket URLs stay as given
        self.directory: epath.Path = as_path(directory if is_remote(directory) else os.path.abspath(directory))
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.mgr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.mgr.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.mgr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """The state at `step` (default: latest), placed as `abstract_state` says; restores `data_iter` in place.

        Every process runs the same global data pipeline, so any process's iterator state is
        every process's: a checkpoint written by N processes restores on M.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        data_dir = self.directory / str(step) / "data"
        own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        foreign = data_iter is not None and not own.exists()
        if data_iter is not None and not foreign:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        state = self.mgr.restore(step, args=ocp.args.Composite(**items))["state"]
        if foreign:  # written by another process count: take process 0's state
            saved = sorted(data_dir.glob("process_0-of-*.json"))
            if not saved:
                raise FileNotFoundError(f"{data_dir}: no data iterator state to resume from")
            data_iter.set_state(json.loads(saved[0].read_text()))
        return state

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
