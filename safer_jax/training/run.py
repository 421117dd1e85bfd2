"""One place builds a run (DESIGN.md section 4, example 17): `build_run(cfg)` turns a stage
config into its mesh, model and tokenizer, run folder (with its config, versions and
tokenizer), checkpoint manager, tracker and resume step, so a config does not bounce
between the stage loops and helper modules. SFT, preference optimization and `ref-logps`
take the `Run`; their loops keep only what differs (data, step function, reference).

Paths are `etils.epath` end to end: a run folder may be a bucket URL (`gs://...`). The run
folder is checked writable before any work, so a missing bucket fails up front with its URL.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import signal
from typing import Any

import jax
import yaml
from etils import epath

from safer_jax.checkpoint import CheckpointManager
from safer_jax.config import ModelConfig, to_dict
from safer_jax.metrics import Tracker
from safer_jax.paths import as_path, check_writable, local_copy, staged_dir
from safer_jax.sharding import batch_ways as sharding_batch_ways

TINY_PREFIX = "tiny"
EMBEDDED = "smollm2"
log = logging.getLogger("safer_jax.train")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "numpy", "safer-jax")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss under on_nan=stop); the last good checkpoint is kept."""


def agree(value: int, what: str) -> int:
    """`value` as process 0 computed it, on every process (DESIGN.md example 18; `what` names it
    for readers). The one agreement mechanism is `safer_jax.distributed`."""
    from safer_jax.distributed import from_process_0

    return int(from_process_0(value))


def _sync(name: str) -> None:
    """Wait until every process gets here (process 0 has written what the others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass
class Run:
    """A stage's run as `build_run` made it; `close()` waits for checkpoints and uploads logs."""

    cfg: Any
    run_dir: epath.Path
    mesh: Any
    model: Any  # the policy on the mesh, at its starting weights (None when not loaded)
    tokenizer: Any
    model_location: tuple[str, str | None]  # (local folder, gguf file) of the starting weights
    checkpoints: CheckpointManager | None = None  # training runs only
    tracker: Tracker | None = None
    start_step: int = 0  # the latest complete checkpoint (0: a fresh run), agreed by all processes

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.checkpoints is not None:
            self.checkpoints.close()


def build_run(cfg: Any, texts: Any = (), *, train: bool = True, load_model: bool = True) -> Run:
    """The run of a stage config with run_dir/model/mesh/data/train sections.

    `texts` feed a `tiny` model's tokenizer. `train=False` (ref-logps) skips the checkpoint
    manager and tracker; `load_model=False` skips loading the policy's weights.
    """
    from safer_jax.models import from_pretrained
    from safer_jax.sharding import make_mesh

    if not cfg.run_dir:
        raise ValueError("run_dir is not set (pass run_dir=PATH)")
    run_dir = check_writable(cfg.run_dir)  # before any work: a missing bucket fails here, naming it
    mesh = make_mesh(cfg.mesh)
    if train:
        check_batch(cfg, mesh)
    write_run_files(run_dir, cfg)
    location = resolve_model_path(cfg.model, run_dir, texts)
    model = None
    if load_model:
        model = from_pretrained(
            location[0],
            gguf_file=location[1],
            dtype=cfg.model.dtype,
            param_dtype=cfg.model.param_dtype,
            mesh=mesh,
            remat=cfg.model.remat,
            scan_layers=cfg.model.scan_layers,
            attention=cfg.model.attention,
            matmul_dtype=cfg.model.matmul_dtype,
            freeze_layers=cfg.model.freeze_layers,
        )
    tok = load_tokenizer(cfg.data.tokenizer or location[0], None if cfg.data.tokenizer else location[1], run_dir)
    run = Run(cfg=cfg, run_dir=run_dir, mesh=mesh, model=model, tokenizer=tok, model_location=location)
    if train:
        tc = cfg.train
        run.checkpoints = CheckpointManager(
            run_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoint
        )
        run.start_step = agree(run.checkpoints.latest_step() or 0, "resume step")
        run.tracker = Tracker(run_dir, enabled=jax.process_index() == 0, tensorboard=tc.tensorboard)
    return run


def write_run_files(run_dir: str | os.PathLike, cfg: Any) -> None:
    """The resolved config and the package versions, on process 0."""
    if jax.process_index() != 0:
        return
    run_dir = as_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    versions = {
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "processes": jax.process_count(),
    }
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    (run_dir / "versions.json").write_text(json.dumps(versions, indent=2))


def resolve_model_path(mc: ModelConfig, run_dir: str | os.PathLike, texts: Any = ()) -> tuple[str, str | None]:
    """(local folder or hub id, gguf file) of the model: `tiny[:family]` is built in the run
    folder, `smollm2` is the embedded default, a bucket URL is read from a local copy
    (downloaded once per fingerprint), anything else is a folder or hub id."""
    if mc.path.startswith(TINY_PREFIX):
        family = mc.path.split(":", 1)[1] if ":" in mc.path else "llama"
        folder = as_path(run_dir) / "tiny-model"
        if not (folder / "config.json").exists() and jax.process_index() == 0:
            from safer_jax.models.tiny import build_tiny_model

            with staged_dir(folder) as local:
                build_tiny_model(local, texts, family=family)
        _sync("tiny-model")  # the others wait for process 0 to write it
        return str(local_copy(folder)), None
    if mc.path == EMBEDDED:
        from safer_jax.models.embedded import smollm2_location

        folder, gguf = smollm2_location()
        return str(folder), gguf
    if not mc.path:
        raise ValueError("model.path is empty: give a HF folder, a hub id, 'smollm2' or 'tiny'")
    from safer_jax.hub import resolve_path

    return str(resolve_path(mc.path, mc.gguf_file)), mc.gguf_file  # a hub id or a bucket URL: resolved once, here


def load_tokenizer(path: str, gguf_file: str | None, run_dir: str | os.PathLike) -> Any:
    """The tokenizer, saved once into the run folder (export and resume read it from there)."""
    from safer_jax.data.tokenize import load_tokenizer as load

    saved = as_path(run_dir) / "tokenizer"
    if (saved / "tokenizer_config.json").exists():
        return load(str(local_copy(saved, kind="tokenizers")))
    tok = load(path, gguf_file)
    if jax.process_index() == 0:
        with staged_dir(saved) as local:
            tok.save_pretrained(str(local))
    return tok


def check_batch(cfg: Any, mesh: Any) -> None:
    """The global batch must split over processes and microbatches; over the mesh's batch axes it
    should (on one process it may not: the batch is then replicated there, with a warning)."""
    n_proc = jax.process_count()
    bs, accum = cfg.data.batch_size, cfg.train.grad_accum
    if bs % (n_proc * accum):
        raise ValueError(f"data.batch_size={bs} must be divisible by processes ({n_proc}) x train.grad_accum ({accum})")
    batch_ways = sharding_batch_ways(mesh)
    if bs % batch_ways or (bs // accum) % batch_ways:
        msg = (
            f"data.batch_size={bs} (and each of train.grad_accum={accum} microbatches) is not divisible by "
            f"mesh dcn x data x fsdp = {batch_ways}"
        )
        if n_proc > 1:  # each process feeds distinct rows: the batch must split over the batch axes
            raise ValueError(msg)
        log.warning("%s: the batch is replicated over those axes (correct, but every device computes it all)", msg)


class Preemption:
    """SIGTERM sets `flag`; the loop agrees on it with the other processes at each step."""

    def __init__(self):
        self.flag = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._old)
