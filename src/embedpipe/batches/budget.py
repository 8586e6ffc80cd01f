"""What batch work costs its API key: the tokens of every batch line are charged to a budget
of the key's, as online requests are, so a batch cannot serve more than a key may use.

The batch budget is a window of its own (``batch:<key>``, next to the key's online one), so a
running batch never takes the online budget from the same key's interactive traffic. Its
size: ``EMBEDPIPE_RATE_LIMIT_BATCH_TPM`` when set, else the key's own tokens per minute (its
``tpm`` in the keys file, else ``EMBEDPIPE_RATE_LIMIT_TPM``); 0 = unlimited. A line that
does not fit waits for the window to refill (batch work has no deadline); a line bigger than
the whole budget can never fit and fails with 400, as online.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from embedpipe.auth import ApiKey, KeyStore
from embedpipe.errors import InvalidInput, NotReady
from embedpipe.ratelimit import LimiterUnavailable, Quota, RateLimiter
from embedpipe.settings import Settings

log = logging.getLogger("embedpipe.batches")

_MIN_WAIT_SECONDS = 0.05
_MAX_WAIT_SECONDS = 60.0


class BatchBudget:
    def __init__(
        self, limiter: RateLimiter, settings: Settings, keys: Mapping[str, ApiKey]
    ) -> None:
        self._limiter = limiter
        self._settings = settings
        self._keys = keys

    @classmethod
    def from_settings(cls, limiter: RateLimiter, settings: Settings) -> BatchBudget:
        keys = KeyStore.load(settings.api_keys, settings.api_keys_file)
        return cls(limiter, settings, {key.name: key for key in keys})

    def tokens_per_minute(self, owner: str | None) -> int:
        if self._settings.rate_limit_batch_tpm is not None:
            return self._settings.rate_limit_batch_tpm
        key = self._keys.get(owner) if owner is not None else None
        if key is not None and key.tpm is not None:
            return key.tpm
        return self._settings.rate_limit_tpm

    async def charge(self, owner: str | None, tokens: int) -> None:
        """Wait until ``tokens`` fit ``owner``'s batch budget, and charge them.

        InvalidInput when they never can; NotReady (the chunk runs again later) when the
        limiter's storage is down and it fails closed."""
        budget = self.tokens_per_minute(owner)
        if budget == 0:
            return
        if tokens > budget:
            raise InvalidInput(
                f"This request holds {tokens} tokens, more than the {budget} tokens per minute "
                "this key's batches may use: it can never be served. Send fewer or shorter "
                "texts.",
                param="input",
                code="tokens_exceed_rate_limit",
            )
        client = f"batch:{owner or 'anonymous'}"
        while True:
            try:
                decision = await self._limiter.acquire(client, Quota(0, budget), tokens)
            except LimiterUnavailable as exc:
                raise NotReady("The rate limiter is unavailable.") from exc
            if decision.allowed:
                return
            wait = min(_MAX_WAIT_SECONDS, max(_MIN_WAIT_SECONDS, decision.retry_after))
            log.debug("batch tokens of %s wait %.1f s for their budget", client, wait)
            await asyncio.sleep(wait)
