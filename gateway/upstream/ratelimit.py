"""Rate limits for upstream calls: a token bucket per account, shared by sessions and the retry worker.

The bucket is gateway.core.tokenbucket's: each call reserves the next free slot, so concurrent callers
are served in order without a lock, and a caller that would wait longer than it can afford gets
RateLimited without taking a slot. A 429 pauses the bucket for the upstream's Retry-After and halves its
rate; the rate recovers linearly over `recovery` seconds (additive increase).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from gateway.core import tokenbucket
from gateway.core.errors import Deferred, RateLimited
from gateway.ops.metrics import RATE_LIMIT_WAIT

log = structlog.get_logger("gateway.upstream")


class RateLimiter(Protocol):
    async def acquire(self, max_wait: float | None = None) -> None:
        """Wait for a slot; raise RateLimited if that would take longer than `max_wait` seconds."""
        ...

    async def penalize(self, retry_after: float | None) -> None:
        """The upstream answered 429: pause for `retry_after` (or a second) and slow down."""
        ...


class Unlimited:
    async def acquire(self, max_wait: float | None = None) -> None:
        return None

    async def penalize(self, retry_after: float | None) -> None:
        return None


class TokenBucket:
    """This process's bucket for one account."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        account: str = "",
        recovery: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tat = tokenbucket.NEW
        self._slow_until = 0.0
        self._recovery = recovery
        self._wait_metric = RATE_LIMIT_WAIT.labels(account=account)

    def reserve(self, max_wait: float | None = None) -> float:
        """Take the next slot; returns the seconds to wait for it. Raises RateLimited past `max_wait`."""
        now = self._clock()
        interval = tokenbucket.slowed(1.0 / self.rate, now, self._slow_until, self._recovery)
        slot = tokenbucket.take(self._tat, now, interval, self.burst)
        if max_wait is not None and slot.wait > max_wait:
            raise RateLimited(f"rate limit: next slot in {slot.wait:.2f}s", retry_after=slot.wait)
        self._tat = slot.tat
        return slot.wait

    async def acquire(self, max_wait: float | None = None) -> None:
        wait = self.reserve(max_wait)
        self._wait_metric.observe(wait)
        if wait > 0:
            await asyncio.sleep(wait)

    async def penalize(self, retry_after: float | None) -> None:
        now = self._clock()
        self._tat = tokenbucket.paused(self._tat, now, retry_after if retry_after is not None else 1.0)
        self._slow_until = now + self._recovery


SlotFn = Callable[[str, float, int, float], Awaitable[float]]
PauseFn = Callable[[str, float, float], Awaitable[None]]


class SharedBucket:
    """One bucket for every process and instance on the same queue: the queue store keeps its state
    (a row per account), so N instances together stay under the upstream's limit. When the store
    cannot be reached, this process falls back to its own bucket rather than stop sending."""

    def __init__(
        self, slot: SlotFn, pause: PauseFn, rate: float, burst: int, *, account: str, recovery: float = 30.0
    ) -> None:
        self._slot, self._pause = slot, pause
        self._interval, self._burst = 1.0 / rate, burst
        self._account = account
        self._recovery = recovery
        self._local = TokenBucket(rate, burst, account=account, recovery=recovery)
        self._wait_metric = RATE_LIMIT_WAIT.labels(account=account)
        self._degraded = False

    async def acquire(self, max_wait: float | None = None) -> None:
        try:
            wait = await self._slot(self._account, self._interval, self._burst, self._recovery)
        except Deferred as exc:
            if not self._degraded:
                self._degraded = True
                log.error(
                    "rate_limit_store_unavailable",
                    account=self._account,
                    error=exc.reason,
                    fallback="this process's own bucket",
                )
            await self._local.acquire(max_wait)
            return
        self._degraded = False
        self._wait_metric.observe(wait)
        if wait > 0:
            await asyncio.sleep(wait)

    async def penalize(self, retry_after: float | None) -> None:
        await self._local.penalize(retry_after)
        try:
            await self._pause(self._account, retry_after if retry_after is not None else 1.0, self._recovery)
        except Deferred as exc:
            log.error("rate_limit_store_unavailable", account=self._account, error=exc.reason)
