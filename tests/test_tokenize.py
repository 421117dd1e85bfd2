"""Chat tokenization: assistant-only mask with the end-of-turn token, step ids, truncation."""

import numpy as np
import pytest
from test_traces import make_trace

from safer_jax.data.records import DataError
from safer_jax.data.tokenize import ChatTokenizer, TruncationStats, truncate
from safer_jax.data.traces import render, segments


def test_masked_tokens_decode_to_assistant_text_plus_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ct = ChatTokenizer(tok)
    assert ct.eot_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    for t in (make_trace(), make_trace(response="Paris is the capital of France.", label="benign", decision="comply")):
        ex = ct.encode_trace(t)
        ids, mask = ex["input_ids"], ex["loss_mask"].astype(bool)
        assert tok.decode(ids[mask]) == render(t) + "<|im_end|>"
        # no prompt token is in the mask: everything before the first masked token is the prompt
        first = int(np.argmax(mask))
        assert tok.decode(ids[:first]) == ct.render(ct.messages(t.prompt))
        assert mask[first:].all()
        # the assistant ids are the steps, each tokenized on its own
        assert ids[mask][:-1].tolist() == [
            i for seg in segments(t) for i in tok(seg, add_special_tokens=False)["input_ids"]
        ]


def test_truncation_counts():
    stats = TruncationStats()
    ex = {"input_ids": np.arange(10), "loss_mask": np.ones(10)}
    assert len(truncate(ex, 6, stats)["input_ids"]) == 6
    truncate({"input_ids": np.arange(4), "loss_mask": np.ones(4)}, 6, stats)
    assert (stats.examples, stats.truncated, stats.tokens_dropped) == (2, 1, 4)
    assert stats.summary() == "1/2 examples truncated (4 tokens dropped)"


def test_tokenizer_without_chat_template_is_refused(smollm2_tokenizer):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        ChatTokenizer(tok, name="plain-tokenizer")
