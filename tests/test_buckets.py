"""Preference batches bucketed by length: less padding, the same pairs, the same row layout."""

import numpy as np

from safer_jax.data.pairs import make_pairs
from safer_jax.data.pipeline import (
    PipelineConfig,
    bucket_lengths,
    drop_unfit_pairs,
    padding_fraction,
    plan_buckets,
    preference_dataset,
)


def test_bucket_lengths():
    assert bucket_lengths(512, 4) == (128, 256, 384, 512)
    assert bucket_lengths(320, 3) == (128, 256, 320)
    assert bucket_lengths(100, 1) == (100,)


def test_plan_fits_and_uses_each_pair_once():
    lengths = np.random.default_rng(0).integers(10, 500, 103)
    plan = plan_buckets(lengths, (128, 256, 512), batch=8, seed=0)
    seen = np.concatenate([idx for _, idx in plan])
    assert len(seen) == len(set(seen.tolist())) == 96  # 103 pairs, 12 full batches, 7 left over
    for length, idx in plan:
        assert len(idx) == 8 and lengths[idx].max() <= length


def _batches(pairs, ct, buckets, process_index=0, process_count=1, n=6):
    cfg = PipelineConfig(
        seq_len=320,
        batch_size=4 // process_count,
        seed=0,
        length_buckets=buckets,
        process_index=process_index,
        process_count=process_count,
    )
    it = iter(preference_dataset(pairs, ct, cfg, with_index=True))
    return [next(it) for _ in range(n)]


def test_bucketed_batches_trim_padding(tiny, traces, rules):
    _, ct = tiny
    pairs = drop_unfit_pairs(make_pairs(traces[:24], rules, seed=0), ct, 320, log=lambda _: None)
    fixed, bucketed = _batches(pairs, ct, 0), _batches(pairs, ct, 4)
    assert all(b["input_ids"].shape == (8, 320) for b in fixed)
    assert {b["input_ids"].shape[1] for b in bucketed} <= set(bucket_lengths(320, 4))
    pad_fixed = np.mean([padding_fraction(b) for b in fixed])
    pad_bucketed = np.mean([padding_fraction(b) for b in bucketed])
    assert pad_bucketed < pad_fixed
    # the same rows as unbucketed, only shorter: chosen block then rejected block, in pair order
    ref = {}
    for b in fixed:
        for j, i in enumerate(b["pair_index"]):
            ref[int(i)] = (b["input_ids"][j], b["input_ids"][4 + j], b["span_mask"][j], b["span_mask"][4 + j])
    for b in bucketed:
        length = b["input_ids"].shape[1]
        for j, i in enumerate(b["pair_index"]):
            if int(i) in ref:
                c, r, cm, rm = ref[int(i)]
                assert np.array_equal(b["input_ids"][j], c[:length]) and not c[length:].any()
                assert np.array_equal(b["input_ids"][4 + j], r[:length]) and not r[length:].any()
                assert np.array_equal(b["span_mask"][j], cm[:length])
                assert np.array_equal(b["span_mask"][4 + j], rm[:length])


def test_processes_agree_on_row_length(tiny, traces, rules):
    _, ct = tiny
    pairs = drop_unfit_pairs(make_pairs(traces[:24], rules, seed=0), ct, 320, log=lambda _: None)
    a, b = _batches(pairs, ct, 4, 0, 2), _batches(pairs, ct, 4, 1, 2)
    for x, y in zip(a, b):
        assert x["input_ids"].shape == y["input_ids"].shape
        assert not set(x["pair_index"].tolist()) & set(y["pair_index"].tolist())
