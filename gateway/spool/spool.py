"""The async face of the spool: durable enqueue before the 250, per-leg settlement, on one DB thread.

Every SQLite call runs on a single dedicated thread (never on the event loop). Any SQLite error while
accepting a message (disk full, read-only file system, I/O error) becomes SpoolUnavailable: 452 4.3.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from gateway.delivery import Outcome
from gateway.errors import SpoolUnavailable
from gateway.model import Submission
from gateway.settings import DeliverySettings
from gateway.spool import codec
from gateway.spool.store import Claimed, LegRow, RetryPolicy, SpoolStore

log = structlog.get_logger("gateway.spool")
T = TypeVar("T")


def new_id() -> str:
    """A local queue id: 16 upper-case hex digits (distinct from the upstream's UUID eeids)."""
    return secrets.token_hex(8).upper()


class Spool:
    def __init__(self, settings: DeliverySettings, *, max_page_count: int | None = None) -> None:
        self.settings = settings
        self.policy = RetryPolicy(tuple(settings.retry_schedule), settings.retry_jitter, settings.max_lifetime)
        self.rng = random.Random()
        self.wakeup = asyncio.Event()  # set when something became due sooner than the worker expects
        self._max_page_count = max_page_count
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-db")
        self._store: SpoolStore | None = None
        self._recovered: list[tuple[str, str | None]] = []
        self._background: set[asyncio.Task[None]] = set()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    @property
    def store(self) -> SpoolStore:
        assert self._store is not None, "Spool.open() first"
        return self._store

    async def open(self) -> list[tuple[str, str | None]]:
        """Open (creating) the file; calls that were in flight at the last stop are due again. Returns (id, batch eeid).

        A spool that cannot be opened (read-only or full file system) does not stop the server: the healthy
        path needs no spool, and every message that would need it is answered 452 4.3.1 until it can be
        opened (retried on each use)."""
        try:
            await self._ensure()
        except SpoolUnavailable:
            return []
        return self._recovered

    async def _ensure(self) -> SpoolStore:
        if self._store is not None:
            return self._store
        path = self.settings.spool_path
        try:
            store = await self._run(functools.partial(SpoolStore, path, max_page_count=self._max_page_count))
            recovered = await self._run(store.recover, time.time())
        except (sqlite3.Error, OSError) as exc:
            log.error("spool_unavailable", path=str(path), error=f"{type(exc).__name__}: {exc}")
            raise SpoolUnavailable(f"spool cannot be opened: {exc}") from exc
        self._store, self._recovered = store, recovered
        if recovered:
            # The at-least-once window: these calls may have reached the upstream before the process died.
            log.warning("spool_recovered_inflight", count=len(recovered), queue_ids=[i for i, _ in recovered],
                        batch_eeids=[b for _, b in recovered if b])
        log.info("spool_opened", path=str(path))
        return store

    async def close(self, timeout: float = 10.0) -> None:
        """Let calls still running for already-answered messages record their results, then close."""
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._store is not None:
            await self._run(self._store.close)
            self._store = None
        self._executor.shutdown(wait=True)

    # -- the pipeline's side (gateway.pipeline.Spool) ------------------------------------------------

    async def enqueue(
        self, submission: Submission, outcome: Outcome, inflight: Awaitable[Outcome] | None = None
    ) -> str:
        """Persist (fsync'd) the message with its per-leg state; return the local id. Raises SpoolUnavailable.

        With `inflight`, the legs not in `outcome` are being sent right now: the message is stored as
        in flight and the call's result is recorded when it finishes (delivered legs are never resent)."""
        msg_id = new_id()
        now = time.time()
        legs = []
        for leg in submission.legs:
            recipients = ",".join(leg.recipients)
            if leg.index in outcome.delivered:
                legs.append(LegRow(leg.index, recipients, "done", upstream_id=outcome.delivered[leg.index]))
            elif leg.index in outcome.rejected:
                legs.append(LegRow(leg.index, recipients, "rejected", error=outcome.rejected[leg.index].reason))
            else:
                legs.append(LegRow(leg.index, recipients, "pending"))
        error = _first_reason(outcome)
        pending = any(r.state == "pending" for r in legs)
        dead_reason = None
        if inflight is not None:
            state, attempts, next_attempt = "inflight", 0, now
        elif pending:
            state, attempts, next_attempt = "queued", 1, now + self.policy.delay(1, self.rng)
        else:  # some legs delivered, the others refused for good: a dead letter right away
            state, attempts, next_attempt = "dead", 1, now
            dead_reason = "refused by upstream: " + "; ".join(
                f"leg {r.leg} ({r.recipients}): {r.error}" for r in legs if r.state == "rejected")
        store = await self._ensure()
        try:
            blob = codec.encode(submission)
            await self._run(functools.partial(
                store.insert, msg_id=msg_id, account=submission.principal.account, state=state,
                created=now, expires=now + self.policy.max_lifetime, next_attempt=next_attempt,
                attempts=attempts, batch_eeid=submission.batch_eeid or outcome.first_id,
                mail_from=submission.mail_from, subject=submission.message.subject, submission=blob,
                legs=legs, last_error=error, dead_reason=dead_reason,
            ))
        except (sqlite3.Error, OSError) as exc:
            log.error("spool_write_failed", error=f"{type(exc).__name__}: {exc}", path=str(self.settings.spool_path))
            raise SpoolUnavailable(f"spool not writable: {exc}") from exc
        if dead_reason:
            log.error("message_dead_lettered", queue_id=msg_id, reason=dead_reason)
        if inflight is not None:
            task = asyncio.ensure_future(self._finish_inflight(msg_id, inflight))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self.wakeup.set()
        return msg_id

    async def _finish_inflight(self, msg_id: str, call: Awaitable[Outcome]) -> None:
        try:
            outcome = await call
        except asyncio.CancelledError:
            # Shutting down: the row stays 'inflight' and is resumed (possibly resent) at the next start.
            raise
        except Exception as exc:
            log.error("inflight_call_failed", queue_id=msg_id, error=f"{type(exc).__name__}: {exc}")
            outcome = Outcome()
            error: str | None = f"{type(exc).__name__}: {exc}"
        else:
            error = _first_reason(outcome)
        await self.settle(msg_id, outcome, error)

    # -- the worker's side ----------------------------------------------------------------------------

    async def claim(self, account: str, limit: int) -> list[Claimed]:
        try:
            store = await self._ensure()
        except SpoolUnavailable:
            return []
        return await self._run(store.claim, account, time.time(), limit)

    async def next_due(self, accounts: Sequence[str]) -> float | None:
        if self._store is None:
            return None
        return await self._run(self._store.next_due, accounts)

    async def settle(self, msg_id: str, outcome: Outcome, error: str | None) -> str:
        rejected = {i: exc.reason for i, exc in outcome.rejected.items()}
        for attempt in range(5):
            try:
                state = await self._run(
                    self.store.settle, msg_id, dict(outcome.delivered), rejected, error, time.time(), self.policy,
                    self.rng,
                )
                break
            except sqlite3.Error as exc:
                # The result is only in memory now: keep trying briefly; if it never lands, the row stays
                # 'inflight' and is resumed at the next start (delivered legs may then be sent again).
                log.error("spool_settle_failed", queue_id=msg_id, error=str(exc), attempt=attempt)
                await asyncio.sleep(0.2 * (attempt + 1))
        else:
            return "unrecorded"
        event = {"done": "message_delivered", "queued": "message_retry_scheduled",
                 "dead": "message_dead_lettered", "gone": "message_deleted_meanwhile"}[state]
        level = log.error if state == "dead" else log.info
        level(event, queue_id=msg_id, delivered=sorted(outcome.delivered), error=error)
        if state == "queued":
            self.wakeup.set()
        return state

    async def dead_letter_corrupt(self, msg_id: str, reason: str) -> None:
        def kill(store: SpoolStore) -> None:
            with contextlib.suppress(sqlite3.Error), store._tx() as db:
                store._kill(db, msg_id, reason, time.time(), 0, reason)

        await self._run(kill, self.store)
        log.error("message_dead_lettered", queue_id=msg_id, reason=reason)


def _first_reason(outcome: Outcome) -> str | None:
    for exc in (*outcome.deferred.values(), *outcome.rejected.values()):
        return exc.reason
    return None
