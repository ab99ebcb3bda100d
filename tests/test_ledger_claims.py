"""docs/after-250.md on the ledger's writer and retention: a graceful stop that cannot write what is left
(the database down, or past its 5 s) counts those rows as dropped and logs `ledger_rows_lost_at_stop` once;
a full buffer logs `ledger_buffer_full` once per episode and `ledger_buffer_ok` with the episode's count when
it has drained below half; retention counts what it deletes in smtp_gateway_ledger_pruned_total and logs
`ledger_pruned`. A real SQLite ledger; the failing one fails its writes as a database that is down does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config.settings import LedgerSettings
from gateway.ledger import retention
from gateway.ledger.model import MessageRow, Query, Row
from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.store import LedgerUnavailable
from gateway.ledger.writer import LedgerWriter
from gateway.ops.metrics import LEDGER_BUFFERED, LEDGER_DROPPED, LEDGER_PRUNED
from tests.devices_util import events

T0 = 1_796_544_000.0


class DownLedger(SqliteLedger):
    """A SQLite ledger whose writes fail while `down` is set."""

    down = False

    async def write(self, rows: Sequence[Row]) -> None:
        if self.down:
            raise LedgerUnavailable("OperationalError: disk I/O error")
        await super().write(rows)


def _rows(prefix: str, n: int, created: float = T0) -> list[Row]:
    return [MessageRow(f"{prefix}{i}", created, "acme", "billing@acme.example", "Invoice", 512) for i in range(n)]


async def _ledger(tmp_path: Path) -> DownLedger:
    ledger = DownLedger(tmp_path / "queue.sqlite3")
    await ledger.open()
    return ledger


@pytest.mark.asyncio
async def test_rows_a_graceful_stop_cannot_write_are_counted_and_logged_once(tmp_path: Path) -> None:
    ledger = await _ledger(tmp_path)
    writer = LedgerWriter(ledger, LedgerSettings())
    try:
        ledger.down = True
        writer.put(_rows("LOST", 3))
        dropped = LEDGER_DROPPED._value.get()
        with capture_logs() as logs:
            await writer.stop(timeout=5.0)
        [lost] = events(logs, "ledger_rows_lost_at_stop")
        assert lost["rows"] == 3 and "disk I/O error" in lost["error"]
        assert LEDGER_DROPPED._value.get() == dropped + 3
        assert writer.pending == 0
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_the_buffered_gauge_counts_the_rows_waiting_through_an_outage(tmp_path: Path) -> None:
    """smtp_gateway_ledger_buffered_rows says the rows waiting at every moment: after put(), and after a failed
    write puts its batch back (it read 0 for a whole outage of fewer than MAX_BATCH rows)."""
    ledger = await _ledger(tmp_path)
    writer = LedgerWriter(ledger, LedgerSettings())
    try:
        ledger.down = True
        writer.put(_rows("W", 20))
        assert LEDGER_BUFFERED._value.get() == 20
        with capture_logs(), pytest.raises(LedgerUnavailable):
            await writer.flush()  # fails: the batch goes back
        assert writer.pending == 20
        assert LEDGER_BUFFERED._value.get() == 20
        writer.put(_rows("X", 5))
        assert LEDGER_BUFFERED._value.get() == 25
        ledger.down = False
        await writer.flush()
        assert LEDGER_BUFFERED._value.get() == 0
    finally:
        await writer.stop()
        await ledger.close()


@pytest.mark.asyncio
async def test_a_full_buffer_is_logged_once_an_episode_and_its_end_with_the_rows_dropped(tmp_path: Path) -> None:
    ledger = await _ledger(tmp_path)
    writer = LedgerWriter(ledger, LedgerSettings(buffer=1000))
    try:
        dropped = LEDGER_DROPPED._value.get()
        with capture_logs() as logs:
            writer.put(_rows("A", 1000))
            writer.put(_rows("B", 10))  # 10 over: the oldest go
            writer.put(_rows("C", 5))  # still full: the same episode, not logged again
            assert writer.pending == 1000
            await writer.flush()  # written: below half, the episode ends
            writer.put(_rows("D", 1001))  # a second episode
            await writer.flush()
        assert LEDGER_DROPPED._value.get() == dropped + 16
        assert len(events(logs, "ledger_buffer_full")) == 2
        assert [e["dropped"] for e in events(logs, "ledger_buffer_ok")] == [15, 1]
        assert (await ledger.find(Query(id="A0"))).records == []  # the oldest were the ones dropped
        assert len((await ledger.find(Query(id="C4"))).records) == 1
    finally:
        await writer.stop()
        await ledger.close()


@pytest.mark.asyncio
async def test_retention_counts_and_logs_what_it_prunes(tmp_path: Path) -> None:
    ledger = await _ledger(tmp_path)
    try:
        await ledger.write([*_rows("OLD", 7, created=T0 - 10 * 86400), *_rows("NEW", 2, created=T0 - 3600)])
        pruned = LEDGER_PRUNED._value.get()
        with capture_logs() as logs:
            assert await retention.prune(ledger, 7 * 86400, T0, batch=3) == 7  # in batches of 3, 3 and 1
            assert await retention.prune(ledger, 7 * 86400, T0) == 0  # nothing more: not logged
        assert LEDGER_PRUNED._value.get() == pruned + 7
        [line] = events(logs, "ledger_pruned")
        assert line["messages"] == 7
        assert len((await ledger.find(Query(id="NEW1"))).records) == 1
    finally:
        await ledger.close()
