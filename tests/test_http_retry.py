"""The retry loop the teacher, the judge and the round sampler share (`safer_jax/http_retry.py`)."""

from __future__ import annotations

import email.message
import json
import urllib.error

import pytest

from safer_jax import http_retry
from safer_jax.http_retry import GaveUp, Refused, Retry, with_retries


def _http(code: int, retry_after: str | None = None) -> urllib.error.HTTPError:
    headers = email.message.Message()
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return urllib.error.HTTPError("http://127.0.0.1/x", code, "status", headers, None)


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(http_retry.time, "sleep", waited.append)
    return waited


def _script(*outcomes):
    """An attempt function that raises or returns each outcome in turn, counting its calls."""
    calls = []

    def attempt():
        calls.append(1)
        out = outcomes[len(calls) - 1]
        if isinstance(out, BaseException):
            raise out
        return out

    return attempt, calls


def test_retryable_failures_then_success(sleeps):
    attempt, calls = _script(
        _http(503), urllib.error.URLError("refused"), json.JSONDecodeError("x", "", 0), Retry("bad"), "ok"
    )
    assert with_retries(attempt, max_retries=4, backoff=1.0) == "ok"
    assert len(calls) == 5 and len(sleeps) == 4
    for i, s in enumerate(sleeps):  # backoff * 2**i with jitter in [0.5, 1)
        assert 0.5 * 2**i <= s < 2**i


def test_retry_after_is_a_floor_on_the_wait(sleeps):
    attempt, _ = _script(_http(429, "7"), "ok")
    assert with_retries(attempt, max_retries=2, backoff=0.1) == "ok"
    assert 3.5 <= sleeps[0] < 7.0


def test_a_client_error_is_refused_at_once(sleeps):
    attempt, calls = _script(_http(500), _http(401), "never")
    with pytest.raises(Refused) as e:
        with_retries(attempt, max_retries=5, backoff=0.0)
    assert (e.value.last, e.value.attempts, len(calls)) == ("HTTP 401", 2, 2)


def test_gives_up_after_the_last_attempt_naming_the_last_failure(sleeps):
    attempt, calls = _script(_http(502), Retry("unparsable answer 'maybe'"), Retry("unparsable answer 'hm'"))
    before = []
    with pytest.raises(GaveUp) as e:
        with_retries(attempt, max_retries=2, backoff=0.0, before=lambda: before.append(len(calls)))
    assert (e.value.last, e.value.attempts) == ("unparsable answer 'hm'", 3)
    assert before == [0, 1, 2] and len(sleeps) == 2  # `before` ahead of every attempt; no wait after the last
