"""Export any checkpoint of a run folder to a HF folder (`safer-jax export`); run folders
and export folders may be bucket URLs (a HF folder is written locally, then uploaded)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import yaml
from flax import nnx

from safer_jax.checkpoint import CheckpointManager
from safer_jax.config import ConfigError, SFTConfig, from_dict
from safer_jax.models import save_pretrained
from safer_jax.models.config import from_hf_config
from safer_jax.models.hf_io import abstract_model, read_hf_config, resolve_path
from safer_jax.paths import as_path, is_remote, local_copy, upload_dir
from safer_jax.training.optimizer import make_optimizer
from safer_jax.training.run import resolve_model_path
from safer_jax.training.sft import TrainState


def save_hf(
    model: Any,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
    dtype: str | None = None,
    **kwargs: Any,
) -> str:
    """`models.save_pretrained` (same keywords) to a local folder or a bucket URL; returns where it wrote."""
    out = as_path(out_dir)
    if not is_remote(out):
        return str(save_pretrained(model, out, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype, **kwargs))
    if not overwrite and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; pass overwrite=True to replace its model files")
    with tempfile.TemporaryDirectory(prefix="safer-jax-export-") as local:  # every process gathers, one writes
        save_pretrained(model, local, tokenizer=tokenizer, overwrite=True, dtype=dtype, **kwargs)
        if jax.process_index() == 0:
            upload_dir(local, out, clear=True)
    return str(out)


def _run_config(run_dir: Any) -> SFTConfig:
    f = run_dir / "config.yaml"
    if not f.exists():
        raise ConfigError(f"{f}: missing; is {run_dir} a safer-jax run folder?")
    tree = yaml.safe_load(f.read_text())
    tree.pop("reference", None)
    tree = {k: v for k, v in tree.items() if k in {"run_dir", "model", "mesh", "data", "optimizer", "train"}}
    return from_dict(SFTConfig, tree)


def export_checkpoint(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    step: int | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
) -> str:
    """Restore the parameters of checkpoint `step` (default latest) onto one device and write a HF folder."""
    from safer_jax.data.tokenize import load_tokenizer

    run_dir = as_path(run_dir)
    cfg = _run_config(run_dir)
    path, gguf = resolve_model_path(cfg.model, run_dir)
    if gguf:
        from safer_jax.models.hf_io import _load_gguf

        hf, _ = _load_gguf(resolve_path(path, gguf), gguf)
    else:
        hf = read_hf_config(resolve_path(path))
    gen = resolve_path(path, gguf) / "generation_config.json"
    mcfg = from_hf_config(
        hf,
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype or cfg.model.dtype,
        generation_config_json=gen.read_text() if gen.exists() else "",
    )
    model = abstract_model(mcfg)
    graphdef, params = nnx.split(model)
    # restore onto host memory: the optimizer moments come along (3x the model), not onto an accelerator
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), params)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.freeze_layers)
    opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), jax.eval_shape(tx.init, params))
    target = TrainState(step=jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=dev), params=params, opt_state=opt)
    mgr = CheckpointManager(run_dir / "checkpoints")
    if step is not None and step not in mgr.all_steps():
        raise ValueError(f"{run_dir / 'checkpoints'}: no checkpoint at step {step} (have {mgr.all_steps()})")
    state = mgr.restore(step, target)
    mgr.close()
    saved = run_dir / "tokenizer"
    tok = load_tokenizer(str(local_copy(saved, kind="tokenizers"))) if saved.exists() else None
    return save_hf(nnx.merge(graphdef, state.params), out_dir, tokenizer=tok, overwrite=overwrite, dtype=dtype)
