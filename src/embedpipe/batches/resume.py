"""Resuming the batches that were active, at start, when the broker Redis may not answer yet.

A replica started while its broker is down (a restart of the whole stack, a broker still
loading its append-only file) must not die in its lifespan and restart in a loop. It comes up
unready instead (/ready answers 503 and says what it waits for, one log line says why), keeps
trying, and turns ready by itself once the broker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# What a broker that is down, restarting or still loading raises: refused, reset, timed out,
# LOADING. Anything else is a bug and fails the start as before.
_UNREACHABLE = (RedisError, OSError)


class ResumeWhenReachable:
    """Runs ``resume`` once now; if the broker is unreachable, marks ``what`` in
    ``not_ready`` and retries every ``retry_seconds`` in a task of its own until it works."""

    def __init__(
        self,
        resume: Callable[[], Awaitable[None]],
        not_ready: set[str],
        what: str = "broker",
        retry_seconds: float = 2.0,
    ) -> None:
        self._resume = resume
        self._not_ready = not_ready
        self._what = what
        self._retry_seconds = retry_seconds
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not await self._attempt(first=True):
            self._task = asyncio.create_task(self._retry(), name=f"resume-when-{self._what}")

    async def _attempt(self, first: bool) -> bool:
        try:
            await self._resume()
        except _UNREACHABLE as exc:
            if first:
                log.warning(
                    "the %s Redis is unreachable (%s: %s): not ready; retrying every %g s",
                    self._what,
                    type(exc).__name__,
                    exc,
                    self._retry_seconds,
                )
            self._not_ready.add(self._what)
            return False
        if self._what in self._not_ready:
            log.info("the %s Redis answers: ready", self._what)
            self._not_ready.discard(self._what)
        return True

    async def _retry(self) -> None:
        while True:
            await asyncio.sleep(self._retry_seconds)
            if await self._attempt(first=False):
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
