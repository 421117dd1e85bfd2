"""Batched sampling with a KV cache: left-padded prompts, one prefill, a compiled decode loop.

Why it is built this way:
- Shapes are bucketed (batch, prompt length and cache length rounded up to powers of two),
  so a new request reuses an already compiled program instead of compiling per length.
- Decoding is a `jax.lax.while_loop` inside one jitted function whose step limit is an
  argument: any number of steps runs from one compilation (`TRACE_COUNTS` counts traces).
- EOS ids are checked on device every step; stop strings need text, so the host checks them
  between chunks of `STOP_STRING_CHECK_EVERY` steps (without stop strings: one call).
- A batch decodes until its longest answer ends, and a decode step costs about the same per
  row whether the row is finished or not. So greedy decoding of an unsharded batch compacts: between
  chunks, when the unfinished rows fit half the batch, they are gathered into a batch of the
  next power of two (at least `COMPACT_MIN_ROWS`), one compiled decode per size. Greedy answers
  are the same row for row; sampled ones are not (the random draw is per batch), so sampling
  keeps its batch unless asked.
- Sampling follows transformers' order: temperature, top-k, top-p, then a categorical draw,
  with the same filtering rules as its `TopKLogitsWarper` / `TopPLogitsWarper`.
- With a mesh, the batch is sharded on ("data", "fsdp") and the cache's kv heads on
  "tensor" where they divide (the `safer_jax.sharding` rules table). Every process must pass
  the same prompts.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from safer_jax.config import TraceFormat
from safer_jax.data.tokenize import ChatTokenizer
from safer_jax.data.traces import split_think
from safer_jax.models.config import DecoderConfig
from safer_jax.models.decoder import Decoder
from safer_jax.models.hf_io import param_shardings
from safer_jax.models.kv_cache import KVCache, forward_cached, init_cache
from safer_jax.sampling import Sampler, process_logits, sample_tokens, top_k_filter, top_p_filter  # noqa: F401 (re-exported)
from safer_jax.sharding import batch_ways, constrain, named_sharding

FINISH_REASONS = ("stop", "length", "stop_string")
STOP_STRING_CHECK_EVERY = 16  # decode steps between host-side stop-string checks
MIN_PROMPT_BUCKET = 16
SLOT_BUCKET = 64  # cache lengths round up to a multiple of this
COMPACT_MIN_ROWS = 8  # compaction halves the batch down to this many rows, no further
# times each jitted function was traced (= compiled); a test asserts decode compiles once
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit), as OpenAI's logit_bias

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        object.__setattr__(self, "logit_bias", tuple((int(i), float(v)) for i, v in self.logit_bias))


# --------------------------------------------------------------------------- compiled parts


class DecodeState(NamedTuple):
    cache: KVCache
    tokens: jax.Array  # [B, N] generated tokens; N = cache slots - prompt length
    logits: jax.Array | None  # [B, N, V] float32 when recorded (tests), else None
    step: jax.Array  # scalar int32: tokens generated so far
    done: jax.Array  # [B] bool: row finished (EOS, stop string, or a batch-padding row)
    offset: jax.Array  # [B] int32: left-padding slots; rope position = slot - offset
    key: jax.Array
    eos: jax.Array  # [E] int32 stop ids, padded with -1
    pad_id: jax.Array  # scalar int32 written after a row finished


def _prefill(graphdef, state, prompt, prompt_seg, active, key, eos, pad_id, *, sampler, slots, record_logits, mesh):
    """Run the left-padded prompts `[B, P]` through the model, fill the cache, sample token 0."""
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    seg = jnp.concatenate([prompt_seg, jnp.ones((b, slots - p), jnp.int32)], axis=1)  # [B, S]
    cache = init_cache(model.config, constrain(seg, mesh, ("batch", "length")), mesh)
    offset = p - jnp.sum(prompt_seg, axis=1, dtype=jnp.int32)  # [B]
    positions = jnp.maximum(jnp.arange(p, dtype=jnp.int32)[None] - offset[:, None], 0)  # [B, P]
    h, cache = forward_cached(model, prompt, positions, 0, cache, mesh)
    logits = model.logits(h[:, -1:])[:, 0]  # [B, V]: every row's last prompt token is at slot P-1
    tok = sample_tokens(logits, jax.random.fold_in(key, 0), sampler)
    tok = jnp.where(active, tok, pad_id)
    tokens = jnp.full((b, slots - p), pad_id, jnp.int32).at[:, 0].set(tok)
    rec = None
    if record_logits:
        rec = jnp.zeros((b, slots - p, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
    done = ~active | jnp.isin(tok, eos)
    return DecodeState(cache, tokens, rec, jnp.int32(1), done, offset, key, eos, pad_id)


def _decode(graphdef, state, ds: DecodeState, limit, *, sampler, mesh) -> DecodeState:
    """Decode until `step == limit` or every row is done; one token per iteration."""
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, state)
    prompt_len = ds.cache.slots - ds.tokens.shape[1]

    def cond(ds: DecodeState):
        return (ds.step < limit) & ~jnp.all(ds.done)

    def body(ds: DecodeState) -> DecodeState:
        slot = prompt_len + ds.step - 1  # where the last generated token goes
        last = jax.lax.dynamic_slice_in_dim(ds.tokens, ds.step - 1, 1, axis=1)  # [B, 1]
        positions = (slot - ds.offset)[:, None]  # [B, 1]
        h, cache = forward_cached(model, last, positions, slot, ds.cache, mesh)
        logits = model.logits(h)[:, 0]  # [B, V]
        tok = jnp.where(ds.done, ds.pad_id, sample_tokens(logits, jax.random.fold_in(ds.key, ds.step), sampler))
        tokens = jax.lax.dynamic_update_slice(ds.tokens, tok[:, None], (0, ds.step))
        rec = ds.logits
        if rec is not None:
            rec = jax.lax.dynamic_update_slice(rec, logits[:, None], (0, ds.step, 0))
        done = ds.done | jnp.isin(tok, ds.eos)
        return ds._replace(cache=cache, tokens=tokens, logits=rec, step=ds.step + 1, done=done)

    return jax.lax.while_loop(cond, body, ds)


# XLA:CPU compiles generation without YNNPACK fusions. At batch 64 its batched attention
# products packed each layer's cached keys and values into freshly mapped memory at every step
# (SmolLM2, 640 slots: about 500,000 page faults and 1.7 s a decode step, against 3,500 faults
# and 0.41 s without; docs/benchmarks.md). Training keeps them (its layer products gain).
CPU_GENERATION_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class _BackendJit:
    """`jax.jit(fn)`, compiled with `CPU_GENERATION_OPTIONS` when the default backend is the CPU.
    The choice is made at call time: reading the backend at import would start it."""

    def __init__(self, fn: Callable, **kw: Any):
        self._cpu = jax.jit(fn, compiler_options=CPU_GENERATION_OPTIONS, **kw)
        self._other = jax.jit(fn, **kw)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return (self._cpu if jax.default_backend() == "cpu" else self._other)(*args, **kw)

    def _cache_size(self) -> int:
        return self._cpu._cache_size() + self._other._cache_size()


_prefill_jit = _BackendJit(_prefill, static_argnames=("graphdef", "sampler", "slots", "record_logits", "mesh"))
_decode_jit = _BackendJit(_decode, static_argnames=("graphdef", "sampler", "mesh"), donate_argnames=("ds",))


def _take_rows(ds: DecodeState, rows: jax.Array) -> DecodeState:
    """The decode state of batch rows `rows` [B'] only: every per-row leaf gathered on its batch axis."""
    TRACE_COUNTS["take_rows"] += 1

    def take(x: jax.Array) -> jax.Array:
        return jnp.take(x, rows, axis=0)

    c = ds.cache
    cache = KVCache(tuple(map(take, c.k)), tuple(map(take, c.v)), take(c.segment_ids))
    logits = None if ds.logits is None else take(ds.logits)
    return ds._replace(cache=cache, tokens=take(ds.tokens), logits=logits, done=take(ds.done), offset=take(ds.offset))


_take_rows_jit = jax.jit(_take_rows)


# --------------------------------------------------------------------------- host side


def _pow2(n: int, minimum: int = 1) -> int:
    return 1 << (max(n, minimum) - 1).bit_length()


def model_eos_ids(cfg: DecoderConfig, extra: Sequence[int | None] = ()) -> tuple[int, ...]:
    """EOS ids of config.json and generation_config.json (instruct models often add one there),
    then `extra` (e.g. the tokenizer's), without duplicates."""
    ids = list(cfg.eos_token_id)
    if cfg.generation_config_json:
        gen = json.loads(cfg.generation_config_json).get("eos_token_id")
        ids += gen if isinstance(gen, list) else [gen] if gen is not None else []
    return tuple(dict.fromkeys(int(i) for i in [*ids, *extra] if i is not None))


def _placed_state(model: Decoder, mesh: Mesh | None):
    """(graphdef, state) with parameters on `mesh` by the rules table (no-op if already there)."""
    graphdef, state = nnx.split(model)
    if mesh is None:
        return graphdef, state
    shardings = param_shardings(model, mesh)
    flat = []
    for path, var in nnx.to_flat_state(state):
        sh = shardings.get("/".join(map(str, path)))
        flat.append((path, var if sh is None else var.replace(jax.device_put(var.get_value(), sh))))
    return graphdef, nnx.from_flat_state(flat)


def _host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host, batch-sharded) array on this host, whole."""
    if x.is_fully_addressable:
        return np.array(x)
    from jax.experimental import multihost_utils

    return np.array(multihost_utils.process_allgather(x, tiled=True))


def _put(x: np.ndarray, mesh: Mesh | None, axes: tuple) -> jax.Array:
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, named_sharding(mesh, axes, x.shape))


@dataclasses.dataclass
class BatchOutput:
    tokens: list[list[int]]  # per prompt: new ids up to and including the stop (EOS or stop string)
    finish_reasons: list[str]
    logits: np.ndarray | None = None  # [B, N, V] float32 per generated position, when recorded
    compile_shapes: tuple[int, int, int] = (0, 0, 0)  # (batch, prompt, cache slots) buckets used
    cut_at: int | None = None  # the step `on_segment` stopped decoding at, with rows unfinished


def _first_stop(ids: list[int], start: int, decode: Callable[[list[int]], str], stops: Sequence[str]) -> int | None:
    """Smallest k > start with a stop string in decode(ids[:k]), or None."""
    if not any(s in decode(ids) for s in stops):
        return None
    for k in range(max(start, 0) + 1, len(ids) + 1):
        if any(s in decode(ids[:k]) for s in stops):
            return k
    return len(ids)


def sample_batch(
    model: Decoder,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
    decode: Callable[[list[int]], str] | None = None,
    record_logits: bool = False,
    stream: int = 0,
    check_every: int = STOP_STRING_CHECK_EVERY,
    on_progress: Callable[[int], None] | None = None,
    compact: bool | None = None,
    on_segment: Callable[[dict[str, int]], bool] | None = None,
) -> BatchOutput:
    """Generate for all `prompts` as one batch, stopping on exactly `eos_ids` (no model defaults).

    `decode` (ids -> text) is needed for stop strings; `stream` varies the random key
    (`fold_in(key(seed), stream)`) between batches of one request. `on_progress(step)` is
    called every `check_every` decode steps (the loop then returns to the host that often).
    `compact`: drop finished rows from the batch as it goes (module docstring); default: when
    greedy, on an unsharded batch of at least 16 rows, without `record_logits`.
    `on_segment({"phase", "rows", "steps"})` is called after the prefill ("prefill", steps 0) and
    after each compiled decode call ("decode": `steps` steps of `rows` batch rows; the loop then
    returns to the host every `check_every` steps), once that work has finished, so a caller can
    time each batch size; a true return stops decoding there: the unfinished rows end with
    finish reason "length" at the step reached (`BatchOutput.cut_at`).
    """
    if sampling.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (ids -> text); generate_chat passes the tokenizer's")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    n_new = sampling.max_new_tokens
    if not prompts or n_new == 0:
        return BatchOutput([[] for _ in prompts], ["length"] * len(prompts))
    mesh = mesh if mesh is not None else model.mesh
    shards = batch_ways(mesh)
    b = -(-_pow2(len(prompts)) // shards) * shards
    p = _pow2(max(len(x) for x in prompts), MIN_PROMPT_BUCKET)
    slots = -(-(p + n_new) // SLOT_BUCKET) * SLOT_BUCKET  # every decode step reads all slots: no pow2 waste
    ids = np.full((b, p), pad_id, np.int32)
    seg = np.zeros((b, p), np.int32)
    for i, row in enumerate(prompts):
        ids[i, p - len(row) :], seg[i, p - len(row) :] = row, 1
    seg[len(prompts) :, -1] = 1  # batch-padding rows: one pad token, finished from the start
    active = np.arange(b) < len(prompts)
    eos = np.full((_pow2(len(eos_ids), 4),), -1, np.int32)
    eos[: len(eos_ids)] = eos_ids
    graphdef, state = _placed_state(model, mesh)
    key = jax.random.fold_in(jax.random.key(sampling.seed), stream)
    sampler = Sampler(
        sampling.greedy, float(sampling.temperature), int(sampling.top_k), float(sampling.top_p), sampling.logit_bias
    )
    shrink = (
        (sampling.greedy if compact is None else compact)
        and shards == 1
        and not record_logits
        and b >= 2 * COMPACT_MIN_ROWS  # a smaller batch can never halve: decode it in one call
    )
    ds = _prefill_jit(
        graphdef,
        state,
        _put(ids, mesh, ("batch", None)),
        _put(seg, mesh, ("batch", None)),
        _put(active, mesh, ("batch",)),
        key,
        jnp.asarray(eos),
        jnp.int32(pad_id),
        sampler=sampler,
        slots=slots,
        record_logits=record_logits,
        mesh=mesh,
    )
    cut = False
    if on_segment is not None:
        ds.done.block_until_ready()
        cut = bool(on_segment({"phase": "prefill", "rows": b, "steps": 0}))
    stops = sampling.stop_strings
    stop_at: dict[int, int] = {}  # row -> tokens kept (through the stop string)
    checked = [0] * len(prompts)
    rows = np.arange(b)  # batch row -> prompt index (>= len(prompts): batch padding); compaction reorders
    kept: dict[int, np.ndarray] = {}  # prompt index -> its generated tokens, once compacted away
    step = 1
    while True:
        if stops:
            tokens, done = _host(ds.tokens), _host(ds.done)
            for j, i in enumerate(rows.tolist()):
                if i >= len(prompts) or i in stop_at or i in kept:
                    continue
                row = tokens[j, :step].tolist()
                hit = [t for t, tok in enumerate(row) if tok in eos_ids]
                row = row[: hit[0] + 1] if hit else row
                k = _first_stop(row, checked[i], decode, stops) if len(row) > checked[i] else None
                checked[i] = len(row)
                if k is not None:
                    stop_at[i], done[j] = k, True
            ds = ds._replace(done=jax.device_put(done, ds.done.sharding))
        if on_progress is not None:
            on_progress(step)
        if step >= n_new or _host(ds.done).all() or cut:
            break
        if shrink:
            ds, rows = _compact(ds, rows, kept, len(prompts))
        chunked = stops or on_progress is not None or shrink or on_segment is not None
        limit = min(n_new, step + check_every) if chunked else n_new
        ds = _decode_jit(graphdef, state, ds, jnp.int32(limit), sampler=sampler, mesh=mesh)
        before, step = step, int(ds.step)  # int() waits for the decode call to finish
        if on_segment is not None:
            cut = bool(on_segment({"phase": "decode", "rows": len(rows), "steps": step - before}))
    tokens = _host(ds.tokens)
    where = {int(i): j for j, i in enumerate(rows.tolist())}
    out_tokens, reasons = [], []
    for i in range(len(prompts)):
        row = (kept[i] if i in kept else tokens[where[i]])[:n_new].tolist()
        hit = next((j for j, t in enumerate(row[:step]) if t in eos_ids), None)
        if i in stop_at:
            out_tokens.append(row[: stop_at[i]])
            reasons.append("stop_string")
        elif hit is not None:
            out_tokens.append(row[: hit + 1])
            reasons.append("stop")
        else:
            out_tokens.append(row[:step])
            reasons.append("length")
    logits = _host(ds.logits)[: len(prompts), :n_new] if record_logits else None
    cut_at = step if cut and step < n_new and not _host(ds.done).all() else None
    return BatchOutput(out_tokens, reasons, logits, (b, p, slots), cut_at)


def _compact(
    ds: DecodeState, rows: np.ndarray, kept: dict[int, np.ndarray], n_prompts: int
) -> tuple[DecodeState, np.ndarray]:
    """Gather the unfinished rows into a batch of the next power of two (at least
    `COMPACT_MIN_ROWS`) when that halves the batch at least; the finished rows' tokens go to `kept`.
    Finished rows fill the new batch's spare places (still finished: they decode padding)."""
    done = _host(ds.done)
    live = np.flatnonzero(~done)
    size = _pow2(len(live), COMPACT_MIN_ROWS)
    if size > len(rows) // 2:
        return ds, rows
    tokens = _host(ds.tokens)
    finished = np.flatnonzero(done)
    for j in finished:
        if rows[j] < n_prompts:
            kept.setdefault(int(rows[j]), tokens[j])
    take = np.concatenate([live, finished[: size - len(live)]])
    return _take_rows_jit(ds, jnp.asarray(take, jnp.int32)), rows[take]


def generate_ids(
    model: Decoder,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> list[tuple[list[int], str]]:
    """Per prompt, in input order: (new ids through the stop, finish reason in FINISH_REASONS).

    Stops on the model's EOS ids (config and generation config) plus `eos_ids` (pass the
    tokenizer's). All prompts form one batch; `generate_chat` splits large requests.
    `decode` (ids -> text) is required only for `sampling.stop_strings`.
    """
    eos = model_eos_ids(model.config, eos_ids)
    out = sample_batch(model, prompts, sampling, eos_ids=eos, pad_id=pad_id, mesh=mesh, decode=decode)
    return list(zip(out.tokens, out.finish_reasons))


def greedy_generate(
    model: Decoder, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy continuation of one prompt (kept for callers of the old stop-gap sampler)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    return generate_ids(model, [list(prompt_ids)], sampling, eos_ids=eos_ids)[0][0]


# --------------------------------------------------------------------------- chat


def chat_tokenizer(tokenizer: Any, system_prompt: str | None = None, fmt: TraceFormat | None = None) -> ChatTokenizer:
    """`tokenizer` as a ChatTokenizer (a HF tokenizer is wrapped), with `system_prompt` / `fmt` if given."""
    if isinstance(tokenizer, ChatTokenizer):
        if (system_prompt is None or system_prompt == tokenizer.system_prompt) and fmt in (None, tokenizer.fmt):
            return tokenizer
        return ChatTokenizer(
            tokenizer.tok,
            system_prompt if system_prompt is not None else tokenizer.system_prompt,
            tokenizer.name,
            tokenizer.template_kwargs,
            fmt or tokenizer.fmt,
        )
    return ChatTokenizer(tokenizer, system_prompt, fmt=fmt or TraceFormat())


def _prefix_parts(row: dict) -> list[str]:
    prefix = row.get("assistant_prefix") or []
    return [prefix] if isinstance(prefix, str) else [str(p) for p in prefix]


def chat_prompt_ids(tokenizer: Any, row: dict, system_prompt: str | None = None) -> list[int]:
    """Token ids a row's answer is generated after: the chat (`prompt` str or `messages`) rendered
    with the generation prompt, then the row's `assistant_prefix` (a string or a list of steps),
    tokenized as training tokenizes them (`ChatTokenizer.prompt_ids`).

    Without `system_prompt` the template's default applies; a row's own system message wins.
    """
    ct = chat_tokenizer(tokenizer, system_prompt)
    if "messages" in row:
        msgs = ct.messages(messages=list(row["messages"]))
    elif "prompt" in row:
        msgs = ct.messages(str(row["prompt"]))
    else:
        raise ValueError(f"row {row.get('id')!r} has neither 'prompt' nor 'messages'")
    return ct.prompt_ids(msgs, _prefix_parts(row))


def generate_chat(
    model: Decoder,
    tokenizer: Any,
    rows: list[dict],
    sampling: SamplingConfig,
    *,
    batch_size: int = 8,
    system_prompt: str | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    fmt: TraceFormat | None = None,
    compact: bool | None = None,
    on_segment: Callable[[dict[str, int]], bool] | None = None,
) -> list[dict]:
    """Answer chat rows; returns per row, in input order, {"id", "text", "reasoning", "response",
    "prompt_tokens", "completion_tokens", "finish_reason"}.

    `tokenizer` is a ChatTokenizer (its template arguments apply) or a HF tokenizer. A row
    with `assistant_prefix` continues that assistant text; its `text` is prefix + continuation.
    Generation stops at the model's EOS ids and the tokenizer's end-of-turn ids (`stop_ids`).
    Rows are sorted by prompt length into batches (less padding, fewer shape buckets).
    `compact`: as `sample_batch`'s (default: finished rows leave a greedy batch).
    `on_segment`: as `sample_batch`'s; once it stops a batch, the later batches are not run. The rows
    it cut (unfinished at that step, or never started) have finish reason "length" and `"cut": True`.
    """
    from tqdm.auto import tqdm

    ct = chat_tokenizer(tokenizer, system_prompt, fmt)
    tok = ct.tok
    encoded = [chat_prompt_ids(ct, row) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    eos = model_eos_ids(model.config, ct.stop_ids())
    pad = tok.pad_token_id if tok.pad_token_id is not None else (model.config.pad_token_id or 0)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    results: list[dict] = [{} for _ in rows]

    def row_result(i: int, ids: list[int], text: str, reason: str) -> dict:
        prefix = "".join(_prefix_parts(rows[i]))
        reasoning, response = split_think(prefix + text, ct.fmt)
        return {
            "id": rows[i].get("id", i),
            "text": prefix + text,
            "reasoning": reasoning,
            "response": response,
            "prompt_tokens": len(encoded[i]),
            "completion_tokens": len(ids),
            "finish_reason": reason,
        }

    bar = tqdm(
        total=len(batches) * sampling.max_new_tokens,
        desc=f"generate ({len(batches)} batches)",
        unit="step",
        disable=not progress,
        mininterval=2.0,
    )
    cut = False
    for n, idx in enumerate(batches):
        done_before = n * sampling.max_new_tokens
        if cut:  # stopped by on_segment: the later batches are not run
            for i in idx:
                results[i] = {**row_result(i, [], "", "length"), "cut": True}
            continue
        out = sample_batch(
            model,
            [encoded[i] for i in idx],
            sampling,
            eos_ids=eos,
            pad_id=pad,
            mesh=mesh,
            decode=decode,
            stream=n,
            compact=compact,
            on_progress=(lambda step, d=done_before: bar.update(d + step - bar.n)) if progress else None,
            on_segment=on_segment,
        )
        cut = out.cut_at is not None
        bar.update(done_before + sampling.max_new_tokens - bar.n)
        for i, ids, reason in zip(idx, out.tokens, out.finish_reasons):
            text = decode(ids)
            if reason == "stop_string":  # cut after the stop string (its last token may run past it)
                end = min((text.find(s) + len(s) for s in sampling.stop_strings if s in text), default=len(text))
                text = text[:end]
            results[i] = row_result(i, ids, text, reason)
            if cut and reason == "length" and len(ids) < sampling.max_new_tokens:
                results[i]["cut"] = True
    bar.close()
    return results
