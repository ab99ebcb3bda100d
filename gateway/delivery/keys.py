"""The idempotency keys of this process's new messages, kept in the queue store; while the store cannot be
reached (the database down, the disk failing), in a bounded in-memory backlog that answers the resends
reaching this process and is recorded in the store as soon as it is back.

The windows this leaves: a message taken while its key could not be checked in the store may be a resend
of one another instance took (counted: `smtp_gateway_idempotency_keys_late_total{result="unchecked"}`),
and a resend of it that reaches another instance before its key is recorded is not recognised; a key whose
answer was never recorded (its process died after the calls and before `finish`) is taken over by a resend
once stale, which is sent again (counted by the caller: `smtp_gateway_ambiguous_calls_total{cause=
"key_taken_over"}`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from gateway.core.errors import SpoolUnavailable
from gateway.core.waits import idle
from gateway.delivery.idempotency import KeyBacklog, LateKey
from gateway.ops.metrics import IDEMPOTENCY_LATE
from gateway.queue.store import KeyHit, KeyTakenOver, QueueStore

log = structlog.get_logger("gateway.delivery")
RECORD_EVERY = 1.0  # seconds between tries to record the backlog while the store cannot take it


class IdempotencyKeys:
    def __init__(self, store: QueueStore, window: float, stale: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.window = window  # how long a key is remembered
        self.stale = stale  # a key unanswered for this long belongs to an attempt whose process died
        self.clock = clock
        self.late = KeyBacklog()
        self._recording: asyncio.Task[None] | None = None
        self._recorded = self._dropped = 0  # since the backlog last emptied

    async def claim(
        self, account: str, key: str, msg_id: str, now: float, digest: str | None
    ) -> KeyHit | KeyTakenOver | None:
        """The earlier message with this key, or None: the key is this message's now (KeyTakenOver: it is,
        taken over from an earlier message that never answered and was never queued)."""
        try:
            return await self.store.claim_key(account, key, msg_id, now, self.window, self.stale, digest)
        except SpoolUnavailable:
            pass
        late = self.late.get(account, key)
        if late is not None and late.expires > now:
            return KeyHit(late.msg_id, late.reply_id, late.digest)
        # Taken unchecked: only this process remembers the key until the store can record it.
        IDEMPOTENCY_LATE.labels(account=account, result="unchecked").inc()
        self._keep(LateKey(account, key, msg_id, now, now + self.window, digest))
        return None

    async def finish(self, account: str, key: str, msg_id: str, reply_id: str | None, digest: str | None) -> None:
        """The message answered (`reply_id`: the id its 250 named) or was not taken (None: forget the key).
        `digest`: what the message said, as given to `claim`."""
        late = self.late.get(account, key)
        if late is not None and late.msg_id == msg_id:  # claimed while the store was down
            if reply_id is None:
                self.late.remove(late)
            else:
                late.reply_id = reply_id
                self._record_soon()
            return
        try:
            await self.store.finish_key(account, key, msg_id, reply_id)
        except SpoolUnavailable:
            if reply_id is not None:  # (not taken: the store's claim goes stale and is taken over)
                # With its digest: while the store is down, this entry alone tells a resend from another
                # message given the same key (which must get 554, not a 250 for mail never sent).
                now = self.clock()
                self._keep(LateKey(account, key, msg_id, now, now + self.window, digest, reply_id, claimed=True))

    def _keep(self, late: LateKey) -> None:
        dropped = self.late.add(late)
        if dropped is not None:
            IDEMPOTENCY_LATE.labels(account=dropped.account, result="dropped").inc()
            self._dropped += 1
        self._record_soon()

    def _record_soon(self) -> None:
        if self._recording is None or self._recording.done():
            self._recording = asyncio.ensure_future(self._record())

    async def _record(self) -> None:
        """Record the answered late keys once the store takes them, until the backlog is empty (keys still
        being delivered wait for their answer)."""
        while len(self.late):
            await self._record_answered()
            if len(self.late):
                await idle(RECORD_EVERY)
        # The late keys' whole story, once: how many were recorded, how many the bounded backlog gave up.
        log.info("idempotency_keys_recorded", recorded=self._recorded, dropped=self._dropped)
        self._recorded = self._dropped = 0

    async def _record_answered(self) -> None:
        for late in self.late.answered():
            assert late.reply_id is not None
            try:
                if late.claimed:
                    await self.store.finish_key(late.account, late.key, late.msg_id, late.reply_id)
                else:
                    await self.store.record_key(
                        late.account, late.key, late.msg_id, late.reply_id, late.created, late.expires, late.digest
                    )
            except SpoolUnavailable:
                return  # still down: the next try records them all
            self.late.remove(late)
            IDEMPOTENCY_LATE.labels(account=late.account, result="recorded").inc()
            self._recorded += 1

    async def stop(self) -> None:
        """Shutting down: one last try to record the backlog; what is left is lost with the process."""
        if self._recording is not None:
            self._recording.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recording
        await self._record_answered()
        if len(self.late):
            log.warning("idempotency_keys_not_recorded", keys=len(self.late))
