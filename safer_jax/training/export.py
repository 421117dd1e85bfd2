"""Export any checkpoint of a run folder to a HF folder (`safer-jax export`)."""

from __future__ import annotations

from pathlib import Path

import jax
import yaml
from flax import nnx

from safer_jax.checkpoint import CheckpointManager
from safer_jax.config import ConfigError, SFTConfig, from_dict
from safer_jax.models import save_pretrained
from safer_jax.models.config import from_hf_config
from safer_jax.models.hf_io import abstract_model, read_hf_config, resolve_path
from safer_jax.training.optimizer import make_optimizer
from safer_jax.training.run import resolve_model_path
from safer_jax.training.sft import TrainState


def _run_config(run_dir: Path) -> SFTConfig:
    f = run_dir / "config.yaml"
    if not f.exists():
        raise ConfigError(f"{f}: missing; is {run_dir} a safer-jax run folder?")
    tree = yaml.safe_load(f.read_text())
    tree.pop("reference", None)
    tree = {k: v for k, v in tree.items() if k in {"run_dir", "model", "mesh", "data", "optimizer", "train"}}
    return from_dict(SFTConfig, tree)


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, step: int | None = None, overwrite: bool = False,
                      dtype: str | None = None) -> Path:
    """Restore the parameters of checkpoint `step` (default latest) onto one device and write a HF folder."""
    from safer_jax.data.tokenize import load_tokenizer

    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    path, gguf = resolve_model_path(cfg.model, run_dir)
    if gguf:
        from safer_jax.models.hf_io import _load_gguf

        hf, _ = _load_gguf(resolve_path(path, gguf), gguf)
    else:
        hf = read_hf_config(resolve_path(path))
    gen = resolve_path(path, gguf) / "generation_config.json"
    mcfg = from_hf_config(hf, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype or cfg.model.dtype,
                          generation_config_json=gen.read_text() if gen.exists() else "")
    model = abstract_model(mcfg)
    graphdef, params = nnx.split(model)
    # restore onto host memory: the optimizer moments come along (3x the model), not onto an accelerator
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), params)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), jax.eval_shape(tx.init, params))
    target = TrainState(step=jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=dev), params=params, opt_state=opt)
    mgr = CheckpointManager(run_dir / "checkpoints")
    if step is not None and step not in mgr.all_steps():
        raise ValueError(f"{run_dir / 'checkpoints'}: no checkpoint at step {step} (have {mgr.all_steps()})")
    state = mgr.restore(step, target)
    mgr.close()
    tok = load_tokenizer(str(run_dir / "tokenizer")) if (run_dir / "tokenizer").exists() else None
    return save_pretrained(nnx.merge(graphdef, state.params), out_dir, tokenizer=tok, overwrite=overwrite, dtype=dtype)
