"""Tokenize traces and step pairs through the model's tokenizer and chat template.

Most chat templates lack `{% generation %}` markers, so the assistant mask comes from
character offsets: the template renders the prompt alone (with the generation prompt) and
then with the assistant turn; the assistant content must follow the prompt verbatim. The
loss covers the assistant content and the template's end-of-turn token (the first token
after the content). Step ids come from the step segments' character spans; a token that
straddles a boundary belongs to the step of its first character.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from safer_jax.data.records import DataError
from safer_jax.data.traces import Trace, TraceFormat, segments


@dataclasses.dataclass
class TruncationStats:
    examples: int = 0
    truncated: int = 0
    tokens_dropped: int = 0

    def summary(self) -> str:
        return f"{self.truncated}/{self.examples} examples truncated ({self.tokens_dropped} tokens dropped)"


class ChatTokenizer:
    """Wraps a HF tokenizer: prompt rendering, assistant masks, step ids."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None, name: str | None = None):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.name = name or getattr(tokenizer, "name_or_path", "tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"tokenizer {self.name!r} has no chat template; set one "
                            "(tokenizer.chat_template = ...) or use a chat model's tokenizer", self.name)
        self.eos_id = tokenizer.eos_token_id

    def _messages(self, prompt: str, answer: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": prompt})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def prompt_text(self, prompt: str) -> str:
        return self.tok.apply_chat_template(self._messages(prompt), add_generation_prompt=True, tokenize=False)

    def encode_turn(self, prompt: str, assistant: str, where: str = "") -> tuple[list[int], list[tuple[int, int]], int, int]:
        """(ids, char offsets, assistant start char, end-of-turn start char) of the full chat."""
        p = self.prompt_text(prompt)
        full = self.tok.apply_chat_template(self._messages(prompt, assistant), tokenize=False)
        if not full.startswith(p) or full[len(p):len(p) + len(assistant)] != assistant:
            raise DataError(f"chat template of {self.name!r} does not render the assistant text verbatim after "
                            "the generation prompt; cannot build an assistant mask", where or None)
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"], len(p), len(p) + len(assistant)

    def encode_trace(self, trace: Trace, fmt: TraceFormat = TraceFormat(), where: str = ""
                     ) -> dict[str, np.ndarray]:
        """input_ids, loss_mask (assistant + end-of-turn), step_ids (1..4 on assistant tokens, else 0)."""
        segs = segments(trace, fmt)
        text = "".join(segs)
        ids, offsets, a0, a1 = self.encode_turn(trace.prompt, text, where)
        bounds = np.cumsum([a0] + [len(s) for s in segs])  # char where each step starts, then end
        mask = np.zeros(len(ids), np.int32)
        steps = np.zeros(len(ids), np.int32)
        eot_done = False
        for i, (s, e) in enumerate(offsets):
            if e <= s:  # zero-width tokens (none in practice): owned by the previous token's step
                continue
            if a0 <= s < a1:
                mask[i] = 1
                steps[i] = int(np.searchsorted(bounds, s, side="right"))
            elif s >= a1 and not eot_done:
                mask[i] = 1  # end-of-turn token: part of the final response
                steps[i] = 4
                eot_done = True
        if not eot_done:
            raise DataError(f"chat template of {self.name!r} emits no end-of-turn token after the answer", where or None)
        return {"input_ids": np.asarray(ids, np.int32), "loss_mask": mask, "step_ids": steps}


def truncate(example: dict[str, np.ndarray], max_len: int, stats: TruncationStats | None = None
             ) -> dict[str, np.ndarray]:
    """Cut an example to `max_len` tokens (from the end), counting what was dropped."""
    n = len(next(iter(example.values())))
    if stats is not None:
        stats.examples += 1
        if n > max_len:
            stats.truncated += 1
            stats.tokens_dropped += n - max_len
    return {k: v[:max_len] for k, v in example.items()}
