"""Load Hugging Face checkpoints (safetensors or GGUF) into the decoder, and export back.

Loading never materialises a full copy per device: the model is built abstractly
(`nnx.eval_shape`), each parameter is assembled on the host one at a time (a stacked layer
parameter is filled layer by layer into one buffer), and each device receives only its
shard through `jax.make_array_from_callback`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from safer_jax.hub import CheckpointError, resolve_path
from safer_jax.models.config import DecoderConfig, from_hf_config, to_hf_config
from safer_jax.models.decoder import Decoder
from safer_jax.models.hf_params import Row, hf_shape, param_rows, to_hf, to_ours
from safer_jax.sharding import named_sharding

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # bytes per safetensors file on export
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------- sources


_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, {tensor name: {dtype, shape, data_offsets}})."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return 8 + n, header


class SafetensorsSource:
    """Tensors of a HF folder: `model.safetensors` or a sharded `model.safetensors.index.json`.

    Tensors are read with `readinto` into exactly-sized buffers rather than through
    `safetensors.safe_open`, whose memory map keeps every touched page of the file resident
    (peak RSS twice the model's size on CPU); this keeps the loader's peak near one model.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        elif (folder / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for f in files:
            path = folder / f
            if not path.exists():
                raise CheckpointError(f"{path}: listed in the index but missing")
            start, header = _safetensors_header(path)
            for name, info in header.items():
                self._where[name] = (path, start, info)

    def keys(self) -> list[str]:
        return list(self._where)

    def where(self, name: str) -> str:
        return str(self._where[name][0] if name in self._where else self.folder / "model.safetensors")

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        path, start, info = self._where[name]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out = np.empty(info["shape"], _ST_DTYPES[info["dtype"]])
        if out.nbytes != end - begin:
            raise CheckpointError(f"{path}: tensor {name!r}: shape {info['shape']} does not match its byte size")
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} is truncated")
        return out


class ArraySource:
    """Tensors held in memory (a dequantized GGUF state dict)."""

    def __init__(self, tensors: dict[str, np.ndarray], where: str):
        self.tensors, self._where = tensors, where

    def keys(self) -> list[str]:
        return list(self.tensors)

    def where(self, name: str) -> str:
        return self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise CheckpointError(f"{self._where}: tensor {name!r} is missing from the checkpoint")
        return self.tensors[name]


# --------------------------------------------------------------------------- resolution


def read_hf_config(folder: Path) -> dict[str, Any]:
    f = folder / "config.json"
    if not f.exists():
        raise CheckpointError(f"{f}: missing (a Hugging Face model folder needs config.json)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _load_gguf(folder: Path, gguf_file: str) -> tuple[dict[str, Any], ArraySource]:
    """Dequantize a GGUF file through transformers; returns (HF config dict, tensors)."""
    where = str(folder / gguf_file)
    if not (folder / gguf_file).exists():
        raise CheckpointError(f"{where}: GGUF file not found")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"{where}: GGUF loading needs torch and gguf (pip install 'safer-jax[torch]' gguf)")
    import torch
    from transformers import AutoModelForCausalLM

    log.info("dequantizing %s through transformers", where)
    tm = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    hf = tm.config.to_dict()
    for k in ("quantization_config", "_name_or_path"):
        hf.pop(k, None)
    tensors = {k: v.detach().cpu().numpy() for k, v in tm.state_dict().items()}
    del tm
    return hf, ArraySource(tensors, where)


# --------------------------------------------------------------------------- loading


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def abstract_model(cfg: DecoderConfig, mesh: Mesh | None = None) -> Decoder:
    """The model's structure with ShapeDtypeStructs in place of arrays."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), mesh=mesh))


def param_shardings(model: Decoder, mesh: Mesh | None) -> dict[str, Any]:
    """`{param path: NamedSharding}` from each parameter's logical axes and the rules table."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        shape = var.get_value().shape
        if mesh is None:
            out[name] = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            out[name] = named_sharding(mesh, var.get_metadata()["logical_axes"], shape)
    return out


def _place(host: np.ndarray, sharding: Any) -> jax.Array:
    if isinstance(sharding, NamedSharding):
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.device_put(host, sharding)


def _read_param(row: Row, source: Any, shape: tuple[int, ...], dtype: np.dtype, cfg: DecoderConfig) -> np.ndarray:
    """Assemble one parameter on the host in its target dtype, validating every tensor's shape."""
    per_layer = shape[1:] if row.stacked else shape
    want = hf_shape(row, per_layer)
    out = np.empty(shape, dtype)
    for i in range(cfg.num_layers if row.stacked else 1):
        name = row.hf.format(i=i)
        t = source.get(name)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{source.where(name)}: tensor {name!r} has shape {tuple(t.shape)}, expected {want} "
                f"for config {cfg.model_type} (hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
                f"head_dim {cfg.head_dim})"
            )
        value = to_ours(row, t, per_layer).astype(dtype, copy=False)
        if row.stacked:
            out[i] = value
        else:
            out[...] = value
        del t, value
    return out


def load_into(model: Decoder, source: Any, mesh: Mesh | None, progress: bool = True) -> Decoder:
    """Fill abstract `model` from `source` straight into each parameter's target sharding."""
    cfg = model.config
    rows = {r.ours: r for r in param_rows(cfg)}
    shardings = param_shardings(model, mesh)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    used: set[str] = set()
    filled = []
    start = time.time()
    for n, (path, var) in enumerate(flat):
        name = "/".join(map(str, path))
        if name not in rows:
            filled.append((path, var))
            continue
        row = rows[name]
        abstract = var.get_value()
        host = _read_param(row, source, tuple(abstract.shape), np.dtype(abstract.dtype), cfg)
        filled.append((path, var.replace(_place(host, shardings[name]))))
        used.update(row.hf.format(i=i) for i in range(cfg.num_layers if row.stacked else 1))
        del host
        if progress:
            log.info(
                "loaded %-18s %s (%d/%d, %.1fs)", name, tuple(abstract.shape), n + 1, len(flat), time.time() - start
            )
    extra = [k for k in source.keys() if k not in used and not _IGNORED.search(k)]  # noqa: SIM118 (a source, not a dict)
    if cfg.tie_word_embeddings:
        extra = [k for k in extra if k != "lm_head.weight"]
    if extra:
        raise CheckpointError(
            f"{source.where(extra[0])}: {len(extra)} tensors are not used by a {cfg.model_type} decoder "
            f"(first: {extra[0]!r}); the checkpoint and config.json disagree"
        )
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = "float32",
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    gguf_file: str | None = None,
    remat: str = "none",
    scan_layers: bool = True,
    attention: str = "xla",
    matmul_dtype: Any = None,
    freeze_layers: int = 0,
) -> Decoder:
    """Load a HF folder, hub id or GGUF file into a (sharded, if `mesh`) decoder.

    `dtype` is the compute dtype, `param_dtype` the storage dtype (defaults to `dtype`),
    `matmul_dtype` the matmuls' operand dtype (defaults to `dtype`; see `DecoderConfig`);
    `freeze_layers` a training choice (`DecoderConfig.freeze_layers`).
    """
    folder = resolve_path(path, gguf_file)
    if gguf_file:
        hf, source = _load_gguf(folder, gguf_file)
        where = str(folder / gguf_file)
    else:
        hf = read_hf_config(folder)
        where = str(folder / "config.json")
    gen = folder / "generation_config.json"
    cfg = from_hf_config(
        hf,
        where=where,
        dtype=_dtype_name(dtype),
        param_dtype=_dtype_name(param_dtype if param_dtype is not None else dtype),
        remat=remat,
        scan_layers=scan_layers,
        attention=attention,
        matmul_dtype=None if matmul_dtype is None else _dtype_name(matmul_dtype),
        freeze_layers=freeze_layers,
        generation_config_json=gen.read_text() if gen.exists() else "",
    )
    if not gguf_file:
        source = SafetensorsSource(folder)
    return load_into(abstract_model(cfg, mesh), source, mesh)


# --------------------------------------------------------------------------- export


def _gather(x: jax.Array) -> np.ndarray:
    """A parameter on the host; all processes take part where it is not fully addressable."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _param_values(model: Decoder) -> dict[str, jax.Array]:
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def hf_tensors(model: Decoder, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) pairs, one parameter gathered at a time."""
    cfg = model.config
    state = _param_values(model)
    for row in param_rows(cfg):
        value = _gather(state[row.ours])
        if dtype is not None:
            value = value.astype(jnp.dtype(dtype))
        if row.stacked:
            for i in range(cfg.num_layers):
                yield row.hf.format(i=i), to_hf(row, value[i])
        else:
            yield row.hf, to_hf(row, value)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '2GB'")
    unit = (m.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }[unit]
    return int(float(m.group(1)) * scale)


def save_pretrained(
    model: Decoder,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: Any = None,
) -> Path:
    """Write a transformers-loadable folder: safetensors (sharded above `max_shard_size`,
    default 5 GiB), config.json, generation_config.json, and the tokenizer if given.

    Only process 0 writes; every process must call this (parameters may need gathering).
    A non-empty `out_dir` is refused unless `overwrite=True`.
    """
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    out = Path(out_dir)
    writer = jax.process_index() == 0
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; pass overwrite=True to replace its model files")
    limit = _parse_size(max_shard_size)
    cfg = model.config
    save_dtype = _dtype_name(dtype or cfg.param_dtype)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            old.unlink()
    # plan shards from shapes alone, then stream tensors into them
    itemsize = jnp.dtype(save_dtype).itemsize
    plan: list[list[str]] = [[]]
    used = 0
    state = _param_values(model)
    for row in param_rows(cfg):
        shape = state[row.ours].shape
        per = shape[1:] if row.stacked else shape
        nbytes = int(np.prod(per)) * itemsize
        for i in range(cfg.num_layers if row.stacked else 1):
            if plan[-1] and used + nbytes > limit:
                plan.append([])
                used = 0
            plan[-1].append(row.hf.format(i=i))
            used += nbytes
    n = len(plan)
    fname = (lambda k: "model.safetensors") if n == 1 else (lambda k: f"model-{k + 1:05d}-of-{n:05d}.safetensors")
    shard_of = {name: k for k, names in enumerate(plan) for name in names}
    pending: dict[str, np.ndarray] = {}
    current = 0
    total = 0
    for name, tensor in hf_tensors(model, save_dtype):
        k = shard_of[name]
        while k > current:  # tensors arrive in plan order; flush finished shards
            if writer:
                save_file(pending, str(out / fname(current)), metadata={"format": "pt"})
            pending, current = {}, current + 1
        pending[name] = tensor
        total += tensor.nbytes
    if writer:
        save_file(pending, str(out / fname(current)), metadata={"format": "pt"})
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {k: fname(v) for k, v in shard_of.items()}}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        hf = to_hf_config(cfg)
        hf["dtype"] = save_dtype
        (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        if cfg.generation_config_json:
            gen = GenerationConfig.from_dict(json.loads(cfg.generation_config_json))
        else:
            gen = GenerationConfig(
                bos_token_id=cfg.bos_token_id, eos_token_id=hf.get("eos_token_id"), pad_token_id=cfg.pad_token_id
            )
        gen.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    return out
