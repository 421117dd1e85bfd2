"""The declarative map between our parameter names and Hugging Face tensor names.

Each row: our parameter path, the HF name (`{i}` = layer index for stacked layer
parameters), and a layout kind. `linear` rows transpose HF's `[out, in]` weight and split
its dims into ours (`in_dims` leading dims of ours are the input); `vector` rows reshape.
`to_ours` and `to_hf` are exact inverses, so export is import read backwards.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from safer_jax.models.config import DecoderConfig


@dataclasses.dataclass(frozen=True)
class Row:
    ours: str  # path in the NNX state, "/"-joined
    hf: str  # HF tensor name; "{i}" for the layer index
    kind: str  # "linear" | "vector"
    in_dims: int = 1  # linear: how many leading dims of our layout are the input

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def param_rows(cfg: DecoderConfig) -> list[Row]:
    """Rows for every parameter `cfg` has (bias, q/k norm and lm_head only where present)."""
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    rows = [
        Row("embed", "model.embed_tokens.weight", "vector"),
        Row("final_norm", "model.norm.weight", "vector"),
        Row("layers/attn_norm", "model.layers.{i}.input_layernorm.weight", "vector"),
        Row("layers/mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", "vector"),
        Row("layers/wq", a + "q_proj.weight", "linear"),
        Row("layers/wk", a + "k_proj.weight", "linear"),
        Row("layers/wv", a + "v_proj.weight", "linear"),
        Row("layers/wo", a + "o_proj.weight", "linear", in_dims=2),
        Row("layers/w_gate", m + "gate_proj.weight", "linear"),
        Row("layers/w_up", m + "up_proj.weight", "linear"),
        Row("layers/w_down", m + "down_proj.weight", "linear"),
    ]
    if cfg.qkv_bias:
        rows += [Row(f"layers/b{x}", a + f"{x}_proj.bias", "vector") for x in "qkv"]
    if cfg.o_bias:
        rows.append(Row("layers/bo", a + "o_proj.bias", "vector"))
    if cfg.qk_norm:
        rows += [Row(f"layers/{x}_norm", a + f"{x}_norm.weight", "vector") for x in "qk"]
    if not cfg.tie_word_embeddings:
        rows.append(Row("lm_head", "lm_head.weight", "linear"))
    return rows


def hf_shape(row: Row, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for one (unstacked) parameter of shape `ours_shape`."""
    if row.kind == "vector":
        return (math.prod(ours_shape),) if len(ours_shape) > 1 and row.ours != "embed" else tuple(ours_shape)
    return (math.prod(ours_shape[row.in_dims :]), math.prod(ours_shape[: row.in_dims]))


def to_ours(row: Row, tensor: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
    if row.kind == "vector":
        return tensor.reshape(ours_shape)
    return tensor.T.reshape(ours_shape)


def to_hf(row: Row, value: np.ndarray) -> np.ndarray:
    shape = hf_shape(row, value.shape)
    if row.kind == "vector":
        return np.ascontiguousarray(value.reshape(shape))
    return np.ascontiguousarray(value.reshape(shape[1], shape[0]).T)
