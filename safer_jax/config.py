"""Typed, frozen configuration dataclasses.

Every concern gets its own frozen dataclass so configs are hashable (they can be static
arguments of jitted functions) and typos fail loudly: `from_dict` rejects unknown keys and
converts values by the field's declared type, naming the offending dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. Axis sizes multiply to the device count; -1 takes the rest.

    `dcn` is data parallelism across TPU slices (multi-slice jobs, over the data-center
    network); `data`, `fsdp` and `tensor` lie inside each slice.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn: int = 1

    def shape(self) -> dict[str, int]:
        return {"dcn": self.dcn, "data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


MATMUL_DTYPES = ("bfloat16", "float16", "float32", "float64")  # `model.matmul_dtype` (or None)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and in what precision."""

    path: str = ""
    gguf_file: str | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str | None = None  # defaults to dtype
    remat: str = "none"  # none | full | dots_saveable
    scan_layers: bool = True
    attention: str = "xla"
    # the matmuls' operand dtype, accumulated in `dtype` (bfloat16: several times faster products on
    # CPUs with bf16 units, as a TPU's default precision); None = `dtype`
    matmul_dtype: str | None = None
    # training: the embedding table and the first N blocks stay as loaded; their backward is never
    # computed, so a step costs less (0.76x on SmolLM2 with 15 of 30 frozen, docs/benchmarks.md)
    freeze_layers: int = 0

    def __post_init__(self) -> None:
        if self.freeze_layers < 0:
            raise ConfigError(f"model.freeze_layers: must be 0 or more, got {self.freeze_layers}")
        if self.matmul_dtype not in (None, *MATMUL_DTYPES):
            raise ConfigError(f"model.matmul_dtype: {self.matmul_dtype!r} is not one of {MATMUL_DTYPES} (or null)")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key."""


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot convert {value!r} to {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    if origin in (tuple, list):
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [_convert(v, inner, f"{key}[{i}]") if inner is not Any else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an int, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a float, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML reads unquoted yes/no/on/off/true/false as a bool
            raise ConfigError(f"{key}: expected a string, got the bool {value!r}; quote it in YAML")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested mapping, converting by field type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys: " + ", ".join(prefix + n for n in sorted(names))
        )
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warm-up then cosine / linear / constant decay, global-norm clipping."""

    lr: float = 1e-5
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # never applied to norms and biases
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 = off


@dataclasses.dataclass(frozen=True)
class TraceFormat:
    """How an Ex-Ante trace is written in the assistant turn (`data.trace_format`): tags, step
    headers, the decision line's prefix. None of them may hold a special token of the tokenizer."""

    open_tag: str = "<think>"
    close_tag: str = "</think>"
    headers: tuple[str, str, str] = ("## Initial Assessment", "## Rule Verification", "## Path Calibration")
    decision_prefix: str = "Decision: "


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = ""  # traces (SFT) or pairs (preference) file; "bundled" = the packaged traces
    eval: str | None = None
    rules: str | None = None  # rules folder (default configs/rules)
    tokenizer: str | None = None  # default: the model's folder
    system_prompt: str | None = None
    # keyword arguments of every chat-template call, e.g. {enable_thinking: false, date_string: "26 Jul 2024"}
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    trace_format: TraceFormat = TraceFormat()
    seq_len: int = 1024
    batch_size: int = 8  # global, in examples (packed rows for SFT, pairs for preference)
    pack: bool = True
    packing_bins: int = 16
    length_buckets: int = 0  # preference: 0 = rows of seq_len; n = rows of the shortest of n lengths that fits
    seed: int = 0
    skip_invalid: bool = False
    read_threads: int = 2  # threads tokenizing records ahead of the step; 0 = in the training loop's thread
    read_buffer: int = 0  # records tokenized ahead; 0 = four global batches' worth

    def __post_init__(self) -> None:
        for name in ("read_threads", "read_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}: must be 0 or more, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    grad_accum: int = 1  # microbatches per step
    seed: int = 0
    loss_chunk: int = 512  # sequence chunk for the log-softmax
    log_every: int = 1
    eval_every: int = 0  # 0 = off
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    on_nan: str = "stop"  # stop | skip
    export_final: bool = True
    tensorboard: bool = True
    max_minutes: float = 0.0  # stop (checkpoint, export) after the step that passes this wall time; 0 = off


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    run_dir: str = ""
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Stage 2: the step-level preference loss, its span, and where reference log-probs come from."""

    loss_type: str = "sigmoid"  # sigmoid | ipo | sigmoid_norm | rdpo | simpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    alpha: float = 0.0  # rdpo length penalty
    gamma: float = 0.5  # simpo margin
    rpo_lambda: float = 0.0  # SFT term on the chosen span
    ld_alpha: float = 1.0  # LD-DPO weight of tokens past the shorter span (1 = off)
    ld_reference: bool = True  # weight the reference's tokens too (TRL 1.16); false = the policy only (TRL 0.x)
    span: str = "step"  # pairs built from traces: step k alone (Step-DPO) | to_end (step k onward)
    reference: str = "cache"  # cache (precomputed, reused across runs) | model (frozen copy on the mesh)
    reference_path: str | None = None  # default: model.path (the policy's starting weights)
    reference_gguf_file: str | None = None
    cache_dir: str | None = None  # default: $SAFER_JAX_CACHE/ref_logps or ~/.cache/safer-jax/ref_logps

    def hparams(self) -> dict[str, float]:
        return {
            "beta": self.beta,
            "label_smoothing": self.label_smoothing,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "rpo_lambda": self.rpo_lambda,
        }


@dataclasses.dataclass(frozen=True)
class PrefOptConfig(SFTConfig):
    """An SFT run's sections plus the preference loss and reference."""

    preference: PreferenceConfig = PreferenceConfig()


@dataclasses.dataclass(frozen=True)
class RoundsSection:
    """On-policy rounds (`safer-jax rounds`): sample K traces per prompt, judge each step, pair at
    the first faulty step (M continuations from the shared prefix), train, evaluate."""

    rounds: int = 2
    prompts: str = "bundled"  # a prompts JSONL ({id, prompt, label, rules, category}); bundled = train_prompts
    prompt_ids: tuple[str, ...] = ()  # a named subset of the prompts (empty: `limit` or all)
    limit: int = 0  # a seeded sample of n prompts, labels in turn (0 = all); ignored when prompt_ids is set
    references: str = "bundled"  # traces whose step k is the fallback chosen span; bundled = train_traces
    samples: int = 4  # K traces per prompt
    continuations: int = 4  # M continuations of the faulty step from the shared prefix
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    sample_batch: int = 16  # prompts per sampling chunk (the unit a stopped run resumes at)
    between_samples: bool = True  # also pair two correct samples whose lengths differ by > length_margin
    length_margin: int = 32  # tokens
    max_step_tokens: int = 0  # a longer step is faulty (verbose); 0 = off
    helpful_min_overlap: float = 0.0  # ROUGE-L recall against the reference response a benign answer needs
    reference: str = "start"  # the preference reference: start (the SFT model) | previous (last round's policy)
    sampler: str = "local"  # local (KV-cache sampler) | openai (an OpenAI-compatible /v1/completions endpoint)
    sampler_url: str | None = None
    sampler_model: str | None = None
    judge: str = "rules"  # rules | openai (the response's refusal verdict from a judge model, cached)
    judge_url: str | None = None
    judge_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoints' key, if any
    retries: int = 3
    timeout_s: float = 120.0
    backoff_s: float = 0.5
    eval_ids: tuple[str, ...] = ()  # bundled evaluation ids (empty: a stratified sample of eval_counts)
    eval_counts: tuple[int, ...] = (8, 8, 4)  # harmful, benign, borderline
    eval_max_new_tokens: int = 256
    eval_batch: int = 16
    eval_start: bool = True  # also evaluate the starting model (round 0)


@dataclasses.dataclass(frozen=True)
class RoundsConfig(PrefOptConfig):
    """A preference run's sections (train.steps = steps per round) plus the rounds."""

    rounds: RoundsSection = RoundsSection()


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p} is not a section")
    node[parts[-1]] = value


def field_type(cls: type, dotted: str) -> Any:
    """The declared type of dotted key `dotted` in dataclass `cls`, or None if it names no field."""
    tp: Any = cls
    for part in dotted.split("."):
        if not (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = hints[part]
    return tp


def _is_text(tp: Any) -> bool:
    """str, or a union of str with None: an override value is then taken verbatim."""
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(a is str for a in args)
    return False


def parse_override(cls: type, key: str, value: str) -> Any:
    """The value of a `key=value` override, read by the field's type: verbatim text for a str field
    (`#1 rule` and `no` stay strings; `none`/`null` still clear an optional one), YAML otherwise
    (numbers, bools, lists, mappings; the field's converter then checks the type)."""
    if _is_text(field_type(cls, key)):
        return value
    return yaml_value(value)


def yaml_value(value: str) -> Any:
    import yaml

    return yaml.safe_load(value) if value.strip() else ""


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read yaml `path` (optional), apply `key=value` dotted overrides (typed by the field, see
    `parse_override`), build a typed `cls`."""
    import yaml

    tree: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), parse_override(cls, key.strip(), value))
    try:
        return from_dict(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
