"""PostgreSQL queue busy, not down: another session holds a lock on the queue's `messages` table (a migration,
VACUUM FULL, an operator's open transaction). A message that needs the queue gets 452 once the server cancels
the statement at the queue's lock_timeout (as SQLite's busy timeout), nothing is written for it after its
452 (its resend is not a duplicate), the circuit stays closed, and the next message after the lock is 250."""

from __future__ import annotations

import smtplib
from collections.abc import Callable

import psycopg
import pytest
import structlog

from gateway.core.errors import QueueBusy
from gateway.queue import postgres
from tests.devices_util import events
from tests.harness import Running
from tests.pgserver import PgCluster
from tests.queue_contract import new
from tests.spool_helpers import send

FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 2.0}


def test_locked_queue_table_gets_452_then_250_and_nothing_written_after_the_452(
    gateway_factory: Callable[..., Running], pg_cluster: PgCluster
) -> None:
    url = pg_cluster.new_database()
    gw = gateway_factory(delivery={**FAST, "queue_url": url})
    gw.fault(status=503, count=None)  # every message needs the queue
    with structlog.testing.capture_logs() as logs:
        with psycopg.connect(url, autocommit=False) as locker:
            locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            try:
                code, text = send(gw.port(), "while locked")
            except (TimeoutError, smtplib.SMTPServerDisconnected) as exc:  # the hang this test is about
                pytest.fail(f"no reply while the queue table is locked ({type(exc).__name__})")
            assert code == 452, (code, text)
            locker.rollback()  # the lock goes: had the insert waited, its row would be written now
        assert send(gw.port(), "after the lock")[0] == 250
    [slow] = events(logs, "queue_database_slow")
    assert slow["bound"] == "lock_timeout"
    assert not events(logs, "queue_database_unreachable")  # it answered all along: not an outage
    assert len(events(logs, "queue_database_served")) == 1
    with psycopg.connect(url) as db:
        rows = db.execute("SELECT count(*) FROM messages").fetchone()
    assert rows == (1,)  # the 250's message only: the 452's was rolled back, not written once the lock went


async def test_an_exhausted_pool_is_busy_not_unreachable(
    pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pooled connection in use, the database answering: 452 (QueueBusy) with its own line, once per
    episode; the unreachable circuit stays closed (no queue_database_unreachable / _back flapping)."""
    monkeypatch.setattr(postgres, "POOL_WAIT", 2.0)  # the wait for a pooled connection, shortened
    queue = postgres.PostgresQueue(pg_cluster.new_database(), max_connections=1)
    await queue.open()
    try:
        with structlog.testing.capture_logs() as logs:
            async with queue._tx():  # the only pooled connection, held (as by a session waiting for a lock)
                for _ in range(2):
                    with pytest.raises(QueueBusy, match="pooled connections in use"):
                        await queue.counts(0.0)
            assert await queue.counts(0.0) == {}  # served at once: no circuit was opened
    finally:
        await queue.close()
    assert not events(logs, "queue_database_unreachable")
    assert not events(logs, "queue_database_back")
    [exhausted] = events(logs, "queue_pool_exhausted")  # one line for the episode, not one per refusal
    assert exhausted["connections"] == 1
    [available] = events(logs, "queue_pool_available")
    assert available["refused"] == 2


async def test_an_exhausted_pool_makes_this_instance_unready_a_slow_database_only_degraded(
    pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz: every pooled connection of this instance in use is its own overload (another instance can store
    the message: unready), while the shared database cancelling at lock_timeout is every instance's (degraded,
    still ready: docs/operations/health.md)."""
    monkeypatch.setattr(postgres, "POOL_WAIT", 1.0)
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT", 0.5)
    monkeypatch.setattr(postgres, "STATEMENT_TIMEOUT", 1.0)
    url = pg_cluster.new_database()
    queue = postgres.PostgresQueue(url, max_connections=1)
    await queue.open()
    try:
        async with queue._tx():  # the only pooled connection, held
            with pytest.raises(QueueBusy, match="pooled connections in use"):
                await queue.insert(new("0" * 16))
        assert "cannot store new messages" in queue.health.problems()[0] and not queue.health.degraded()
        with psycopg.connect(url, autocommit=False) as locker:
            locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(QueueBusy):
                await queue.insert(new("1" * 16))
            locker.rollback()
        assert queue.health.problems() == [] and "cannot store new messages" in queue.health.degraded()[0]
        await queue.insert(new("2" * 16))
        assert queue.health.problems() == queue.health.degraded() == []
    finally:
        await queue.close()
