"""Decoder architecture config, read from and written back to Hugging Face `config.json`.

One decoder serves every supported family; families differ only in the fields below
(qkv bias, q/k norm, tied embeddings, rope scaling, sliding windows). `FAMILIES` is the
registry: adding a Llama-like family is one entry.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from safer_jax.config import MATMUL_DTYPES

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
    """A `config.json` we cannot honour exactly; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # rope scaling as sorted (key, value) items, hashable; () = none
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    # per-layer sliding window (0 = full causal attention)
    sliding_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # runtime choices (not part of the HF config)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "xla"
    # operand dtype of the block's and head's matmuls (e.g. "bfloat16"), accumulated in `dtype`;
    # None = `dtype` itself. Activations, norms and softmax stay in `dtype`.
    matmul_dtype: str | None = None
    # training only: the embedding table and the first `freeze_layers` blocks get no gradient (their
    # backward is never computed: a cheaper step); the forward's values are unchanged
    freeze_layers: int = 0
    # the source config.json / generation_config.json text, kept so export preserves extras
    hf_config_json: str = ""
    generation_config_json: str = ""

    def __post_init__(self):
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ModelConfigError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers"
            )
        if self.matmul_dtype not in (None, *MATMUL_DTYPES):
            raise ModelConfigError(f"matmul_dtype={self.matmul_dtype!r} is not one of {MATMUL_DTYPES} (or None)")
        if not 0 <= self.freeze_layers <= self.num_layers:
            raise ModelConfigError(f"freeze_layers={self.freeze_layers} must be in 0..{self.num_layers} (the blocks)")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def replace(self, **kw: Any) -> DecoderConfig:
        return dataclasses.replace(self, **kw)

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, n, k, h, v = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
        )
        per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f + 2 * d
        per_layer += (n + 2 * k) * h if self.qkv_bias else 0
        per_layer += d if self.o_bias else 0
        per_layer += 2 * h if self.qk_norm else 0
        total = self.num_layers * per_layer + d
        total += v * d if include_embedding else 0
        total += 0 if self.tie_word_embeddings else v * d
        return total


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF `model_type` sets the decoder's family-specific switches."""

    architecture: str
    switches: Callable[[dict[str, Any]], dict[str, Any]]


def _attention_bias(hf: dict[str, Any]) -> dict[str, Any]:
    b = bool(hf.get("attention_bias", False))
    return {"qkv_bias": b, "o_bias": b}


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", _attention_bias),
    "mistral": Family("MistralForCausalLM", lambda hf: {}),
    "qwen2": Family("Qwen2ForCausalLM", lambda hf: {"qkv_bias": True}),
    "qwen3": Family("Qwen3ForCausalLM", lambda hf: {**_attention_bias(hf), "qk_norm": True}),
}


def _rope(hf: dict[str, Any], where: str) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """Read rope theta and scaling from either transformers 5 `rope_parameters` or the legacy keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        key = "rope_scaling"
    else:
        params = dict(params)
        key = "rope_parameters"
    rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{where}: {key}.rope_type={rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if float(params.pop("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ModelConfigError(f"{where}: {key}.partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, ()
    params = {k: v for k, v in params.items() if v is not None}
    params["rope_type"] = rope_type
    return theta, tuple(sorted(params.items()))


def _sliding_windows(hf: dict[str, Any], n_layers: int, where: str) -> tuple[int, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != n_layers:
            raise ModelConfigError(f"{where}: layer_types has {len(layer_types)} entries for {n_layers} layers")
        out = []
        for i, t in enumerate(layer_types):
            if t == "full_attention":
                out.append(0)
            elif t == "sliding_attention":
                if not window:
                    raise ModelConfigError(
                        f"{where}: layer_types[{i}] is sliding_attention but sliding_window is unset"
                    )
                out.append(int(window))
            else:
                raise ModelConfigError(f"{where}: layer_types[{i}]={t!r} is not supported")
        return tuple(out)
    if hf.get("use_sliding_window") is False:
        return (0,) * n_layers
    if hf.get("use_sliding_window") and window:
        first = int(hf.get("max_window_layers", 0))
        return tuple(int(window) if i >= first else 0 for i in range(n_layers))
    if hf.get("model_type") == "mistral" and window:
        return (int(window),) * n_layers
    return (0,) * n_layers


def _eos(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))


def from_hf_config(hf: dict[str, Any], where: str = "config.json", **runtime: Any) -> DecoderConfig:
    """DecoderConfig from a HF config dict; `where` names the source in errors."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ModelConfigError(
            f"{where}: model_type={model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelConfigError(f"{where}: hidden_act={act!r} is not supported (SwiGLU with silu only)")
    if hf.get("mlp_bias"):
        raise ModelConfigError(f"{where}: mlp_bias=true is not supported")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if k not in hf:
            raise ModelConfigError(f"{where}: required key {k!r} is missing")
    n_layers = int(hf["num_hidden_layers"])
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, scaling = _rope(hf, where)
    gen = runtime.pop("generation_config_json", "")
    return DecoderConfig(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(hf, n_layers, where),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        hf_config_json=json.dumps(hf, sort_keys=True),
        generation_config_json=gen,
        **FAMILIES[model_type].switches(hf),
        **runtime,
    )


def to_hf_config(cfg: DecoderConfig) -> dict[str, Any]:
    """The `config.json` dict transformers needs to rebuild this model (extras of the source kept)."""
    import transformers

    base = json.loads(cfg.hf_config_json) if cfg.hf_config_json else {}
    for k in ("quantization_config", "_name_or_path", "rope_scaling", "torch_dtype", "transformers_version"):
        base.pop(k, None)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(cfg.rope_scaling_dict)
    base.update(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope,
        rope_theta=cfg.rope_theta,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=(
            list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1 else (cfg.eos_token_id[0] if cfg.eos_token_id else None)
        ),
        pad_token_id=cfg.pad_token_id,
    )
    if cfg.model_type in ("llama", "qwen3"):
        base["attention_bias"] = cfg.qkv_bias
    if any(cfg.sliding_windows):
        windows = {w for w in cfg.sliding_windows if w}
        base["sliding_window"] = windows.pop()
        if cfg.model_type != "mistral":
            base["use_sliding_window"] = True
            base["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows]
    elif cfg.model_type == "mistral":
        base["sliding_window"] = None
    base.pop("model_type")
    conf = transformers.AutoConfig.for_model(cfg.model_type, **base)
    out = conf.to_dict()
    out["architectures"] = [FAMILIES[cfg.model_type].architecture]
    out["dtype"] = cfg.param_dtype
    return out
