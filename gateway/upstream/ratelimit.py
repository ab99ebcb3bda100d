"""Rate limits for upstream calls: a token bucket per account, shared by sessions and the retry worker.

The bucket is gateway.core.tokenbucket's: each call reserves the next free slot, so concurrent callers
are served in order without a lock, and a caller that would wait longer than it can afford gets
RateLimited without taking a slot. A 429 pauses the bucket for the upstream's Retry-After and halves its
rate; the rate recovers linearly over `recovery` seconds (additive increase).

A slot is a moment: a caller that reaches it late (its process paused by SIGSTOP, a GC or a frozen VM, or
an event loop far behind) gives it up and takes a fresh one, or every caller woken at once would go at once
(a paused process's reserved slots all spent in the same instant, far over the rate).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from gateway.core import tokenbucket
from gateway.core.episode import Episode
from gateway.core.errors import Deferred, QueueBusy, RateLimited
from gateway.ops.metrics import RATE_LIMIT_WAIT
from gateway.upstream.response import MAX_RETRY_AFTER, MIN_RETRY_AFTER, bounded

log = structlog.get_logger("gateway.upstream")
# A slot reached later than one interval (at least 50 ms of event-loop jitter, at most this) is given up.
LATE_AT_MOST = 0.25


def lateness_allowed(interval: float) -> float:
    """How late a slot may be spent: calls woken together then go at most one interval's worth over the rate."""
    return min(max(interval, 0.05), LATE_AT_MOST)


async def reached(wait: float, allowed: float, clock: Callable[[], float] = time.monotonic) -> bool:
    """Wait `wait` seconds for a slot; False when it was reached more than `allowed` late (given up)."""
    if wait <= 0:
        return True
    due = clock() + wait
    await asyncio.sleep(wait)
    return clock() - due <= allowed


def pause_for(retry_after: float | None) -> float:
    """The pause a 429 asks for: a second (MIN_RETRY_AFTER) when it names none or less (Retry-After: 0 gave
    no pause at all), at most MAX_RETRY_AFTER."""
    return bounded(retry_after) or MIN_RETRY_AFTER


def capped(retry_after: float | None, account: str) -> float:
    """pause_for(), logged when it is the longest honoured."""
    if retry_after is not None and retry_after >= MAX_RETRY_AFTER:
        # A 429 asked for a pause at least as long as the longest honoured (HttpResponse.retry_after caps it):
        # the account pauses for that long and then tries again.
        log.warning("upstream_retry_after_capped", account=account, pause=MAX_RETRY_AFTER)
    return pause_for(retry_after)


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
        self._account = account
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
        while True:
            wait = self.reserve(max_wait)
            self._wait_metric.observe(wait)
            if await reached(wait, lateness_allowed(1.0 / self.rate), self._clock):
                return

    async def penalize(self, retry_after: float | None) -> None:
        now = self._clock()
        self._tat = tokenbucket.paused(self._tat, now, capped(retry_after, self._account))
        self._slow_until = now + self._recovery


SlotsFn = Callable[[str, int, float, int, float], Awaitable[list[float]]]
PauseFn = Callable[[str, float, float], Awaitable[None]]


class SharedBucket:
    """One bucket for every process and instance on the same queue: the queue store keeps its state
    (a row per account), so N instances together stay under the upstream's limit. When the store
    cannot be reached, this process falls back to its own bucket rather than stop sending. When it answers
    but is busy (QueueBusy: a lock or statement timeout, every pooled connection in use), the call is
    deferred instead: the store is back in moments, and each such failure falling back would let this
    process send up to `rate_burst` at once on top of the shared rate, on every instance at once.

    This process's callers share their trips to the store: those that ask while one is under way are served
    together by the next, which takes as many slots as they are in one transaction. A deep backlog then costs
    one transaction per batch of calls, not one per call queued behind the others on the account's row
    (docs/development/benchmarks.md has the figures)."""

    def __init__(
        self, slots: SlotsFn, pause: PauseFn, rate: float, burst: int, *, account: str, recovery: float = 30.0
    ) -> None:
        self._slots, self._pause = slots, pause
        self._interval, self._burst = 1.0 / rate, burst
        self._account = account
        self._recovery = recovery
        self._local = TokenBucket(rate, burst, account=account, recovery=recovery)
        self._wait_metric = RATE_LIMIT_WAIT.labels(account=account)
        self._degraded = Episode()  # the store cannot be reached: this process's own bucket serves
        self._waiting: list[asyncio.Future[float]] = []  # callers for the next trip to the store
        self._taker: asyncio.Task[None] | None = None  # the trips under way while callers wait

    async def acquire(self, max_wait: float | None = None) -> None:
        while True:
            try:
                wait = await self._slot()
            except QueueBusy as exc:
                # Deferred as any call the queue cannot serve now (the store logs its busy episode); a fresh
                # error each, for the callers of one trip to the store share its exception.
                raise type(exc)(exc.reason) from None
            except Deferred as exc:
                self._unavailable(exc)
                await self._local.acquire(max_wait)
                return
            if (over := self._degraded.ended()) is not None:
                log.info("rate_limit_store_available", account=self._account, local_for=over.lasted, calls=over.seen)
            self._wait_metric.observe(wait)
            if await reached(wait, lateness_allowed(self._interval)):
                return

    async def _slot(self) -> float:
        """This caller's slot from the store: the seconds to wait for it."""
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        if self._taker is None or self._taker.done():
            self._taker = asyncio.create_task(self._take_for_waiting(), name=f"rate-slots-{self._account}")
        return await waiter

    async def _take_for_waiting(self) -> None:
        """Trips to the store until no caller waits, each for the callers that came during the one before."""
        while self._waiting:
            batch = [waiter for waiter in self._waiting if not waiter.done()]  # a cancelled caller takes no slot
            self._waiting = []
            if not batch:
                continue
            try:
                waits = await self._slots(self._account, len(batch), self._interval, self._burst, self._recovery)
            except Exception as exc:  # each caller meets it as its own call's (Deferred: its local bucket)
                for waiter in batch:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            except BaseException:  # cancelled (the loop shuts down): so are the callers
                for waiter in batch + self._waiting:
                    waiter.cancel()
                raise
            for waiter, wait in zip(batch, waits, strict=True):
                if not waiter.done():
                    waiter.set_result(wait)

    async def penalize(self, retry_after: float | None) -> None:
        await self._local.penalize(retry_after)
        try:
            # The local bucket's penalize logged a capped pause already.
            await self._pause(self._account, pause_for(retry_after), self._recovery)
        except QueueBusy:
            pass  # the store is there: not an outage to announce; this process's bucket is paused all the same
        except Deferred as exc:
            self._unavailable(exc)

    def _unavailable(self, exc: Deferred) -> None:
        if self._degraded.occurred():  # once per outage of the store, not once per call
            log.error(
                "rate_limit_store_unavailable",
                account=self._account,
                error=exc.reason,
                fallback="this process's own bucket",
            )
