"""The retry worker: claims due queued messages (and expired leases) and hands each to the DeliveryOwner.

At most `concurrency` attempts per account at once. It sleeps until the next message is due, a wake-up
(something was queued, an attempt ended, a cross-instance notification) or `poll_interval`, so a `queue
retry` from another process or another instance's work is noticed. While an account is down (or refusing
our key), one queued message is made due every `probe_interval`: the first success wakes the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Sequence

import structlog

from gateway.core.errors import SpoolUnavailable
from gateway.core.waits import idle
from gateway.delivery.leaseowners import dead_local_owners
from gateway.delivery.owner import DeliveryOwner
from gateway.ops.metrics import INTERNAL_ERRORS, QUEUE_CLAIM_SECONDS

log = structlog.get_logger("gateway.queue.worker")
# How often the leases of dead processes of this instance are looked for (besides lease expiry).
DEAD_OWNER_CHECK = 5.0


class RetryWorker:
    def __init__(
        self,
        owner: DeliveryOwner,
        accounts: Sequence[str],
        concurrency: int,
        poll_interval: float,
        probe_interval: float,
    ) -> None:
        self.owner = owner
        self.store = owner.store
        self.accounts = list(accounts)
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.probe_interval = probe_interval
        self._running: dict[str, set[asyncio.Task[None]]] = {a: set() for a in self.accounts}
        # Accounts whose last claim took as many messages as it asked for: a backlog.
        self._backlog: set[str] = set()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def set_accounts(self, accounts: Sequence[str], unconfigured: Sequence[str] = ()) -> None:
        """Claim for these accounts from now on: the configured ones (changed by a reload), and `unconfigured`,
        accounts no longer configured that still have queued messages. Those are claimed on their schedule as
        any other: each attempt is deferred (DeliveryOwner: no provider), so they become dead letters at
        max_lifetime, or are delivered if their account is configured again before."""
        self.accounts = list(dict.fromkeys([*accounts, *unconfigured]))
        for account in self.accounts:
            self._running.setdefault(account, set())
        self.owner.wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="queue-retry-worker")

    async def stop(self) -> None:
        """Stop claiming. The attempts already running belong to the owner (DeliveryOwner.stop)."""
        self._stopping = True
        self.owner.wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        log.info("retry_worker_stopped")

    async def _loop(self) -> None:
        next_check = 0.0
        while not self._stopping:
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + DEAD_OWNER_CHECK
                with contextlib.suppress(SpoolUnavailable):
                    await self._expire_dead_local_owners()
            try:
                await self._tick()
                if self._failing:
                    self._failing = False
                    log.info("queue_available_again")
            except SpoolUnavailable as exc:
                if not self._failing:  # once per outage, not once per poll
                    self._failing = True
                    log.error("queue_unavailable", error=exc.reason)
                await idle(self.poll_interval)
            except Exception as exc:
                INTERNAL_ERRORS.labels(where="retry_worker").inc()
                log.error("retry_worker_internal_error", exc_info=exc)
                await idle(self.poll_interval)

    async def _tick(self) -> None:
        wakeup = self.owner.wakeup
        wakeup.clear()  # anything set from here on wakes the wait below
        owner, now, with_room = self.owner, time.time(), []
        for account in self.accounts:
            free = self.concurrency - len(self._running[account])
            if free <= 0 or (account in self._backlog and free < max(1, self.concurrency // 2)):
                # With a backlog, claim again once half the slots are free, not for every slot: each claim is
                # a transaction (on SQLite an fsync), and one per message capped the drain of a backlog.
                continue
            if owner.health.needs_probe(account, self.probe_interval):
                await self.store.wake(account, now, limit=1)
            started = time.perf_counter()
            claimed = await self.store.claim(owner.owner, account, now, free, owner.settings.lease_seconds)
            QUEUE_CLAIM_SECONDS.observe(time.perf_counter() - started)
            for item in claimed:
                task = owner.start_claimed(item)
                self._running[account].add(task)
                task.add_done_callback(functools.partial(self._finished, account))
            if len(claimed) < free:
                self._backlog.discard(account)
                with_room.append(account)
            else:
                self._backlog.add(account)
        timeout = self.poll_interval
        if with_room:
            due = await self.store.next_due(with_room)
            if due is not None:
                timeout = min(timeout, max(due - time.time(), 0.0))
            if timeout <= 0:
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), timeout)

    def _finished(self, account: str, task: asyncio.Task[None]) -> None:
        self._running[account].discard(task)
        self.owner.wakeup.set()

    async def _expire_dead_local_owners(self) -> None:
        """Leases of processes of this instance (host) that are gone (killed, crashed) end now, not after
        lease_seconds: a restarted gateway or a surviving sibling process resumes their messages at once.
        Another instance's owners are left to their leases: their processes cannot be seen from here."""
        dead = dead_local_owners(self.owner.owner, await self.store.owners())
        if dead:
            count = await self.store.expire_owners(dead, time.time())
            if count:  # their messages wait for a claim; the next look finds their leases already over
                log.warning("queue_dead_owners_expired", owners=dead, messages=count)
