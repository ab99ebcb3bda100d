"""LedgerWriter: ledger rows go into a bounded in-process buffer and a task writes them in batches, so
recording a message never waits for the database and never delays its SMTP reply.

The window: rows still in the buffer are lost if the process is killed (SIGKILL, OOM, power loss): at
most `ledger.flush_interval` seconds of records (more while the database is unreachable). The messages
themselves are not: the queue's guarantees do not depend on the ledger. A graceful stop writes what is
left. When the buffer is full (`ledger.buffer` rows, the database too slow or away) the oldest rows are
dropped, counted in smtp_gateway_ledger_dropped_rows_total and logged once per episode.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Sequence

import structlog

from gateway.config import LedgerSettings
from gateway.core.waits import woken
from gateway.ledger.model import EventRow, MessageRow, NoticeRow, OutboxRow, RecipientRow, Row, SuppressionRow
from gateway.ledger.store import LedgerStore, LedgerUnavailable
from gateway.ops.metrics import (
    INTERNAL_ERRORS,
    LEDGER_BATCHES,
    LEDGER_BUFFERED,
    LEDGER_DROPPED,
    LEDGER_FLUSH_SECONDS,
    LEDGER_ROWS,
    LEDGER_WRITE_ERRORS,
)

log = structlog.get_logger("gateway.ledger")

# Rows per transaction at most; a buffer this full is written at once instead of at the next interval.
# Larger batches cost less per row (the indexes' pages are written once per commit, not once per row).
MAX_BATCH = 5000
EARLY = 2000
# While the database fails, wait this long between tries (the buffer keeps filling, bounded).
RETRY_MAX = 5.0
_TABLE: dict[type, str] = {
    MessageRow: "message",
    RecipientRow: "recipient",
    EventRow: "event",
    OutboxRow: "outbox",
    SuppressionRow: "suppression",
    NoticeRow: "notice",
}


class LedgerWriter:
    def __init__(self, store: LedgerStore, settings: LedgerSettings) -> None:
        self.store = store
        self.settings = settings
        self._rows: deque[Row] = deque()
        self._wake = asyncio.Event()
        self._dropping = 0  # rows dropped in the current episode of a full buffer
        self._failing: str | None = None  # the database's last error, while it fails
        self._writing = asyncio.Lock()  # one batch at a time, in order; flush() waits for the one running
        self._task: asyncio.Task[None] | None = None

    def configure(self, settings: LedgerSettings) -> None:
        self.settings = settings

    def put(self, rows: Sequence[Row]) -> None:
        """Queue rows for writing. Never blocks, never raises: past the bound the oldest rows go."""
        buffer = self._rows
        buffer.extend(rows)
        over = len(buffer) - self.settings.buffer
        if over > 0:
            for _ in range(over):
                buffer.popleft()
            LEDGER_DROPPED.inc(over)
            if not self._dropping:
                log.warning(
                    "ledger_buffer_full",
                    buffer=self.settings.buffer,
                    effect="the oldest ledger rows are dropped until the database keeps up; messages are unaffected",
                )
            self._dropping += over
        LEDGER_BUFFERED.set(len(buffer))  # what waits now, whether or not the database is writing
        if len(buffer) >= EARLY:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        delay = self.settings.flush_interval
        while True:
            await woken(self._wake, delay)
            delay = self.settings.flush_interval
            while self._rows:
                if not await self._flush():
                    delay = min(RETRY_MAX, max(delay, self.settings.flush_interval) * 2)
                    break
                if len(self._rows) < EARLY:
                    break

    async def _flush(self) -> bool:
        """Write one batch from the front of the buffer; False when the database failed (rows kept)."""
        async with self._writing:
            return await self._write_batch()

    async def _write_batch(self) -> bool:
        buffer = self._rows
        if not buffer:
            return True
        if len(buffer) <= MAX_BATCH:
            batch = list(buffer)
            buffer.clear()
        else:
            batch = [buffer.popleft() for _ in range(MAX_BATCH)]
        LEDGER_BUFFERED.set(len(buffer))
        started = time.perf_counter()
        try:
            await self.store.write(batch)
        except LedgerUnavailable as exc:
            LEDGER_WRITE_ERRORS.inc()
            buffer.extendleft(reversed(batch))  # first again; the bound still holds on the next put
            LEDGER_BUFFERED.set(len(buffer))  # the batch waits again: an outage shows as a growing figure
            if self._failing is None:
                log.error("ledger_write_failed", error=exc.reason, buffered=len(buffer), effect="kept, tried again")
            self._failing = exc.reason
            return False
        except Exception as exc:  # a bug: once with its traceback; the batch is not tried forever
            INTERNAL_ERRORS.labels(where="ledger_writer").inc()
            LEDGER_DROPPED.inc(len(batch))
            log.error("ledger_write_internal_error", rows=len(batch), exc_info=exc)
            return True
        LEDGER_FLUSH_SECONDS.observe(time.perf_counter() - started)
        LEDGER_BATCHES.inc()
        for kind, n in Counter(map(type, batch)).items():  # on the loop: counted without a Python loop per row
            LEDGER_ROWS.labels(table=_TABLE.get(kind, "recipient")).inc(n)
        if self._failing is not None:
            log.info("ledger_write_recovered", buffered=len(buffer))
            self._failing = None
        if self._dropping and len(buffer) < self.settings.buffer // 2:
            log.info("ledger_buffer_ok", dropped=self._dropping)
            self._dropping = 0
        return True

    async def flush(self) -> None:
        """Write everything buffered now, after the batch being written (if any); the graceful stop and
        `status` right after a send rely on it. Raises LedgerUnavailable."""
        while True:
            if not await self._flush():
                raise LedgerUnavailable(self._failing or "ledger write failed")
            if not self._rows:
                return

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the task and write what is left within `timeout`; rows that cannot be written are counted."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except (LedgerUnavailable, TimeoutError) as exc:
            left = len(self._rows)
            LEDGER_DROPPED.inc(left)
            log.error("ledger_rows_lost_at_stop", rows=left, error=str(exc) or "timed out")
            self._rows.clear()
        LEDGER_BUFFERED.set(0)
