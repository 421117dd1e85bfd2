"""grain pipelines: packing, exact resume from iterator state, process sharding, pair layout."""

import dataclasses

import numpy as np
import pytest

from safer_jax.data import bundled
from safer_jax.data.pairs import encode_pair, make_pairs, pair_from_record
from safer_jax.data.pipeline import PipelineConfig, load_traces, preference_dataset, read_options, sft_dataset
from safer_jax.data.tokenize import ChatTokenizer, TruncationStats


@pytest.fixture(scope="module")
def traces(rules):
    return load_traces(bundled("train_traces.jsonl"), rules)


@pytest.fixture(scope="module")
def ct(smollm2_tokenizer):
    return ChatTokenizer(smollm2_tokenizer)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_sft_batches_are_packed_and_shifted(traces, ct):
    cfg = PipelineConfig(seq_len=512, batch_size=2, packing_bins=4)
    stats = TruncationStats()
    b = next(iter(sft_dataset(traces[:40], ct, cfg, stats=stats)))
    assert set(b) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    assert all(v.shape == (2, 512) for v in b.values())
    assert b["segment_ids"].max() >= 2  # several traces share a row
    seg, pos = b["segment_ids"][0], b["positions"][0]
    for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        assert (pos[where] == np.arange(len(where))).all()  # positions restart per example
    assert (b["weights"][b["segment_ids"] == 0] == 0).all()
    # targets are the next inputs within a segment
    same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
    assert (b["targets"][0][:-1][same] == b["inputs"][0][1:][same]).all()


@pytest.mark.parametrize("threads", [(2, 0), (0, 16), (8, 3)], ids=["2-then-inline", "inline-then-16", "8-then-3"])
def test_restored_iterator_yields_the_same_batches(traces, ct, threads):
    """Resuming gives the next batches exactly, whatever reads ahead before and after (threads, buffer)."""
    cfg = PipelineConfig(seq_len=256, batch_size=2, packing_bins=4, seed=3, read_threads=threads[0])
    it = iter(sft_dataset(traces[:60], ct, cfg))
    take(it, 3)
    state = it.get_state()
    expect = take(it, 4)
    other = dataclasses.replace(cfg, read_threads=threads[1], read_buffer=threads[1] // 4)
    it2 = iter(sft_dataset(traces[:60], ct, other))
    it2.set_state(state)
    for a, b in zip(expect, take(it2, 4)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_reading_ahead_is_a_few_global_batches_not_grains_remote_file_default():
    """grain's default (16 threads, 500 records) refills 500 records after every set_state."""
    opts = read_options(PipelineConfig(batch_size=8, process_count=4))
    assert (opts.num_threads, opts.prefetch_buffer_size) == (2, 128)  # 4 global batches of 32 records
    assert read_options(PipelineConfig(batch_size=8), per_element=8).prefetch_buffer_size == 4  # whole batches
    assert read_options(PipelineConfig(read_threads=0, read_buffer=7)).prefetch_buffer_size == 7


def test_shuffle_is_deterministic_by_seed_and_processes_are_disjoint(traces, ct):
    def first_ids(seed, index=0, count=1):
        cfg = PipelineConfig(
            seq_len=256, batch_size=1, seed=seed, process_index=index, process_count=count, num_epochs=1
        )
        return [tuple(b["inputs"][0][:64]) for b in sft_dataset(traces[:24], ct, cfg, pack=False)]

    assert first_ids(0) == first_ids(0)
    assert first_ids(0) != first_ids(1)
    a, b = first_ids(0, 0, 2), first_ids(0, 1, 2)
    assert len(a) == len(b) == 12 and not set(a) & set(b)
    assert sorted(a + b) == sorted(first_ids(0))


def test_preference_batches_put_chosen_then_rejected(traces, rules, ct):
    def whole(p):  # rows that need no cut, so each row is the encoding itself
        enc = encode_pair(ct, p)
        return max(len(enc["chosen_ids"]), len(enc["rejected_ids"])) <= 384

    pairs = [p for p in make_pairs(traces[:20], rules, seed=0) if whole(p)]
    cfg = PipelineConfig(seq_len=384, batch_size=3, shuffle=False)
    b = next(iter(preference_dataset(pairs, ct, cfg)))
    assert b["input_ids"].shape == (6, 384)
    for i in range(3):
        enc = encode_pair(ct, pairs[i])
        n = len(enc["chosen_ids"])
        np.testing.assert_array_equal(b["input_ids"][i, :n], enc["chosen_ids"])
        np.testing.assert_array_equal(b["input_ids"][3 + i, : len(enc["rejected_ids"])], enc["rejected_ids"])
        np.testing.assert_array_equal(b["span_mask"][i, :n], enc["chosen_mask"])
    assert (b["span_mask"].sum(1) > 0).all()


def test_looping_pairs_prefer_ending_to_repeating(traces, rules, ct, smollm2_tokenizer):
    """A `looping` pair's rejected response is the chosen one cut after its middle sentence, which then
    repeats, with no end of turn: the two share the text before the loop, and only the chosen ends."""
    from safer_jax.data.pairs import LOOP_REPEATS, looping_response

    assert looping_response("One. Two is here. Three!\n\nFour.") == "One. Two is here. " + "Three!\n\n" * (
        LOOP_REPEATS + 1
    )
    assert looping_response("A line\nB line\nC line") == "A line\n" + "B line\n" * (LOOP_REPEATS + 1)
    assert looping_response("Too short. Two.") is None
    pairs = [p for p in make_pairs(traces, rules, seed=0) if p.kind == "looping"]
    assert pairs and {t.label for t in traces if f"{t.id}-looping" in {p.id for p in pairs}} <= {"benign", "borderline"}
    for p in pairs[:10]:
        assert p.step_index == 4 and p.chosen_final and not p.rejected_final
        cut = looping_response(p.chosen).rstrip()
        assert p.rejected == cut
        enc = encode_pair(ct, p)
        ids, mask = enc["rejected_ids"], enc["rejected_mask"].astype(bool)
        assert smollm2_tokenizer.decode(ids[mask]) == p.rejected  # no <|im_end|>: the loop never ended
        assert smollm2_tokenizer.decode(enc["chosen_ids"][enc["chosen_mask"].astype(bool)]).endswith("<|im_end|>")


def test_flipped_rule_pairs_flip_the_verdict_of_a_rule_the_trace_lists(traces, rules):
    """The hard negative: a borderline trace's rejected step calls its own "not violated" prohibit
    rule violated; a harmful trace's calls its own violated prohibit rule "not violated", or, when
    the trace lists a permit rule it rules out (a framed request), that one applicable; a trace
    listing no such rule (benign) gets none, and `wrong_rule` still cites an unlisted rule."""
    from collections import Counter

    from safer_jax.data.traces import parse

    by_id = {t.id: t for t in traces}
    pairs = make_pairs(traces, rules, seed=0)
    flipped = {p.id.removesuffix("-flipped_rule"): p for p in pairs if p.kind == "flipped_rule"}
    assert set(flipped) == {t.id for t in traces if t.label in ("harmful", "borderline")}
    directions = Counter()
    for tid, p in flipped.items():
        t = by_id[tid]
        own = {r: rules[r] for r in t.rules}
        flips = [
            (r, was, want)
            for r, rule in own.items()
            for was, want in (
                [("violated", "not violated")] if t.label == "harmful" and rule.kind == "prohibit" else []
            )
            + ([("does not apply", "applies")] if t.label == "harmful" and rule.kind == "permit" else [])
            + ([("not violated", "violated")] if t.label == "borderline" and rule.kind == "prohibit" else [])
        ]
        hit = [
            (r, was, want)
            for r, was, want in flips
            if f"{own[r].citation()}: {want}." in p.rejected
            and f"{own[r].citation()}: {was}." in p.chosen
            and f"{own[r].citation()}: {want}." not in p.chosen
        ]
        assert p.step_index == 2 and len(hit) == 1, (tid, p.rejected)
        directions[(t.label, hit[0][2])] += 1
    # both directions on harmful traces, the permit one only where the trace lists a permit rule
    framed = sum(1 for t in traces if t.label == "harmful" and any(rules[r].kind == "permit" for r in t.rules))
    assert 0 < directions[("harmful", "applies")] < framed <= 30
    assert directions[("harmful", "not violated")] > 200 and directions[("borderline", "violated")] > 100
    for p in (p for p in pairs if p.kind == "wrong_rule"):
        cited = parse("".join(p.prefix_steps) + p.rejected)
        assert not set(cited.cited_rules) & set(by_id[p.id.removesuffix("-wrong_rule")].rules), p.id


def test_pair_spans_context_and_eos(traces, rules, ct, smollm2_tokenizer):
    tok = smollm2_tokenizer
    pairs = make_pairs(traces[:30], rules, seed=1)
    kinds = {p.kind for p in pairs}
    assert {"wrong_rule", "wrong_decision", "over_refusal", "verbose", "unsafe_response"} <= kinds
    for p in pairs[:25]:
        enc = encode_pair(ct, p)
        for side, text, final in (("chosen", p.chosen, p.chosen_final), ("rejected", p.rejected, p.rejected_final)):
            ids, mask = enc[f"{side}_ids"], enc[f"{side}_mask"].astype(bool)
            eos = "<|im_end|>" if final else ""
            assert tok.decode(ids[mask]) == text + eos  # the span only; EOS only after a final response
            assert tok.decode(ids[~mask]).endswith("".join(p.prefix_steps))  # context = prompt + prefix
    assert any(p.step_index == 4 and p.chosen_final for p in pairs)
    assert all(not p.chosen_final for p in pairs if p.step_index in (1, 2, 3))
    to_end = make_pairs(traces[:5], rules, span="to_end")
    assert all(p.chosen_final and p.chosen.endswith(t.response) for p in to_end for t in traces[:5] if t.id in p.id)


def test_other_pair_formats():
    trl = pair_from_record({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."})
    assert trl.prefix_steps == () and trl.chosen_final and trl.step_index is None
    conv = pair_from_record(
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    )
    assert (conv.prompt, conv.chosen, conv.rejected) == ("Hi", "Hello!", "No.")
    sd = pair_from_record(
        {"prompt": "2+2?", "initial_reason_steps": "Step 1: add.\n", "chosen": "Step 2: 4.", "rejected": "Step 2: 5."}
    )
    assert sd.prefix_steps == ("Step 1: add.\n",) and not sd.chosen_final


def test_parquet_traces_load_through_datasets(traces, rules, tmp_path):
    import datasets

    rows = [t.to_json() for t in traces[:5]]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    back = load_traces(tmp_path / "t.parquet", rules)
    assert [t.id for t in back] == [t.id for t in traces[:5]]
    assert back[0].steps == traces[0].steps
