"""JSON POSTs to OpenAI-compatible endpoints, retried: the one loop that the teacher
(`data/synthesis.py`), the judge (`evaluation/judge.py`) and the round sampler
(`rounds/sampler.py`) share.

Retried: 408, 409, 429 and every 5xx (waiting at least what a `Retry-After` header asks),
network errors, replies that are not the expected JSON, and replies the caller's parser
rejects by raising `Retry`. Another HTTP status raises `Refused` at once; when every attempt
failed, `GaveUp`. Waits grow as `backoff * 2**attempt`, with jitter in [0.5, 1).
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
RETRY_STATUS = (408, 409, 429)  # and every 5xx


class Retry(Exception):
    """Raised by a caller's parser: the reply was well formed but unusable (it may vary: ask again)."""


class RequestFailed(Exception):
    """`last`: what went wrong on the last attempt; `attempts`: how many were made."""

    def __init__(self, last: str, attempts: int):
        super().__init__(last)
        self.last, self.attempts = last, attempts


class Refused(RequestFailed):
    """The endpoint answered with a status that asking again will not change."""


class GaveUp(RequestFailed):
    """Every attempt failed."""


def post_json(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> Any:
    """The parsed JSON reply to a JSON POST (a bearer token when `api_key` is set)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _retry_after(e: urllib.error.HTTPError) -> float:
    value = e.headers.get("Retry-After") if e.headers else None
    return float(value) if value and value.replace(".", "", 1).isdigit() else 0.0


def with_retries(
    attempt: Callable[[], T], *, max_retries: int, backoff: float, before: Callable[[], None] | None = None
) -> T:
    """`attempt()`'s result, calling it up to `max_retries + 1` times; `before()` runs ahead of
    each call (a rate limiter)."""
    last = "no attempt"
    for i in range(max_retries + 1):
        if before is not None:
            before()
        delay = backoff * (2**i)
        try:
            return attempt()
        except urllib.error.HTTPError as e:  # before URLError and OSError, which it subclasses
            last = f"HTTP {e.code}"
            if e.code not in RETRY_STATUS and e.code < 500:
                raise Refused(last, i + 1) from None
            delay = max(delay, _retry_after(e))
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            last = f"network error: {getattr(e, 'reason', e)}"
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            last = f"broken response: {type(e).__name__}"
        except Retry as e:
            last = str(e)
        if i < max_retries:
            time.sleep(delay * (0.5 + random.random() / 2))
    raise GaveUp(last, max_retries + 1)
