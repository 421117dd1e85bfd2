"""Chat tokenization: assistant-only mask with the end-of-turn token, step ids, truncation."""

import numpy as np
import pytest

from safer_jax.data.records import DataError
from safer_jax.data.tokenize import ChatTokenizer, TruncationStats, truncate
from safer_jax.data.traces import render, segments
from test_traces import make_trace


def test_masked_tokens_decode_to_assistant_text_plus_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ct = ChatTokenizer(tok)
    for t in (make_trace(), make_trace(response="Paris is the capital of France.", label="benign", decision="comply")):
        ex = ct.encode_trace(t)
        ids, mask, steps = ex["input_ids"], ex["loss_mask"].astype(bool), ex["step_ids"]
        assert tok.decode(ids[mask]) == render(t) + "<|im_end|>"
        # no prompt token is in the mask: everything before the first masked token is the prompt
        first = int(np.argmax(mask))
        assert tok.decode(ids[:first]) == ct.prompt_text(t.prompt)
        assert mask[first:].all() or not mask[first + mask[first:].sum():].any()
        # step ids partition the assistant tokens, in order 1..4, and each decodes to its segment
        s = steps[mask]
        assert s.min() == 1 and s.max() == 4 and (np.diff(s) >= 0).all() and (steps[~mask] == 0).all()
        for k, seg in enumerate(segments(t), 1):
            expect = seg + ("<|im_end|>" if k == 4 else "")
            assert tok.decode(ids[steps == k]) == expect


def test_straddling_token_belongs_to_the_step_of_its_first_character(smollm2_tokenizer):
    t = make_trace()
    segs = segments(t)

    class Straddle(ChatTokenizer):
        def encode_turn(self, prompt, assistant, where=""):
            b = len(segs[0])  # boundary between step 1 and step 2
            # tokens: [0, b-2), [b-2, b+3) straddles the boundary, [b+3, len), then end-of-turn
            n = len(assistant)
            return [5, 6, 7, 8], [(0, b - 2), (b - 2, b + 3), (b + 3, n), (n, n + 10)], 0, n

    ex = Straddle(smollm2_tokenizer).encode_trace(t)
    assert ex["step_ids"].tolist() == [1, 1, 2, 4]
    assert ex["loss_mask"].tolist() == [1, 1, 1, 1]


def test_truncation_counts():
    stats = TruncationStats()
    ex = {"input_ids": np.arange(10), "loss_mask": np.ones(10)}
    assert len(truncate(ex, 6, stats)["input_ids"]) == 6
    truncate({"input_ids": np.arange(4), "loss_mask": np.ones(4)}, 6, stats)
    assert (stats.examples, stats.truncated, stats.tokens_dropped) == (2, 1, 4)
    assert "1/2 examples truncated (4 tokens dropped)" == stats.summary()


def test_tokenizer_without_chat_template_is_refused(smollm2_tokenizer):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        ChatTokenizer(tok, name="plain-tokenizer")
