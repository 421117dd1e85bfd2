"""The local teacher: a safer_jax model writing Ex-Ante traces greedily (self-distillation).

It runs a model, so it sits next to generation rather than in `data/` (data imports no
models, no JAX): `data/synthesis.py` holds the teacher prompt, the parsing and the driver,
and any object with `name` and `__call__(PromptRecord) -> Trace` can be its teacher.
`safer-jax synthesize --teacher local --model FOLDER` uses this one.
"""

from __future__ import annotations

import threading

from safer_jax.data.rules import RuleBook
from safer_jax.data.synthesis import PromptRecord, teacher_messages, trace_from_text
from safer_jax.data.traces import Trace, TraceFormat


class LocalTeacher:
    """A safer_jax model writing traces greedily; one generation at a time (a lock), so the
    synthesis driver's worker threads can share it."""

    name = "local"

    def __init__(
        self,
        rules: RuleBook,
        model_path: str,
        gguf_file: str | None = None,
        max_new_tokens: int = 512,
        fmt: TraceFormat = TraceFormat(),
    ):
        from transformers import AutoTokenizer

        from safer_jax.models import from_pretrained

        self.rules, self.fmt, self.max_new_tokens = rules, fmt, max_new_tokens
        self.model = from_pretrained(model_path, gguf_file=gguf_file)
        self.tok = AutoTokenizer.from_pretrained(model_path, gguf_file=gguf_file)
        self.lock = threading.Lock()

    def __call__(self, rec: PromptRecord) -> Trace:
        from safer_jax.generate import greedy_generate

        ids = self.tok.apply_chat_template(
            teacher_messages(rec, self.rules, self.fmt), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        with self.lock:
            out = greedy_generate(self.model, ids, self.max_new_tokens, eos_ids=(self.tok.eos_token_id,))
        return trace_from_text(rec, self.tok.decode(out, skip_special_tokens=True), self.fmt)
