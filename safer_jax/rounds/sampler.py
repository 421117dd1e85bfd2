"""Samplers of on-policy rounds: the local KV-cache sampler, or an OpenAI-compatible endpoint.

A request is a chat prompt plus an assistant prefix (the steps already written); a sampler
returns the continuation text after the prefix. Locally that is `generate.generate_chat`
(batched, sharded over the mesh, from the policy in memory); on a GPU fleet it is a vLLM
or SGLang server of the current export, reached through `/v1/completions` with the chat
template rendered here (`ChatTokenizer.prompt_ids` decoded), so both continue the same text.

An endpoint that fails is retried with backoff; after the last attempt `SamplerError`
carries the results already drawn (`done`), so the round loop saves them before it stops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from safer_jax.data.tokenize import ChatTokenizer
from safer_jax.generate import SamplingConfig
from safer_jax.http_retry import RequestFailed, post_json, with_retries


@dataclasses.dataclass(frozen=True)
class Request:
    id: str  # unique within a call, e.g. "tr-0001#2"
    prompt: str
    prefix: tuple[str, ...] = ()  # assistant text already written (step segments)
    stop: tuple[str, ...] = ()  # stop strings of this request (the next step's header)


class SamplerError(RuntimeError):
    """A request failed after every retry; `done` holds the results drawn before it, by request id."""

    def __init__(self, message: str, request: Request, done: dict[str, dict[str, Any]]):
        super().__init__(message)
        self.request, self.done = request, done


class Sampler(Protocol):
    name: str

    def __call__(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[dict[str, Any]]:
        """Per request, in order: {"text" (after the prefix), "finish_reason", "completion_tokens"}."""
        ...


class LocalSampler:
    """The policy in memory through the KV-cache sampler; requests with the same stop strings share batches."""

    name = "local"

    def __init__(self, model: Any, ct: ChatTokenizer, batch_size: int = 16, mesh: Any = None):
        self.model, self.ct, self.batch_size, self.mesh = model, ct, batch_size, mesh

    def __call__(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[dict[str, Any]]:
        from safer_jax.generate import generate_chat

        out: list[dict[str, Any]] = [{} for _ in requests]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.stop, []).append(i)
        for stop, idx in groups.items():
            rows = [
                {"id": str(i), "prompt": requests[i].prompt, "assistant_prefix": list(requests[i].prefix)} for i in idx
            ]
            sc = dataclasses.replace(sampling, stop_strings=stop)
            gens = generate_chat(
                self.model, self.ct, rows, sc, batch_size=self.batch_size, mesh=self.mesh, progress=False
            )
            for i, g in zip(idx, gens):
                prefix = "".join(requests[i].prefix)
                out[i] = {
                    "text": g["text"][len(prefix) :],
                    "finish_reason": g["finish_reason"],
                    "completion_tokens": g["completion_tokens"],
                }
        return out


class OpenAISampler:
    """`/v1/completions` of an OpenAI-compatible server (vLLM, SGLang) serving the current policy.

    The prompt text is the chat context rendered by our template plus the assistant prefix,
    so the server continues exactly what the local sampler would. Retries 408/409/429/5xx and
    network errors with exponential backoff."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        ct: ChatTokenizer,
        api_key: str | None = None,
        max_retries: int = 3,
        timeout: float = 120.0,
        backoff: float = 0.5,
    ):
        self.url = base_url.rstrip("/") + "/completions"
        self.model, self.ct, self.key = model, ct, api_key
        self.max_retries, self.timeout, self.backoff = max_retries, timeout, backoff

    def prompt_text(self, r: Request) -> str:
        ids = self.ct.prompt_ids(self.ct.messages(r.prompt), list(r.prefix))
        return self.ct.tok.decode(ids, skip_special_tokens=False)

    def one(self, r: Request, sampling: SamplingConfig, seed: int) -> dict[str, Any]:
        body = {
            "model": self.model,
            "prompt": self.prompt_text(r),
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": sampling.top_p,
            "seed": seed,
        }
        if r.stop:
            body["stop"] = list(r.stop)

        def attempt() -> dict[str, Any]:
            data = post_json(self.url, body, self.key, self.timeout)
            choice = data["choices"][0]
            text = str(choice.get("text") or "")
            reason = "length" if choice.get("finish_reason") == "length" else "stop"
            hit = choice.get("stop_reason")
            if isinstance(hit, str) and hit in r.stop:  # vLLM names the stop string it dropped: put it back
                text, reason = text + hit, "stop_string"
            tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
            return {"text": text, "finish_reason": reason, "completion_tokens": tokens}

        try:
            return with_retries(attempt, max_retries=self.max_retries, backoff=self.backoff)
        except RequestFailed as e:
            raise _Failed(f"{self.url} failed after {e.attempts} attempts; last: {e.last}") from None

    def __call__(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        out = []
        for j, r in enumerate(requests):
            try:
                res = self.one(r, sampling, sampling.seed * 1_000_003 + j)
            except _Failed as e:
                raise SamplerError(str(e), r, done) from None
            done[r.id] = res
            out.append(res)
        return out


class _Failed(RuntimeError):
    pass
