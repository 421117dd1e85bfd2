"""grain input pipelines over fixed-shape numpy: SFT (first-fit packed) and preference pairs.

No JAX here: the process index and count are arguments, so the same pipeline runs in a
test, on one host, or as one shard of a multi-host job. Records are validated when the
dataset is built (bad ones raise with file/line/field, or are counted under
`skip_invalid`); tokenization runs lazily inside grain. Iterators expose grain's
`get_state()` / `set_state()` and resume exactly.

SFT batches: `inputs`, `targets` (next token), `weights` (loss on assistant targets),
`segment_ids` (0 = padding) and `positions`, all `[B, T]`.
Preference batches: `input_ids`, `span_mask`, `segment_ids`, `positions` of shape `[2B, T]`,
chosen rows first, then the rejected rows in the same order. A pair longer than the sequence
loses context from the left, never span tokens; pairs whose span cannot fit are dropped
before training by `drop_unfit_pairs`, which says how many.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grain
import numpy as np

from safer_jax.data.pairs import StepPair, encode_pair, fit_pair, pair_from_record
from safer_jax.data.records import DataError, SkipReport, read_records
from safer_jax.data.rules import RuleBook
from safer_jax.data.tokenize import ChatTokenizer, TruncationStats, truncate
from safer_jax.data.traces import Trace, TraceFormat, trace_from_record, validate

SFT_KEYS = ("inputs", "targets", "weights")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    seq_len: int = 1024
    batch_size: int = 8  # per process (global batch / process count); every process runs the global pipeline
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None = repeat forever
    packing_bins: int = 16
    process_index: int = 0
    process_count: int = 1
    length_buckets: int = 0  # preference rows: 0 = every row seq_len long; n = n row lengths up to seq_len
    read_threads: int = 2  # threads tokenizing ahead of the training loop; 0 = in the caller's thread
    read_buffer: int = 0  # records tokenized ahead; 0 = four global batches' worth


def read_options(cfg: PipelineConfig, per_element: int = 1) -> grain.ReadOptions:
    """How far grain tokenizes ahead. Records live in memory and tokenizing is Python (GIL-bound),
    so grain's defaults for remote files (16 threads, 500 records) only contend with the training
    loop and refill 500 records after every `set_state` (each resume and each ahead-of-time peek).
    A few threads and about four global batches keep the next batch ready without that.
    `per_element`: batch rows one element already holds (1 for a record; a batch for buckets)."""
    rows = cfg.batch_size * cfg.process_count
    buffer = cfg.read_buffer or max(4, -(-4 * rows // per_element))
    return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=buffer)


def load_traces(
    path: str | Path,
    rules: RuleBook | None = None,
    fmt: TraceFormat = TraceFormat(),
    skip_invalid: bool = False,
    report: SkipReport | None = None,
) -> list[Trace]:
    """Parse and (with `rules`) validate every trace; errors name file, line and field."""
    report = report if report is not None else SkipReport()
    out = []
    for line, obj in read_records(path, skip_invalid, report):
        try:
            t = trace_from_record(obj, path, line, fmt)
            if rules is not None:
                problems = validate(t, rules, fmt)
                if problems:
                    field = (
                        "rules"
                        if problems[0].startswith("unknown rule")
                        else "decision"
                        if "decision" in problems[0]
                        else None
                    )
                    raise DataError(problems[0], path, line, field)
            out.append(t)
        except DataError as e:
            if not skip_invalid:
                raise
            report.add(e)
    return out


def load_pairs(path: str | Path, skip_invalid: bool = False, report: SkipReport | None = None) -> list[StepPair]:
    report = report if report is not None else SkipReport()
    out = []
    for line, obj in read_records(path, skip_invalid, report):
        try:
            out.append(pair_from_record(obj, path, line))
        except DataError as e:
            if not skip_invalid:
                raise
            report.add(e)
    return out


class _TokenizeTrace(grain.transforms.Map):
    def __init__(self, ct: ChatTokenizer, fmt: TraceFormat | None, seq_len: int, stats: TruncationStats):
        self.ct, self.fmt, self.seq_len, self.stats = ct, fmt, seq_len, stats

    def map(self, trace: Trace) -> dict[str, np.ndarray]:
        ex = truncate(self.ct.encode_trace(trace, self.fmt, where=trace.id), self.seq_len + 1, self.stats)
        ids, mask = ex["input_ids"], ex["loss_mask"]
        return {"inputs": ids[:-1], "targets": ids[1:], "weights": mask[1:].astype(np.float32)}


def _base(records: list[Any], cfg: PipelineConfig) -> grain.MapDataset:
    if not records:
        raise DataError("no records to build a pipeline from")
    ds = grain.MapDataset.source(records)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    return ds.repeat(cfg.num_epochs)


class _ProcessRows(grain.transforms.Map):
    """This process's rows of a global batch: block `process_index` of `process_count`.

    Every process runs the same global pipeline (same shuffle, packing and batches) and keeps
    its block, so the assembled global batch, the losses and the iterator state do not depend
    on the process count: a checkpoint of N processes resumes on M.
    """

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lo = self.cfg.process_index * self.cfg.batch_size
        return {k: v[lo : lo + self.cfg.batch_size] for k, v in batch.items()}


def _global_batches(ds: grain.IterDataset, cfg: PipelineConfig, drop_remainder: bool = True) -> grain.IterDataset:
    ds = ds.batch(cfg.batch_size * cfg.process_count, drop_remainder=drop_remainder)
    return ds.map(_ProcessRows(cfg)) if cfg.process_count > 1 else ds


def sft_dataset(
    traces: list[Trace],
    ct: ChatTokenizer,
    cfg: PipelineConfig,
    fmt: TraceFormat | None = None,
    stats: TruncationStats | None = None,
    pack: bool = True,
) -> grain.IterDataset:
    """Tokenized, (first-fit) packed, batched SFT examples (`fmt` default: the tokenizer's trace format)."""
    stats = stats if stats is not None else TruncationStats()
    ds = _base(traces, cfg).map(_TokenizeTrace(ct, fmt, cfg.seq_len, stats)).to_iter_dataset(read_options(cfg))
    length = {k: cfg.seq_len for k in SFT_KEYS}
    if pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=length, num_packing_bins=cfg.packing_bins, seed=cfg.seed, shuffle_bins=cfg.shuffle
        )
        ds = ds.map(_rename_packed)
    else:
        ds = ds.map(lambda ex: _pad_example(ex, cfg.seq_len))
    return _global_batches(ds, cfg)


def _rename_packed(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: ex[k] for k in SFT_KEYS}
    out["segment_ids"] = ex["inputs_segment_ids"].astype(np.int32)
    out["positions"] = ex["inputs_positions"].astype(np.int32)
    return out


def _pad_example(ex: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    n = len(ex["inputs"])
    out = {k: np.pad(v, (0, seq_len - n)) for k, v in ex.items()}
    out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    out["positions"] = np.where(out["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
    return out


class _TokenizePair(grain.transforms.Map):
    """(pair index, pair, reference log-probs [2] or None) -> fixed-length chosen/rejected rows."""

    def __init__(self, ct: ChatTokenizer, seq_len: int, stats: TruncationStats):
        self.ct, self.seq_len, self.stats = ct, seq_len, stats

    def map(self, item: tuple[int, StepPair, np.ndarray | None]) -> dict[str, np.ndarray]:
        index, pair, ref = item
        fit = fit_pair(encode_pair(self.ct, pair, where=pair.id), self.seq_len)
        if fit is None:
            raise DataError(
                f"pair {pair.id!r}: its scored span does not fit data.seq_len={self.seq_len} "
                "(drop_unfit_pairs removes such pairs before training)"
            )
        rows, dropped = fit
        self.stats.examples += 1
        if dropped:
            self.stats.truncated += 1
            self.stats.tokens_dropped += dropped
        out = {"index": np.int32(index)}
        if ref is not None:
            out["ref"] = np.asarray(ref, np.float32)
        for side in ("chosen", "rejected"):
            ids, mask = rows[f"{side}_ids"], rows[f"{side}_mask"]
            n = len(ids)
            out[f"{side}_ids"] = np.pad(ids, (0, self.seq_len - n))
            out[f"{side}_mask"] = np.pad(mask, (0, self.seq_len - n))
            out[f"{side}_len"] = np.int32(n)
        return out


class _StackPairs(grain.transforms.Map):
    def __init__(self, with_index: bool):
        self.with_index = with_index

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.concatenate([batch["chosen_ids"], batch["rejected_ids"]], 0)
        mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0)
        lens = np.concatenate([batch["chosen_len"], batch["rejected_len"]], 0)
        seg = (np.arange(ids.shape[1])[None, :] < lens[:, None]).astype(np.int32)
        pos = np.where(seg > 0, np.arange(ids.shape[1])[None, :], 0).astype(np.int32)
        out = {"input_ids": ids, "span_mask": mask, "segment_ids": seg, "positions": pos}
        if "ref" in batch:  # [B, 2] -> [2B]: chosen values, then rejected, like the rows
            out["ref_logps"] = np.concatenate([batch["ref"][:, 0], batch["ref"][:, 1]])
        if self.with_index:
            out["pair_index"] = batch["index"]
        return out


def preference_dataset(
    pairs: list[StepPair],
    ct: ChatTokenizer,
    cfg: PipelineConfig,
    stats: TruncationStats | None = None,
    ref_logps: np.ndarray | None = None,
    with_index: bool = False,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """Batches of B pairs as `[2B, T]` arrays: chosen rows, then rejected rows.

    `ref_logps` `[N, 2]` (chosen, rejected span log-probs under the reference, aligned with
    `pairs`) adds `ref_logps` `[2B]` to each batch; `with_index` adds `pair_index` `[B]`.
    """
    stats = stats if stats is not None else TruncationStats()
    if ref_logps is not None and len(ref_logps) != len(pairs):
        raise ValueError(f"ref_logps has {len(ref_logps)} rows for {len(pairs)} pairs")
    items = [(i, p, None if ref_logps is None else ref_logps[i]) for i, p in enumerate(pairs)]
    if cfg.length_buckets:
        return _bucketed_pairs(items, ct, cfg, stats, with_index)
    ds = _base(items, cfg).map(_TokenizePair(ct, cfg.seq_len, stats)).to_iter_dataset(read_options(cfg))
    return _global_batches(ds, cfg, drop_remainder).map(_StackPairs(with_index))


def drop_unfit_pairs(pairs: list[StepPair], ct: ChatTokenizer, seq_len: int, log: Any = print) -> list[StepPair]:
    """The pairs whose scored spans fit `seq_len` (context is cut from the left to make room);
    the others are counted and dropped here, before training, and the count is logged."""
    kept = [p for p in pairs if fit_pair(encode_pair(ct, p, where=p.id), seq_len) is not None]
    if len(kept) < len(pairs):
        log(
            f"skipped {len(pairs) - len(kept)}/{len(pairs)} pairs whose scored span does not fit "
            f"data.seq_len={seq_len} (context is cut from the left, never the span)"
        )
    if not kept:
        raise DataError(f"no pair fits data.seq_len={seq_len}")
    return kept


# ---------------------------------------------------------------- length buckets (preference)


def bucket_lengths(seq_len: int, n: int, multiple: int = 64) -> tuple[int, ...]:
    """n row lengths up to seq_len, evenly spaced and rounded up to `multiple`; the last is seq_len."""
    out = {min(seq_len, -(-(seq_len * k // n) // multiple) * multiple) for k in range(1, n + 1)}
    return tuple(sorted(out | {seq_len}))


def plan_buckets(lengths: np.ndarray, buckets: tuple[int, ...], batch: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """Global batches `(row length, pair indices [batch])`, every pair in the shortest bucket
    that holds both its rows. A bucket's leftover pairs (fewer than a batch) move up to the
    next bucket; the last bucket's leftover is dropped. Batch order is shuffled by `seed`.
    """
    rng = np.random.default_rng(seed)
    which = np.searchsorted(np.asarray(buckets), lengths)  # first bucket >= length
    carry = np.zeros(0, np.int64)
    plan = []
    for b, length in enumerate(buckets):
        pool = np.concatenate([carry, rng.permutation(np.nonzero(which == b)[0])])
        full = len(pool) // batch * batch
        plan += [(length, pool[i : i + batch]) for i in range(0, full, batch)]
        carry = pool[full:]
    return [plan[i] for i in rng.permutation(len(plan))]


class _BucketBatch(grain.transforms.Map):
    """(row length, this process's items) -> one stacked `[2b, L]` batch."""

    def __init__(self, ct: ChatTokenizer, stats: TruncationStats, with_index: bool):
        self.ct, self.stats, self.stack = ct, stats, _StackPairs(with_index)

    def map(self, planned: tuple[int, list[Any]]) -> dict[str, np.ndarray]:
        length, items = planned
        tok = _TokenizePair(self.ct, length, self.stats)  # a bucket holds its pairs: only seq_len truncates
        rows = [tok.map(it) for it in items]
        return self.stack.map({k: np.stack([r[k] for r in rows]) for k in rows[0]})


def _bucketed_pairs(
    items: list[Any], ct: ChatTokenizer, cfg: PipelineConfig, stats: TruncationStats, with_index: bool
) -> grain.IterDataset:
    """Preference batches whose row length is the shortest of `cfg.length_buckets` buckets that
    holds every pair in the batch (each pair tokenized once here to learn its length). The
    global batch is planned once so that every process gets the same row length at each step.
    """
    lengths = np.asarray(
        [
            max(len(enc["chosen_ids"]), len(enc["rejected_ids"]))
            for enc in (encode_pair(ct, p, where=p.id) for _, p, _ in items)
        ]
    )
    buckets = bucket_lengths(cfg.seq_len, cfg.length_buckets)
    glob = cfg.batch_size * cfg.process_count
    plan = plan_buckets(np.minimum(lengths, cfg.seq_len), buckets, glob, cfg.seed)
    if not plan:
        raise DataError(f"{len(items)} pairs do not fill one batch of {glob}")
    lo = cfg.process_index * cfg.batch_size
    local = [(length, [items[i] for i in idx[lo : lo + cfg.batch_size]]) for length, idx in plan]
    ds = grain.MapDataset.source(local)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    opts = read_options(cfg, per_element=cfg.batch_size)  # an element here is this process's whole batch
    return ds.repeat(cfg.num_epochs).map(_BucketBatch(ct, stats, with_index)).to_iter_dataset(opts)


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
    """Share of a batch's positions that are padding (segment 0)."""
    return float(np.mean(np.asarray(batch["segment_ids"]) == 0))


def is_trace_record(obj: dict[str, Any]) -> bool:
    """A trace (or chat-format trace) rather than a pair: it has steps or messages and no chosen/rejected."""
    return ("steps" in obj or "messages" in obj) and "chosen" not in obj


def load_preference_data(
    path: str | Path,
    rules: RuleBook,
    span: str = "step",
    skip_invalid: bool = False,
    report: SkipReport | None = None,
    seed: int = 0,
    fmt: TraceFormat = TraceFormat(),
) -> list[StepPair]:
    """Pairs from a pairs file (any accepted format), or built from a traces file by `make_pairs`."""
    from safer_jax.data.pairs import make_pairs

    first = next(iter(read_records(path, True, SkipReport())), None)
    if first is None:
        raise DataError("no records", path)
    if is_trace_record(first[1]):
        return make_pairs(
            load_traces(path, rules, fmt, skip_invalid=skip_invalid, report=report),
            rules,
            seed=seed,
            span=span,
            fmt=fmt,
        )
    return load_pairs(path, skip_invalid=skip_invalid, report=report)
