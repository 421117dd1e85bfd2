"""KV-cache generation: parity with transformers and with the full forward, one compilation
for many decode steps, sampling filters equal to transformers' warpers, sharding, the CLI."""

import json

import jax
import numpy as np
import pytest
import torch
from tiny_models import make_tiny

from safer_jax import generate as G
from safer_jax.config import MeshConfig
from safer_jax.data.traces import split_think
from safer_jax.generate import SamplingConfig, generate_chat, generate_ids, sample_batch
from safer_jax.models import from_pretrained
from safer_jax.models.kv_cache import cache_sharding
from safer_jax.sharding import make_mesh

N_NEW = 32
LENGTHS = (5, 9, 13, 3)  # four prompts of different lengths in one (left-padded) batch


def random_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(3, vocab, size=n).tolist() for n in LENGTHS]


def transformers_greedy(tm, prompt: list[int], n_new: int):
    """(new ids, raw logits [n, V]) of transformers' greedy generate on one unpadded prompt."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        r = tm.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return r.sequences[0, len(prompt) :].tolist(), torch.stack(r.logits, 1)[0].float().numpy()


def top2_gap(logits: np.ndarray) -> np.ndarray:
    top = np.sort(logits, axis=-1)[..., -2:]
    return top[..., 1] - top[..., 0]


def full_forward_logits(model, prompts: list[list[int]], new: list[list[int]]) -> list[np.ndarray]:
    """Per row, the logits predicting each new token from one uncached forward of the
    unpadded sequences (right-padded into one batch, padding masked by segment ids)."""
    seqs = [p + n for p, n in zip(prompts, new)]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int32)
    seg = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], seg[i, : len(s)] = s, 1
    logits = np.asarray(model(ids, segment_ids=seg))
    return [logits[i, len(p) - 1 : len(p) - 1 + len(n)] for i, (p, n) in enumerate(zip(prompts, new))]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(transformers model, our model) of a random llama3 (rope scaling) with a 512 vocabulary."""
    d = tmp_path_factory.mktemp("tiny_llama3")
    tm = make_tiny("llama3", d, vocab_size=512)
    return tm, from_pretrained(d)


def test_greedy_matches_transformers_tiny(tiny_llama):
    tm, model = tiny_llama
    prompts = random_prompts(512)
    ours = generate_ids(model, prompts, SamplingConfig(max_new_tokens=N_NEW))
    for prompt, (ids, reason) in zip(prompts, ours):
        ref, ref_logits = transformers_greedy(tm, prompt, N_NEW)
        # no step is a near-tie (which could pass or fail by luck), and the rows are not stuck
        assert top2_gap(ref_logits).min() >= 1e-3
        assert len(set(ref)) >= 3
        assert ids == ref
        assert len(ids) == N_NEW and reason == "length"


@pytest.mark.parametrize(
    "kind,scan", [("llama3", True), ("llama3", False), ("mistral", True), ("qwen2", True), ("qwen3", True)]
)
def test_cached_logits_match_full_forward(kind, scan, tmp_path):
    """Every decode step's logits equal an uncached forward (mistral: window 8 < 45 tokens)."""
    make_tiny(kind, tmp_path)
    model = from_pretrained(tmp_path, scan_layers=scan)
    prompts = random_prompts(model.config.vocab_size, seed=1)
    out = sample_batch(model, prompts, SamplingConfig(max_new_tokens=N_NEW), record_logits=True)
    assert [len(t) for t in out.tokens] == [N_NEW] * 4
    full = full_forward_logits(model, prompts, out.tokens)
    err = max(np.abs(out.logits[i] - full[i]).max() for i in range(len(prompts)))
    print(f"{kind} scan={scan}: cached vs full forward max |logit diff| = {err:.2e}")
    assert err < 1e-4


def test_decode_compiles_once(tmp_path, monkeypatch):
    """32 new tokens as 31 separate decode calls (stop-string checks after every step), then
    another batch of the same bucket: prefill and decode each compile exactly once."""
    make_tiny("qwen2", tmp_path, num_hidden_layers=2)  # a config no other test compiles
    model = from_pretrained(tmp_path)
    calls = []
    decode_jit = G._decode_jit

    def counting(*a, **kw):
        calls.append(1)
        return decode_jit(*a, **kw)

    monkeypatch.setattr(G, "_decode_jit", counting)
    before, cache_before = dict(G.TRACE_COUNTS), decode_jit._cache_size()
    sampling = SamplingConfig(max_new_tokens=N_NEW, stop_strings=("never appears",))
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    for seed in (0, 1):
        out = sample_batch(model, random_prompts(160, seed), sampling, decode=decode, check_every=1)
        assert [len(t) for t in out.tokens] == [N_NEW] * 4
    assert len(calls) == 2 * (N_NEW - 1)
    traced = {k: G.TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode")}
    print(
        f"{len(calls)} decode calls, traces: {traced}, decode cache entries +{decode_jit._cache_size() - cache_before}"
    )
    assert traced == {"prefill": 1, "decode": 1}
    assert decode_jit._cache_size() - cache_before == 1


@pytest.mark.parametrize("k", [1, 2, 7, 50, 999, 1000, 5000])
def test_top_k_equals_transformers(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = np.random.RandomState(k).randn(6, 1000).astype(np.float32) * 3
    ref = TopKLogitsWarper(k)(None, torch.tensor(logits)).numpy()
    ours = np.asarray(G.top_k_filter(jax.numpy.asarray(logits), k))
    assert (np.isneginf(ours) == np.isneginf(ref)).all()
    kept = ~np.isneginf(ref)
    np.testing.assert_array_equal(ours[kept], ref[kept])
    assert (kept.sum(-1) == min(k, 1000)).all()


@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.8, 0.95, 0.999, 1.0])
def test_top_p_equals_transformers(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = np.random.RandomState(int(p * 1000)).randn(6, 1000).astype(np.float32) * 2
    ref = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
    ours = np.asarray(G.top_p_filter(jax.numpy.asarray(logits), p))
    assert (np.isneginf(ours) == np.isneginf(ref)).all(), (np.isneginf(ours).sum(-1), np.isneginf(ref).sum(-1))
    kept = ~np.isneginf(ref)
    np.testing.assert_array_equal(ours[kept], ref[kept])


def test_top_p_equals_transformers_at_a_real_vocabulary_size():
    """The bisection threshold (no sort) keeps exactly transformers' nucleus at V = 49152 (SmolLM2),
    from peaked to flat distributions, including a row whose mass sits in one token."""
    from transformers.generation.logits_process import TopPLogitsWarper

    rs = np.random.RandomState(5)
    logits = (rs.randn(6, 49152) * np.array([0.5, 1, 2, 4, 8, 1])[:, None]).astype(np.float32)
    logits[5, 123] = 60.0  # nearly all the mass on one token: only it survives
    for p in (0.05, 0.5, 0.9, 0.95, 0.999):
        ref = np.isneginf(TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy())
        ours = np.isneginf(np.asarray(G.top_p_filter(jax.numpy.asarray(logits), p)))
        np.testing.assert_array_equal(ours, ref, err_msg=f"p={p}")
        assert (~ours).sum(-1).min() >= 1
    assert (~ours[5]).sum() == 1


def test_temperature_top_k_top_p_chain_equals_transformers():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.RandomState(3).randn(8, 500).astype(np.float32) * 1.5
    chain = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9)])
    ref = chain(None, torch.tensor(logits)).numpy()
    ours = np.asarray(G.process_logits(jax.numpy.asarray(logits), G.Sampler(False, 0.7, 40, 0.9)))
    assert (np.isneginf(ours) == np.isneginf(ref)).all()
    kept = ~np.isneginf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)
    assert kept.sum(-1).min() > 1 and kept.sum(-1).max() < 40  # both filters cut


def test_sampling_seeded_and_filtered(tiny_llama):
    _, model = tiny_llama
    prompts = random_prompts(512)
    sampled = SamplingConfig(max_new_tokens=12, greedy=False, temperature=1.5, top_k=20, top_p=0.95, seed=7)
    a = generate_ids(model, prompts, sampled)
    assert a == generate_ids(model, prompts, sampled)  # same seed, same tokens
    assert a != generate_ids(model, prompts, SamplingConfig(**{**sampled.__dict__, "seed": 8}))
    # top_k=1 sampling is greedy whatever the temperature
    one = SamplingConfig(max_new_tokens=12, greedy=False, temperature=3.0, top_k=1, seed=1)
    assert generate_ids(model, prompts, one) == generate_ids(model, prompts, SamplingConfig(max_new_tokens=12))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_sharded_generation_equals_unsharded(tiny_llama):
    _, model = tiny_llama
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    prompts = random_prompts(512)
    sampling = SamplingConfig(max_new_tokens=N_NEW)
    assert generate_ids(model, prompts, sampling, mesh=mesh) == generate_ids(model, prompts, sampling)
    sh = cache_sharding(model.config, mesh, batch=4, length=64)  # 2 kv heads: sharded on tensor
    assert sh.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None)  # a layer's [B, K, S, H]


def test_compaction_keeps_greedy_answers(tiny_llama, monkeypatch):
    """Finished rows leave the batch (32 -> 16 -> 8 rows) and every row's greedy tokens and finish
    reason are those of the uncompacted batch, with EOS ids, and with a stop string that a row moved
    by the first compaction meets only after it."""
    _, model = tiny_llama
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, 512, size=int(n)).tolist() for n in rng.randint(3, 15, size=24)]
    n_new = 40
    free = sample_batch(model, prompts, SamplingConfig(max_new_tokens=n_new), compact=False).tokens
    eos = sorted({free[i][(7 * i) % n_new] for i in range(0, 24, 3)})  # rows end at scattered steps
    decode = lambda ids: " ".join(f"<{i}>" for i in ids)  # noqa: E731
    plain = SamplingConfig(max_new_tokens=n_new)
    base = sample_batch(model, prompts, plain, eos_ids=eos, compact=False, check_every=4)
    long = [i for i, r in enumerate(base.finish_reasons) if r == "length"][-1]  # a row that runs to the limit
    stop = f"<{base.tokens[long][28]}> <{base.tokens[long][29]}>"
    for sampling in (plain, SamplingConfig(max_new_tokens=n_new, stop_strings=(stop,))):
        ref = sample_batch(model, prompts, sampling, eos_ids=eos, decode=decode, compact=False, check_every=4)
        seen: list[tuple[int, int]] = []  # (rows after, decode step) of each compaction

        def spy(ds, rows, seen=seen, real=G._take_rows_jit):
            seen.append((int(rows.shape[0]), int(ds.step)))
            return real(ds, rows)

        monkeypatch.setattr(G, "_take_rows_jit", spy)
        out = sample_batch(model, prompts, sampling, eos_ids=eos, decode=decode, check_every=4)
        monkeypatch.undo()
        lengths = sorted(len(t) for t in ref.tokens)
        print(f"stop strings {sampling.stop_strings}: answer lengths {lengths}, compactions (rows, step) {seen}")
        assert [n for n, _ in seen] == [16, 8]
        assert out.tokens == ref.tokens and out.finish_reasons == ref.finish_reasons
        assert "stop" in out.finish_reasons and "length" in out.finish_reasons
        if sampling.stop_strings:
            assert out.finish_reasons[long] == "stop_string" and seen[0][1] < len(out.tokens[long])


def test_segments_are_the_simulated_schedule_and_a_segment_hook_stops_decoding(tiny_llama):
    """`on_segment` sees the prefill and each decode call with its batch rows; the demo's simulation
    of compaction (`demo_budget.compacted_schedule`) gives those same calls from the answer lengths
    alone. A true return stops decoding there: finished rows keep their answers, unfinished ones end
    at that step with reason "length", and `cut_at` says where."""
    from safer_jax.demo_budget import compacted_schedule

    _, model = tiny_llama
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, 512, size=int(n)).tolist() for n in rng.randint(3, 15, size=24)]
    n_new = 40
    free = sample_batch(model, prompts, SamplingConfig(max_new_tokens=n_new), compact=False).tokens
    eos = sorted({free[i][(7 * i) % n_new] for i in range(0, 24, 3)})
    sampling = SamplingConfig(max_new_tokens=n_new)
    calls: list[dict] = []
    out = sample_batch(model, prompts, sampling, eos_ids=eos, check_every=4, on_segment=lambda i: calls.append(i))
    assert calls[0] == {"phase": "prefill", "rows": 32, "steps": 0} and out.cut_at is None
    decoded = [(c["rows"], c["steps"]) for c in calls[1:]]
    assert all(c["phase"] == "decode" for c in calls[1:]) and {r for r, _ in decoded} == {32, 16, 8}
    assert decoded == compacted_schedule([len(t) for t in out.tokens], n_new, check_every=4)
    assert compacted_schedule([n_new] * 24, n_new, check_every=4) == [(32, 4)] * 9 + [(32, 3)]
    assert compacted_schedule([1] * 5, n_new) == []  # every row ended with its first token

    seen: list[dict] = []
    cut = sample_batch(
        model, prompts, sampling, eos_ids=eos, check_every=4, on_segment=lambda i: seen.append(i) or len(seen) == 4
    )
    assert len(seen) == 4 and cut.cut_at == 1 + sum(c["steps"] for c in seen)
    for full, full_reason, part, reason in zip(out.tokens, out.finish_reasons, cut.tokens, cut.finish_reasons):
        if len(full) <= cut.cut_at:  # ended before the hook stopped decoding
            assert (part, reason) == (full, full_reason)
        else:
            assert reason == "length" and part == full[: cut.cut_at]
    assert "stop" in cut.finish_reasons and "length" in cut.finish_reasons


def test_eos_and_stop_strings(tiny_llama):
    _, model = tiny_llama
    prompts = random_prompts(512)
    free = generate_ids(model, prompts, SamplingConfig(max_new_tokens=16))
    eos = free[0][0][5]  # pretend the 6th token of row 0 is an EOS id
    out = generate_ids(model, prompts, SamplingConfig(max_new_tokens=16), eos_ids=[eos])
    assert out[0] == (free[0][0][: free[0][0].index(eos) + 1], "stop")
    decode = lambda ids: " ".join(f"<{i}>" for i in ids)  # noqa: E731
    stop = f"<{free[1][0][3]}> <{free[1][0][4]}>"  # rows 1 stops after its 5th token
    out = generate_ids(model, prompts, SamplingConfig(max_new_tokens=16, stop_strings=(stop,)), decode=decode)
    first = decode(free[1][0]).find(stop)
    assert out[1][1] == "stop_string" and stop in decode(out[1][0])
    assert decode(out[1][0]).find(stop) == first and out[1][0] == free[1][0][: len(out[1][0])]
    with pytest.raises(ValueError, match="decode"):
        generate_ids(model, prompts, SamplingConfig(stop_strings=("x",)))


def test_split_think():
    assert split_think("<think>\nA\n</think>\n answer ") == ("A", "answer")
    assert split_think("<think> still thinking") == ("still thinking", None)
    assert split_think("  plain answer\n") == (None, "plain answer")


@pytest.fixture(scope="module")
def chat_model_dir(tiny, tmp_path_factory):
    """A random llama3 (std 0.2: clear argmax gaps) with the tiny ChatML tokenizer."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat_llama")
    tok = AutoTokenizer.from_pretrained(tiny[0])
    make_tiny(
        "llama3",
        d,
        vocab_size=len(tok),
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    tok.save_pretrained(d)
    return d


CHAT_ROWS = [
    {"id": "a", "prompt": "How do I bake bread at home?"},
    {"id": "b", "messages": [{"role": "user", "content": "Hi"}]},
    {"id": "c", "prompt": "Explain why the sky is blue in two sentences, please, with care."},
    {"id": "d", "prompt": "What is 2 + 2?"},
    {"id": "e", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me"}]},
]


def test_generate_chat_batches_return_input_order(chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    model = from_pretrained(chat_model_dir)
    sampling = SamplingConfig(max_new_tokens=10)
    rows = generate_chat(model, tok, CHAT_ROWS, sampling, batch_size=2, progress=False)
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"]
    for src, r in zip(CHAT_ROWS, rows):
        assert set(r) == {"id", "text", "reasoning", "response", "prompt_tokens", "completion_tokens", "finish_reason"}
        alone = generate_chat(model, tok, [src], sampling, progress=False)[0]  # batching changes nothing
        assert alone == r
        assert r["reasoning"] is None and r["response"] == r["text"].strip()
    # a stop string met in the first batch ends that row only: every later batch still runs
    first = min(rows, key=lambda r: r["prompt_tokens"])
    stop = SamplingConfig(max_new_tokens=10, stop_strings=(first["text"][:3],))
    stopped = generate_chat(model, tok, CHAT_ROWS, stop, batch_size=2, progress=False)
    assert stopped[[r["id"] for r in rows].index(first["id"])]["finish_reason"] == "stop_string"
    assert all(r["completion_tokens"] > 0 and "cut" not in r for r in stopped)


def test_cli_generate_writes_rows_in_input_order(chat_model_dir, tmp_path, capsys):
    from safer_jax import cli

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({**r, "label": "benign"}) + "\n" for r in CHAT_ROWS) + "\n")
    out = tmp_path / "out" / "gen.jsonl"
    args = [
        "generate",
        "--model",
        str(chat_model_dir),
        "--prompts",
        str(src),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"]
    for r in rows:
        assert {"text", "reasoning", "response", "prompt_tokens", "completion_tokens", "finish_reason", "label"} <= set(
            r
        )
        assert r["finish_reason"] in G.FINISH_REASONS and 0 < r["completion_tokens"] <= 8
    # sampling flags parse and run
    assert (
        cli.main(
            args[:-2]
            + [
                "--temperature",
                "0.8",
                "--top-k",
                "5",
                "--top-p",
                "0.9",
                "--seed",
                "3",
                "--out",
                str(tmp_path / "s.jsonl"),
            ]
        )
        == 0
    )
    # bad input names the file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": \n')
    assert cli.main(["generate", "--model", str(chat_model_dir), "--prompts", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    bad.write_text('{"id": 1, "prompt": "ok"}\n\n{"id": 2, "question": "?"}\n')
    assert cli.main(["generate", "--model", str(chat_model_dir), "--prompts", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3:" in err and "prompt" in err and "messages" in err


def test_cli_chat_uses_the_new_generator(chat_model_dir, capsys):
    from safer_jax import cli

    assert cli.main(["chat", "--model", str(chat_model_dir), "--prompt", "Hi", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith(">>> Hi\n")


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_greedy_and_logits_match(smollm2_torch, smollm2_dir):
    tm, tok, _, _ = smollm2_torch
    model = from_pretrained(smollm2_dir)
    questions = [
        "What is the capital of France?",
        "Hi",
        "Write a haiku about the sea and the wind at night.",
        "How do plants turn sunlight into sugar? Explain it simply for a ten year old child.",
    ]
    prompts = [G.chat_prompt_ids(tok, {"prompt": q}) for q in questions]
    assert len({len(p) for p in prompts}) == 4
    out = sample_batch(
        model,
        prompts,
        SamplingConfig(max_new_tokens=N_NEW),
        eos_ids=G.model_eos_ids(model.config) + (tok.eos_token_id,),
        pad_id=tok.pad_token_id or 0,
        record_logits=True,
    )
    for i, prompt in enumerate(prompts):
        ref, ref_logits = transformers_greedy(tm, prompt, N_NEW)  # stops at the same EOS ids
        assert top2_gap(ref_logits).min() >= 1e-3
        assert len(set(ref)) >= 3
        assert out.tokens[i] == ref, (tok.decode(out.tokens[i]), tok.decode(ref))
    full = full_forward_logits(model, prompts, out.tokens)
    err = max(np.abs(out.logits[i, : len(t)] - full[i]).max() for i, t in enumerate(out.tokens))
    print(f"SmolLM2 cached vs full forward max |logit diff| = {err:.2e}")
    assert err < 1e-3
