"""Run plumbing shared by the SFT and preference loops: run folders, models, tokenizers,
batches on the mesh, preemption, and export of checkpoints to HF folders.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from safer_jax.config import ModelConfig, to_dict
from safer_jax.sharding import batch_ways as sharding_batch_ways

TINY_PREFIX = "tiny"
EMBEDDED = "smollm2"
log = logging.getLogger("safer_jax.train")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "numpy", "safer-jax")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss under on_nan=stop); the last good checkpoint is kept."""


def write_run_files(run_dir: Path, cfg: Any) -> None:
    """The resolved config and the package versions, on process 0."""
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    versions = {"python": platform.python_version(), "backend": jax.default_backend(),
                "devices": len(jax.devices()), "processes": jax.process_count()}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    (run_dir / "versions.json").write_text(json.dumps(versions, indent=2))


def resolve_model_path(mc: ModelConfig, run_dir: Path, texts: Any = ()) -> tuple[str, str | None]:
    """(folder, gguf file) of the model: `tiny[:family]` is built in the run folder, `smollm2`
    is the embedded default, anything else a folder or hub id."""
    if mc.path.startswith(TINY_PREFIX):
        family = mc.path.split(":", 1)[1] if ":" in mc.path else "llama"
        folder = run_dir / "tiny-model"
        if not (folder / "config.json").exists() and jax.process_index() == 0:
            from safer_jax.models.tiny import build_tiny_model

            build_tiny_model(folder, texts, family=family)
        if jax.process_count() > 1:  # the others wait for process 0 to write it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tiny-model")
        return str(folder), None
    if mc.path == EMBEDDED:
        from safer_jax.models.embedded import smollm2_location

        folder, gguf = smollm2_location()
        return str(folder), gguf
    if not mc.path:
        raise ValueError("model.path is empty: give a HF folder, a hub id, 'smollm2' or 'tiny'")
    return mc.path, mc.gguf_file


def load_tokenizer(path: str, gguf_file: str | None, run_dir: Path) -> Any:
    """The tokenizer, saved once into the run folder (export and resume read it from there)."""
    from transformers import AutoTokenizer

    saved = run_dir / "tokenizer"
    if (saved / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(saved))
    from safer_jax.models.hf_io import resolve_path

    tok = AutoTokenizer.from_pretrained(str(resolve_path(path, gguf_file)), gguf_file=gguf_file)
    if jax.process_index() == 0:
        tok.save_pretrained(str(saved))
    return tok


def load_model_and_tokenizer(cfg: Any, run_dir: Path, texts: Any = ()) -> tuple[Any, Any, Any, tuple[str, str | None]]:
    """(mesh, model on the mesh, tokenizer, (path, gguf file)) for a run config with model/mesh/data sections."""
    from safer_jax.models import from_pretrained
    from safer_jax.sharding import make_mesh

    path, gguf = resolve_model_path(cfg.model, run_dir, texts)
    mesh = make_mesh(cfg.mesh)
    model = from_pretrained(path, gguf_file=gguf, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            mesh=mesh, remat=cfg.model.remat, scan_layers=cfg.model.scan_layers,
                            attention=cfg.model.attention)
    tok = load_tokenizer(cfg.data.tokenizer or path, None if cfg.data.tokenizer else gguf, run_dir)
    return mesh, model, tok, (path, gguf)


def check_batch(cfg: Any, mesh: Any) -> None:
    """The global batch must split over processes and microbatches; over the mesh's batch axes it
    should (on one process it may not: the batch is then replicated there, with a warning)."""
    n_proc = jax.process_count()
    bs, accum = cfg.data.batch_size, cfg.train.grad_accum
    if bs % (n_proc * accum):
        raise ValueError(f"data.batch_size={bs} must be divisible by processes ({n_proc}) x "
                         f"train.grad_accum ({accum})")
    batch_ways = sharding_batch_ways(mesh)
    if bs % batch_ways or (bs // accum) % batch_ways:
        msg = (f"data.batch_size={bs} (and each of train.grad_accum={accum} microbatches) is not divisible by "
               f"mesh dcn x data x fsdp = {batch_ways}")
        if n_proc > 1:  # each process feeds distinct rows: the batch must split over the batch axes
            raise ValueError(msg)
        log.warning("%s: the batch is replicated over those axes (correct, but every device computes it all)", msg)


class Preemption:
    """SIGTERM sets a flag; every process agrees on it at the same step."""

    def __init__(self):
        self.flag = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        flag = self.flag
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._old)

