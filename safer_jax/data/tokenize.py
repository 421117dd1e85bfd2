"""The one definition of how a chat turn becomes token ids, shared by SFT, step pairs,
reference log-probs, generation (also from an assistant prefix) and evaluation.

Chat templates differ in how they re-render assistant content (Llama 3 trims it, Mistral
puts a space before it, Qwen3 splits `<think>` out and re-renders it with its own
newlines), so the assistant text is never recovered from a rendered turn. Instead:

- context = the template's rendering of system + earlier turns + user + generation prompt
  (with `data.chat_template_kwargs`), tokenized without added special tokens: the template
  writes BOS where the family wants one;
- assistant ids = each assistant segment (a trace's steps, a pair's prefix steps, its span)
  tokenized on its own, concatenated: exactly the ids a model trained here writes after the
  context, and the ids `generate` reads back;
- the family's end-of-turn token(s) (the special tokens the template writes right after
  assistant content, found once by rendering a probe conversation) follow a final span only.

So the ids trained on are always `context_ids(messages) + assistant_ids(segments) [+ eot]`,
and `prompt_ids(messages, prefix)` (the generation path) is a prefix of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from safer_jax.config import TraceFormat
from safer_jax.data.records import DataError
from safer_jax.data.traces import Trace, segments

# special tokens that end a turn in the supported families (Llama 3, Qwen / ChatML, Mistral)
FAMILY_STOP_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>")
_PROBE_USER = "Hello there."
_PROBE_ANSWER = "Probe answer 7."


def load_tokenizer(path: str, gguf_file: str | None = None) -> Any:
    """The one tokenizer loader: a folder, or a hub id resolved once to its local snapshot
    (the offline HF cache works), optionally a GGUF file inside it."""
    from transformers import AutoTokenizer

    from safer_jax.hub import resolve_path

    return AutoTokenizer.from_pretrained(str(resolve_path(path, gguf_file)), gguf_file=gguf_file)


@dataclasses.dataclass
class TruncationStats:
    examples: int = 0
    truncated: int = 0
    tokens_dropped: int = 0

    def summary(self) -> str:
        return f"{self.truncated}/{self.examples} examples truncated ({self.tokens_dropped} tokens dropped)"


def special_tokens(tok: Any) -> dict[str, int]:
    """Every special token of a HF tokenizer (named ones and added tokens marked special), text -> id."""
    out = {t: i for t, i in zip(tok.all_special_tokens, tok.all_special_ids)}
    for i, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            out[str(added)] = int(i)
    return out


class ChatTokenizer:
    """A HF tokenizer with its chat template, template arguments and system prompt: contexts,
    assistant ids, end-of-turn ids, SFT masks, pair spans, and prompts for generation."""

    def __init__(
        self,
        tokenizer: Any,
        system_prompt: str | None = None,
        name: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
        fmt: TraceFormat = TraceFormat(),
    ):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.template_kwargs = dict(template_kwargs or {})
        self.fmt = fmt
        self.name = name or getattr(tokenizer, "name_or_path", "tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"tokenizer {self.name!r} has no chat template; set one "
                "(tokenizer.chat_template = ...) or use a chat model's tokenizer",
                self.name,
            )
        self.eos_id = tokenizer.eos_token_id
        self.special = special_tokens(tokenizer)
        self.eot_ids = self._end_of_turn()
        check_trace_format(fmt, self.special, self.name)

    @classmethod
    def from_config(cls, tokenizer: Any, data: Any) -> ChatTokenizer:
        """From a run's `data` section: system prompt, `chat_template_kwargs`, `trace_format`."""
        return cls(
            tokenizer,
            system_prompt=data.system_prompt,
            template_kwargs=data.chat_template_kwargs,
            fmt=data.trace_format,
        )

    # ------------------------------------------------------------------ the definition

    def messages(
        self, prompt: str | None = None, messages: Sequence[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """The conversation before the assistant reply: `messages` (system, earlier turns, last
        user turn) or one user `prompt`; the configured system prompt first unless one is there."""
        msgs = [dict(m) for m in messages] if messages else [{"role": "user", "content": prompt or ""}]
        if self.system_prompt is not None and msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def render(self, msgs: Sequence[dict[str, Any]], generation_prompt: bool = True) -> str:
        try:
            return self.tok.apply_chat_template(
                list(msgs), add_generation_prompt=generation_prompt, tokenize=False, **self.template_kwargs
            )
        except Exception as e:  # jinja errors: a bad template, or roles the template rejects
            raise DataError(
                f"chat template of {self.name!r} failed to render {[m.get('role') for m in msgs]}: {e}",
                self.name,
                field="chat_template",
            ) from None

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens added (special token strings inside it still map)."""
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def context_ids(self, msgs: Sequence[dict[str, Any]]) -> list[int]:
        """Ids of the rendered conversation up to and including the generation prompt."""
        return self.encode_text(self.render(msgs, True))

    def assistant_ids(self, parts: Sequence[str]) -> list[int]:
        """Ids of assistant text as the model writes it after the context: each part on its own."""
        return [i for part in parts for i in self.encode_text(part)]

    def prompt_ids(self, msgs: Sequence[dict[str, Any]], assistant_prefix: Sequence[str] = ()) -> list[int]:
        """The generation path: context ids, then the ids of an assistant prefix (steps already written)."""
        return self.context_ids(msgs) + self.assistant_ids(assistant_prefix)

    # ------------------------------------------------------------------ training examples

    def encode_trace(self, trace: Trace, fmt: TraceFormat | None = None, where: str = "") -> dict[str, np.ndarray]:
        """`input_ids` and `loss_mask` (1 on the assistant ids and the end-of-turn ids) of one trace."""
        ctx = self.context_ids(self.messages(trace.prompt))
        answer = self.assistant_ids(segments(trace, fmt or self.fmt)) + list(self.eot_ids)
        ids = np.asarray(ctx + answer, np.int32)
        mask = np.concatenate([np.zeros(len(ctx), np.int32), np.ones(len(answer), np.int32)])
        return {"input_ids": ids, "loss_mask": mask}

    def encode_span(self, context: list[int], span: str, final: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ids, span mask) of context ids followed by a scored span (+ end-of-turn ids if final)."""
        span_ids = self.assistant_ids([span]) + (list(self.eot_ids) if final else [])
        ids = np.asarray(context + span_ids, np.int32)
        return ids, np.concatenate([np.zeros(len(context), np.int32), np.ones(len(span_ids), np.int32)])

    def stop_ids(self) -> tuple[int, ...]:
        """Ids generation stops on: the end-of-turn ids, the tokenizer's EOS, and each family's
        turn-ending special tokens this vocabulary has (`<|eot_id|>`, `<|eom_id|>`, `<|im_end|>`, `</s>`)."""
        ids = [*self.eot_ids, self.eos_id, *(self.special[t] for t in FAMILY_STOP_TOKENS if t in self.special)]
        return tuple(dict.fromkeys(int(i) for i in ids if i is not None))

    # ------------------------------------------------------------------ checks, once per tokenizer

    def _end_of_turn(self) -> tuple[int, ...]:
        """The special tokens the template writes right after assistant content; checks that the
        context (with the generation prompt) is a prefix of the rendered conversation.

        The probe has no system message: Mistral's template folds one into the last user turn
        only, so with a system prompt its history differs from its context; that is harmless
        here (training and generation both use the context rendering) and not an error."""
        msgs = [{"role": "user", "content": _PROBE_USER}]
        ctx = self.render(msgs, True)
        full = self.render(msgs + [{"role": "assistant", "content": _PROBE_ANSWER}], False)
        if not full.startswith(ctx):
            raise DataError(
                f"chat template of {self.name!r}: its rendering with the generation prompt is not a prefix of the "
                f"rendered conversation, so the context a model is trained on differs from the one it generates "
                f"after (with generation prompt: ...{ctx[-60:]!r}; conversation: ...{full[len(ctx) - 60 :][:90]!r})",
                self.name,
                field="chat_template",
            )
        at = full.rfind(_PROBE_ANSWER)
        if at < len(ctx):
            raise DataError(
                f"chat template of {self.name!r} does not render the assistant content",
                self.name,
                field="chat_template",
            )
        special = set(self.special.values())
        eot: list[int] = []
        for i in self.encode_text(full[at + len(_PROBE_ANSWER) :]):
            if i not in special:
                break
            eot.append(i)
        if not eot:
            raise DataError(
                f"chat template of {self.name!r} writes no end-of-turn special token after the assistant content",
                self.name,
                field="chat_template",
            )
        return tuple(eot)


def check_trace_format(fmt: TraceFormat, special: dict[str, int], name: str = "tokenizer") -> None:
    """No trace tag, header or decision prefix may equal or contain a special token (an end-of-turn
    or role-header token would end the turn or open a new one mid-trace)."""
    fields = [("open_tag", fmt.open_tag), ("close_tag", fmt.close_tag), ("decision_prefix", fmt.decision_prefix)]
    fields += [(f"headers[{i}]", h) for i, h in enumerate(fmt.headers)]
    for field, value in fields:
        if not value.strip():
            raise DataError("must not be empty", field=f"data.trace_format.{field}")
        for tok in special:
            if tok and tok in value:
                raise DataError(
                    f"{value!r} contains the special token {tok!r} of {name!r} (an end-of-turn or "
                    "role-header token); choose another string",
                    field=f"data.trace_format.{field}",
                )


def truncate(
    example: dict[str, np.ndarray], max_len: int, stats: TruncationStats | None = None
) -> dict[str, np.ndarray]:
    """Cut an SFT example to `max_len` tokens (from the end), counting what was dropped."""
    n = len(next(iter(example.values())))
    if stats is not None:
        stats.examples += 1
        if n > max_len:
            stats.truncated += 1
            stats.tokens_dropped += n - max_len
    return {k: v[:max_len] for k, v in example.items()}
