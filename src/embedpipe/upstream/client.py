"""One upstream call, made reliable: retries, Retry-After, a deadline and a circuit breaker.

The ``openai`` SDK's own retries are off (``max_retries=0``): this loop owns them, so every
attempt is counted, the breaker sees each failure and no call outlives its deadline.

attempt --200--> vectors
        --429--> hint <= max_retry_wait: wait it (+ jitter) --> attempt
                 longer hint: UpstreamRateLimited (429) at once, with the upstream's hint
        --5xx, 408, 409, timeout, refused--> full-jitter backoff --> attempt   (breaker failure)
        --401/403/404--> UpstreamFailed (502): an operator problem, never retried
        --other 4xx--> InvalidInput (400) with the upstream's reason
An attempt starts only with a useful share of its timeout left before the deadline; when no
other attempt may go, the answer is the last real upstream answer (a 429 stays a 429 with
Retry-After, the rest is a 502), never the timeout of an attempt the deadline cut short. While
the breaker is open no attempt goes: UpstreamUnavailable (503).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import openai

from embedpipe import metrics
from embedpipe.cache.breaker import CircuitBreaker
from embedpipe.embedders.base import Vectors
from embedpipe.errors import (
    EmbedpipeError,
    InvalidInput,
    UpstreamFailed,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from embedpipe.settings import UpstreamSettings

log = logging.getLogger("embedpipe.upstream")

# Statuses worth another attempt (as the openai SDK decides): rate limited, timed out,
# conflicting, or failing on the upstream's side.
_RETRY_STATUSES = frozenset({408, 409, 429})
# A reason from the upstream is quoted to the client at most this long.
_MAX_REASON_CHARS = 300
# A retry goes only with at least this share of one attempt's timeout left before the
# deadline: an attempt with less would mostly time out, hiding the upstream's real answer.
_MIN_ATTEMPT_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    vectors: Vectors  # one row per input, in input order, as the upstream sent them
    billed_tokens: int


@dataclass(frozen=True, slots=True)
class _Failure:
    """An attempt that failed: the error to answer with if no other attempt may go."""

    error: EmbedpipeError
    retry_after: float | None = None  # the upstream's own hint (429 and 503)
    retryable: bool = True
    answered: bool = True  # False: no answer came (timeout, refused connection)
    cut_short: bool = False  # timed out on the deadline, before its own full timeout


def retry_after_seconds(headers: Any) -> float | None:
    """The upstream's wait hint: ``retry-after-ms`` (OpenAI), then ``Retry-After`` in seconds
    or as an HTTP date. None when absent or unreadable."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def decode_vectors(response: Any, expected_rows: int) -> Vectors:
    """The response's vectors in input order; base64 (what we ask for) or float lists (what
    some compatible servers send anyway)."""
    rows = sorted(response.data, key=lambda item: item.index)
    if len(rows) != expected_rows or [row.index for row in rows] != list(range(expected_rows)):
        raise ValueError(f"{len(rows)} vectors for {expected_rows} inputs")
    decoded = [
        np.frombuffer(base64.b64decode(row.embedding), dtype="<f4")
        if isinstance(row.embedding, str)
        else np.asarray(row.embedding, dtype=np.float32)
        for row in rows
    ]
    if len({vector.shape for vector in decoded}) != 1 or decoded[0].size == 0:
        raise ValueError("vectors of different or zero sizes")
    return np.ascontiguousarray(np.stack(decoded), dtype=np.float32)


class UpstreamClient:
    """Calls ``embeddings.create`` of one upstream model through ``openai.AsyncOpenAI``.

    >>> client = UpstreamClient.open(
    ...     "small", "text-embedding-3-small", base_url=url, api_key=key, settings=settings
    ... )
    >>> answer = await client.embed(["hello"], dimensions=None)
    >>> await client.close()
    """

    def __init__(
        self,
        model: str,
        upstream_model: str,
        sdk: openai.AsyncOpenAI,
        settings: UpstreamSettings,
        *,
        secret: str = "",
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        """``model``: our name (metric label); ``upstream_model``: the name sent upstream;
        ``secret``: the API key, scrubbed from any upstream text before it is repeated."""
        self._model = model
        self._upstream_model = upstream_model
        self._sdk = sdk
        self._settings = settings
        self._secret = secret
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self.breaker = CircuitBreaker(
            settings.breaker_failures,
            settings.breaker_reset_seconds,
            tier=f"upstream:{model}",
            clock=clock,
            gauge=metrics.UPSTREAM_BREAKER_OPEN.labels(model=model),
            subject=f"upstream model {model}",
        )

    @classmethod
    def open(
        cls,
        model: str,
        upstream_model: str,
        *,
        base_url: str,
        api_key: str,
        settings: UpstreamSettings,
    ) -> UpstreamClient:
        sdk = openai.AsyncOpenAI(
            # The SDK insists on a key; an upstream without authentication ignores this one.
            api_key=api_key or "no-key",
            base_url=base_url,
            max_retries=0,  # our loop retries
            timeout=settings.timeout_seconds,
        )
        return cls(model, upstream_model, sdk, settings, secret=api_key)

    async def close(self) -> None:
        await self._sdk.close()

    async def embed(
        self, texts: list[str], dimensions: int | None, counted_tokens: int = 0
    ) -> UpstreamAnswer:
        """Vectors for ``texts`` (one call's worth) or an EmbedpipeError: UpstreamRateLimited,
        UpstreamUnavailable, UpstreamFailed or InvalidInput. ``counted_tokens``: our count,
        billed when the upstream reports no usage."""
        settings = self._settings
        started = self._clock()
        deadline = started + settings.deadline_seconds
        # Less than this left: no retry goes (the first attempt always does).
        min_attempt = _MIN_ATTEMPT_SHARE * min(settings.timeout_seconds, settings.deadline_seconds)
        last_answer: _Failure | None = None  # the last failure the upstream itself answered
        attempt = 0
        while True:
            if not self.breaker.allow():
                raise self._breaker_open()
            remaining = deadline - self._clock()
            outcome = await self._attempt(texts, dimensions, counted_tokens, remaining)
            if isinstance(outcome, UpstreamAnswer):
                return outcome
            if outcome.answered:
                last_answer = outcome
            if not outcome.retryable:
                raise outcome.error
            if self.breaker.state == "open":  # this failure opened it: no point waiting
                raise self._breaker_open()
            hint = outcome.retry_after
            if isinstance(outcome.error, UpstreamRateLimited) and (
                hint is not None and hint > settings.max_retry_wait_seconds
            ):
                # A long wait is the client's to make: holding its connection that long
                # only to answer later (or time out) helps nobody.
                raise self._give_up(attempt, outcome, None, hint)
            delay = self._backoff(attempt, hint)
            if deadline - (self._clock() + delay) < min_attempt:
                if outcome.cut_short and last_answer is not None:
                    outcome = last_answer
                raise self._give_up(attempt, outcome, delay, outcome.retry_after)
            attempt += 1
            metrics.UPSTREAM_RETRIES.labels(model=self._model).inc()
            log.info(
                "upstream model %s: attempt %d failed (%s); retrying in %.2fs",
                self._model,
                attempt,
                outcome.error.code,
                delay,
            )
            await self._sleep(delay)

    def _give_up(
        self, attempt: int, outcome: _Failure, delay: float | None, hint: float | None
    ) -> EmbedpipeError:
        if isinstance(outcome.error, UpstreamRateLimited):
            # What the client may tell its user: the upstream's hint, else our wait.
            outcome.error.retry_after = hint or delay or outcome.error.retry_after
        log.warning(
            "upstream model %s: giving up after %d attempt(s) (%s)",
            self._model,
            attempt + 1,
            outcome.error.code,
        )
        return outcome.error

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            # Honour the hint; the jitter keeps waiting callers from returning all at once.
            return retry_after + self._rng.uniform(0, self._settings.retry_base_seconds)
        ceiling = self._settings.retry_base_seconds * 2**attempt
        return self._rng.uniform(0, min(self._settings.retry_max_seconds, ceiling))

    def _breaker_open(self) -> UpstreamUnavailable:
        reset = self.breaker.reset_seconds
        return UpstreamUnavailable(
            f"The upstream API of model '{self._model}' is failing; embedpipe stopped calling "
            f"it for {reset:g}s. Cached inputs are still served. Retry later.",
            retry_after=reset,
        )

    async def _attempt(
        self, texts: list[str], dimensions: int | None, counted_tokens: int, remaining: float
    ) -> UpstreamAnswer | _Failure:
        started = time.perf_counter()
        status = "200"
        try:
            # The SDK's timeout bounds each phase; this one bounds the whole attempt.
            async with asyncio.timeout(max(0.001, min(self._settings.timeout_seconds, remaining))):
                response = await self._sdk.embeddings.create(
                    input=texts,
                    model=self._upstream_model,
                    encoding_format="base64",
                    dimensions=openai.omit if dimensions is None else dimensions,
                )
        except openai.APIStatusError as exc:
            status = str(exc.status_code)
            return self._status_failure(exc)
        except (TimeoutError, openai.APITimeoutError):
            status = "timeout"
            self.breaker.record_failure()
            return _Failure(
                UpstreamFailed(
                    f"The upstream API of model '{self._model}' did not answer in time.",
                    code="upstream_timeout",
                ),
                answered=False,
                cut_short=remaining < self._settings.timeout_seconds,
            )
        except openai.APIConnectionError:
            status = "connection_error"
            self.breaker.record_failure()
            return _Failure(
                UpstreamFailed(
                    f"embedpipe could not reach the upstream API of model '{self._model}'.",
                    code="upstream_unreachable",
                ),
                answered=False,
            )
        finally:
            metrics.UPSTREAM_REQUESTS.labels(model=self._model, status=status).inc()
            metrics.UPSTREAM_SECONDS.labels(model=self._model).observe(
                time.perf_counter() - started
            )
        try:
            vectors = decode_vectors(response, len(texts))
        except (ValueError, TypeError, AttributeError) as exc:
            self.breaker.record_failure()
            log.error("upstream model %s sent an unusable answer: %s", self._model, exc)
            return _Failure(
                UpstreamFailed(
                    f"The upstream API of model '{self._model}' sent an unusable answer.",
                    code="upstream_bad_response",
                ),
                retryable=False,
            )
        self.breaker.record_success()
        usage = getattr(response, "usage", None)
        billed = getattr(usage, "prompt_tokens", None) or counted_tokens
        metrics.UPSTREAM_TOKENS.labels(model=self._model).inc(billed)
        return UpstreamAnswer(vectors, billed)

    def _status_failure(self, exc: openai.APIStatusError) -> _Failure:
        code = exc.status_code
        hint = retry_after_seconds(exc.response.headers)
        if code == 429:
            # The upstream is up and asks for patience: not a breaker failure.
            self.breaker.record_success()
            return _Failure(
                UpstreamRateLimited(
                    f"The upstream API of model '{self._model}' is rate limiting embedpipe. "
                    "Retry later.",
                    retry_after=hint or 1.0,
                ),
                retry_after=hint,
            )
        if code >= 500 or code in _RETRY_STATUSES:
            self.breaker.record_failure()
            return _Failure(
                UpstreamFailed(
                    f"The upstream API of model '{self._model}' failed (HTTP {code}).",
                    code="upstream_error",
                ),
                retry_after=hint,
            )
        # The upstream answered, so it is up; what follows is not worth another attempt.
        self.breaker.record_success()
        if code in (401, 403):
            # Its message may quote part of the key: it is neither logged nor repeated.
            log.error(
                "upstream model %s: the upstream refused our credentials (HTTP %d)",
                self._model,
                code,
            )
            return _Failure(
                UpstreamFailed(
                    f"The upstream API of model '{self._model}' rejected embedpipe's credentials "
                    f"(HTTP {code}); the operator must check EMBEDPIPE_OPENAI_API_KEY.",
                    code="upstream_auth_failed",
                ),
                retryable=False,
            )
        if code == 404:
            return _Failure(
                UpstreamFailed(
                    f"The upstream API does not serve model '{self._upstream_model}' (HTTP 404).",
                    code="upstream_model_not_found",
                ),
                retryable=False,
            )
        return _Failure(
            InvalidInput(
                f"The upstream API rejected the request (HTTP {code}): {self._reason(exc)}",
                param=exc.param,
                code="upstream_bad_request",
            ),
            retryable=False,
        )

    def _reason(self, exc: openai.APIStatusError) -> str:
        """The upstream's own message, short and without our key."""
        body = exc.body
        message = body.get("message") if isinstance(body, dict) else None
        text = str(message or "no reason given")
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:_MAX_REASON_CHARS]
