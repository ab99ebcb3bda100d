"""The retry worker: on the server's event loop, delivers due spooled messages, bounded per upstream account.

Each claimed message becomes one `Delivery.attempt(submission, done)` with the legs already delivered
passed as `done` (never resent; later legs reuse the stored batch eeid). The worker sleeps until the next
message is due (or `poll_interval`, so `smtp-gateway queue retry` from another process is noticed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Sequence

import structlog

from gateway.delivery import Delivery, Outcome
from gateway.errors import Deferred
from gateway.spool import codec
from gateway.spool.spool import Spool
from gateway.spool.store import Claimed

log = structlog.get_logger("gateway.spool.worker")


class RetryWorker:
    def __init__(
        self, spool: Spool, delivery: Delivery, accounts: Sequence[str], concurrency: int, poll_interval: float
    ) -> None:
        self.spool = spool
        self.delivery = delivery
        self.accounts = list(accounts)
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self._running: dict[str, set[asyncio.Task[None]]] = {a: set() for a in self.accounts}
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="spool-retry-worker")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; give running calls `timeout` to finish and record; cancel the rest (resumed at start)."""
        self._stopping = True
        self.spool.wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        running = {t for tasks in self._running.values() for t in tasks}
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        log.info("retry_worker_stopped")

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._tick()
            except Exception as exc:  # a broken spool must not kill the worker: log and try again later
                log.error("retry_worker_error", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(self.poll_interval)

    async def _tick(self) -> None:
        self.spool.wakeup.clear()  # anything set from here on wakes the wait below
        with_room = []
        for account in self.accounts:
            free = self.concurrency - len(self._running[account])
            if free <= 0:
                continue
            claimed = await self.spool.claim(account, free)
            for item in claimed:
                task = asyncio.create_task(self._deliver(item))
                self._running[account].add(task)
                task.add_done_callback(functools.partial(self._finished, account))
            if len(claimed) < free:
                with_room.append(account)
        timeout = self.poll_interval
        if with_room:
            due = await self.spool.next_due(with_room)
            if due is not None:
                timeout = min(timeout, max(due - time.time(), 0.0))
            if timeout <= 0:
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.spool.wakeup.wait(), timeout)

    def _finished(self, account: str, task: asyncio.Task[None]) -> None:
        self._running[account].discard(task)
        self.spool.wakeup.set()

    async def _deliver(self, item: Claimed) -> None:
        try:
            submission = codec.decode(item.submission)
        except codec.CodecError as exc:
            await self.spool.dead_letter_corrupt(item.id, str(exc))
            return
        if item.batch_eeid and not submission.batch_eeid:
            submission = dataclasses.replace(submission, batch_eeid=item.batch_eeid)
        try:
            outcome = await self.delivery.attempt(submission, item.done)
        except Exception as exc:  # an unexpected error is a temporary failure of this attempt
            log.error("retry_attempt_error", queue_id=item.id, error=f"{type(exc).__name__}: {exc}")
            outcome = Outcome(
                delivered=dict(item.done),
                deferred={leg.index: Deferred(str(exc)) for leg in submission.legs if leg.index not in item.done},
            )
        if outcome.rejected and not outcome.delivered:
            # The first call was refused: nothing was sent, the whole message is refused (as in a session).
            first = next(iter(outcome.rejected.values()))
            for leg in submission.legs:
                if leg.index not in outcome.deferred and leg.index not in item.done:
                    outcome.rejected.setdefault(leg.index, first)
        error = next((e.reason for e in (*outcome.deferred.values(), *outcome.rejected.values())), None)
        new = Outcome(
            delivered={i: v for i, v in outcome.delivered.items() if i not in item.done},
            deferred=outcome.deferred, rejected=outcome.rejected,
        )
        await self.spool.settle(item.id, new, error)
