"""The PostgreSQL ledger's lock bound: a table the ledger writes held by another session (a migration, VACUUM
FULL, an operator's open transaction) fails the batch at the ledger's lock_timeout instead of holding the
writer for ever; the batch is kept and written once the lock goes, with one line for the episode."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
import structlog

from gateway.config.settings import LedgerSettings
from gateway.ledger import postgres
from gateway.ledger.model import MessageRow, Query
from gateway.ledger.store import LedgerUnavailable
from gateway.ledger.writer import LedgerWriter
from tests.devices_util import events
from tests.pgserver import PgCluster

T0 = 1_700_000_000.0


async def test_a_locked_ledger_table_fails_the_batch_at_the_bound_and_keeps_it(
    pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT", 1.0)  # 30 s in production; read when a connection is made
    url = pg_cluster.new_database()
    ledger = postgres.PostgresLedger(url)
    await ledger.open()
    writer = LedgerWriter(ledger, LedgerSettings())
    try:
        with structlog.testing.capture_logs() as logs:
            with psycopg.connect(url, autocommit=False) as locker:
                locker.execute("LOCK TABLE ledger_messages IN ACCESS EXCLUSIVE MODE")
                writer.put([MessageRow("LOCKED1", T0, "acme", "billing@acme.example", "held", 512)])
                for _ in range(2):  # still failing: kept each time, and said once
                    # wait_for: without the bound the write waits for the lock for ever (a hang, not a failure)
                    with pytest.raises(LedgerUnavailable, match="LockNotAvailable"):
                        await asyncio.wait_for(writer.flush(), 20.0)
                    assert writer.pending == 1
                locker.rollback()
            await writer.flush()
        assert writer.pending == 0
        [found] = (await ledger.find(Query(id="LOCKED1"))).records
        assert found.subject == "held"
        [failed] = events(logs, "ledger_write_failed")
        assert "LockNotAvailable" in failed["error"]
        assert len(events(logs, "ledger_write_recovered")) == 1
    finally:
        await writer.stop()
        await ledger.close()
