"""grain input pipelines over fixed-shape numpy: SFT (first-fit packed) and preference pairs.

No JAX here: the process index and count are arguments, so the same pipeline runs in a
test, on one host, or as one shard of a multi-host job. Records are validated when the
dataset is built (bad ones raise with file/line/field, or are counted under
`skip_invalid`); tokenization runs lazily inside grain. Iterators expose grain's
`get_state()` / `set_state()` and resume exactly.

SFT batches: `inputs`, `targets` (next token), `weights` (loss on assistant targets),
`step_ids` (of each target), `segment_ids` (0 = padding) and `positions`, all `[B, T]`.
Preference batches: `input_ids`, `span_mask`, `segment_ids`, `positions` of shape `[2B, T]`,
chosen rows first, then the rejected rows in the same order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grain
import numpy as np

from safer_jax.data.pairs import StepPair, encode_pair, pair_from_record
from safer_jax.data.records import DataError, SkipReport, read_records
from safer_jax.data.rules import RuleBook
from safer_jax.data.tokenize import ChatTokenizer, TruncationStats, truncate
from safer_jax.data.traces import Trace, TraceFormat, trace_from_record, validate

SFT_KEYS = ("inputs", "targets", "weights", "step_ids")


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


def load_traces(path: str | Path, rules: RuleBook | None = None, fmt: TraceFormat = TraceFormat(),
                skip_invalid: bool = False, report: SkipReport | None = None) -> list[Trace]:
    """Parse and (with `rules`) validate every trace; errors name file, line and field."""
    report = report if report is not None else SkipReport()
    out = []
    for line, obj in read_records(path, skip_invalid, report):
        try:
            t = trace_from_record(obj, path, line, fmt)
            if rules is not None:
                problems = validate(t, rules, fmt)
                if problems:
                    field = "rules" if problems[0].startswith("unknown rule") else "decision" \
                        if "decision" in problems[0] else None
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
    def __init__(self, ct: ChatTokenizer, fmt: TraceFormat, seq_len: int, stats: TruncationStats):
        self.ct, self.fmt, self.seq_len, self.stats = ct, fmt, seq_len, stats

    def map(self, trace: Trace) -> dict[str, np.ndarray]:
        ex = truncate(self.ct.encode_trace(trace, self.fmt, where=trace.id), self.seq_len + 1, self.stats)
        ids, mask, steps = ex["input_ids"], ex["loss_mask"], ex["step_ids"]
        return {"inputs": ids[:-1], "targets": ids[1:], "weights": mask[1:].astype(np.float32), "step_ids": steps[1:]}


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
        return {k: v[lo:lo + self.cfg.batch_size] for k, v in batch.items()}


def _global_batches(ds: grain.IterDataset, cfg: PipelineConfig, drop_remainder: bool = True) -> grain.IterDataset:
    ds = ds.batch(cfg.batch_size * cfg.process_count, drop_remainder=drop_remainder)
    return ds.map(_ProcessRows(cfg)) if cfg.process_count > 1 else ds


def sft_dataset(traces: list[Trace], ct: ChatTokenizer, cfg: PipelineConfig, fmt: TraceFormat = TraceFormat(),
                stats: TruncationStats | None = None, pack: bool = True) -> grain.IterDataset:
    """Tokenized, (first-fit) packed, batched SFT examples."""
    stats = stats if stats is not None else TruncationStats()
    ds = _base(traces, cfg).map(_TokenizeTrace(ct, fmt, cfg.seq_len, stats)).to_iter_dataset()
    length = {k: cfg.seq_len for k in SFT_KEYS}
    if pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=length, num_packing_bins=cfg.packing_bins, seed=cfg.seed, shuffle_bins=cfg.shuffle)
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
        enc = encode_pair(self.ct, pair, where=pair.id)
        out = {"index": np.int32(index)}
        if ref is not None:
            out["ref"] = np.asarray(ref, np.float32)
        for side in ("chosen", "rejected"):
            ex = truncate({"ids": enc[f"{side}_ids"], "mask": enc[f"{side}_mask"]}, self.seq_len, self.stats)
            n = len(ex["ids"])
            out[f"{side}_ids"] = np.pad(ex["ids"], (0, self.seq_len - n))
            out[f"{side}_mask"] = np.pad(ex["mask"], (0, self.seq_len - n))
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


def preference_dataset(pairs: list[StepPair], ct: ChatTokenizer, cfg: PipelineConfig,
                       stats: TruncationStats | None = None, ref_logps: np.ndarray | None = None,
                       with_index: bool = False, drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of B pairs as `[2B, T]` arrays: chosen rows, then rejected rows.

    `ref_logps` `[N, 2]` (chosen, rejected span log-probs under the reference, aligned with
    `pairs`) adds `ref_logps` `[2B]` to each batch; `with_index` adds `pair_index` `[B]`.
    """
    stats = stats if stats is not None else TruncationStats()
    if ref_logps is not None and len(ref_logps) != len(pairs):
        raise ValueError(f"ref_logps has {len(ref_logps)} rows for {len(pairs)} pairs")
    items = [(i, p, None if ref_logps is None else ref_logps[i]) for i, p in enumerate(pairs)]
    ds = _base(items, cfg).map(_TokenizePair(ct, cfg.seq_len, stats)).to_iter_dataset()
    return _global_batches(ds, cfg, drop_remainder).map(_StackPairs(with_index))


def is_trace_record(obj: dict[str, Any]) -> bool:
    """A trace (or chat-format trace) rather than a pair: it has steps or messages and no chosen/rejected."""
    return ("steps" in obj or "messages" in obj) and "chosen" not in obj


def load_preference_data(path: str | Path, rules: RuleBook, span: str = "step", skip_invalid: bool = False,
                         report: SkipReport | None = None, seed: int = 0) -> list[StepPair]:
    """Pairs from a pairs file (any accepted format), or built from a traces file by `make_pairs`."""
    from safer_jax.data.pairs import make_pairs

    first = next(iter(read_records(path, True, SkipReport())), None)
    if first is None:
        raise DataError("no records", path)
    if is_trace_record(first[1]):
        return make_pairs(load_traces(path, rules, skip_invalid=skip_invalid, report=report), rules, seed=seed,
                          span=span)
    return load_pairs(path, skip_invalid=skip_invalid, report=report)
