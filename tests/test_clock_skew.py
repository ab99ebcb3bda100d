"""This instance's clock against the shared PostgreSQL queue's: measured at every queue-stats poll, exported
as a gauge, logged once when it passes the bound (a skewed instance takes over its siblings' live leases)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from gateway.core.errors import SpoolUnavailable
from gateway.ledger.model import MessageRow, NoticeRow, OutboxRow, RecipientRow
from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.sqlite_returns import SqliteReturns
from gateway.ops.clockskew import CLOCK_OFFSET, ClockWatch
from gateway.ops.metrics import REGISTRY
from gateway.queue.sqlite import SqliteQueue
from tests.harness import Running
from tests.pgserver import PgCluster
from tests.queue_contract import new
from tests.spool_helpers import wait_for


def offset_gauge() -> float | None:
    return REGISTRY.get_sample_value("smtp_gateway_queue_clock_offset_seconds")


def test_a_skew_is_said_once_when_it_begins_and_once_when_it_ends() -> None:
    watch = ClockWatch(bound=10.0)
    with structlog.testing.capture_logs() as logs:
        for offset in (0.2, -0.3, 120.0, 121.0, 119.5, 0.4, -0.1):
            watch.observe(offset)
    assert [(e["event"], e["log_level"], e["offset"]) for e in logs] == [
        ("queue_clock_skew", "error", 120.0),
        ("queue_clock_skew_over", "info", 0.4),
    ]
    assert offset_gauge() == -0.1
    with structlog.testing.capture_logs() as logs:
        watch.observe(-30.0)  # behind counts too: its leases are the ones taken over
    assert [e["event"] for e in logs] == ["queue_clock_skew"]


def test_a_gateway_measures_its_clock_against_the_queue_database(
    gateway_factory: Callable[..., Running], pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.app.QUEUE_STATS_EVERY", 0.1)
    CLOCK_OFFSET.set(float("nan"))  # not an earlier test's figure
    gateway_factory(delivery={"queue_url": pg_cluster.new_database()})
    # Same host, same clock: within the round trip (far under a second).
    wait_for(lambda: ((g := offset_gauge()) is not None and abs(g) < 1.0) or None, 10, "a measured offset")
    with structlog.testing.capture_logs() as logs:
        # This host's clock 2 minutes ahead, as the queue backend reads it (through gateway/core/dbclock.py,
        # its only use of time.time).
        monkeypatch.setattr(
            "gateway.core.dbclock.time", SimpleNamespace(time=lambda: time.time() + 120.0, monotonic=time.monotonic)
        )
        wait_for(lambda: any(e["event"] == "queue_clock_skew" for e in logs) or None, 10, "the skew logged")
    assert 119.0 < (offset_gauge() or 0.0) < 121.0
    [skew] = [e for e in logs if e["event"] == "queue_clock_skew"]
    assert skew["log_level"] == "error" and 119.0 < skew["offset"] < 121.0 and skew["bound"] == 10.0


@pytest.mark.asyncio
async def test_a_wall_clock_step_on_sqlite_renews_and_reaps_no_live_lease(tmp_path: Path) -> None:
    """SQLite's leases are on the host's wall clock: a forward step of it by more than a lease (NTP's makestep,
    a VM resumed) made every live lease look expired, and the first claim reaped them before the heartbeats
    renewed them (queue3 F3). Two processes on one queue file, fake clocks, the wall clock stepped: the
    process that sees the step renews its own leases and reaps nothing until a heartbeat interval has passed;
    then a lease nobody renewed (a dead process's) is reaped as before."""
    path = tmp_path / "queue.db"
    t0, lease = 1_800_000_000.0, 30.0
    mono, wall = [100.0], [t0]
    clocks: dict[str, Any] = {"wall": lambda: wall[0], "monotonic": lambda: mono[0]}
    a, b = SqliteQueue(path, **clocks), SqliteQueue(path, **clocks)

    def tick(seconds: float, step: float = 0.0) -> float:
        """Both clocks on by `seconds`, the wall clock by `step` more; the wall clock's now."""
        mono[0] += seconds
        wall[0] += seconds + step
        return wall[0]

    try:
        await a.insert(new("AAAAAAAAAAAAAAAA", t0, owner="A"))  # live: A's heartbeat renews it
        await a.insert(new("BBBBBBBBBBBBBBBB", t0, owner="B"))  # B's own
        await a.insert(new("CCCCCCCCCCCCCCCC", t0, owner="C"))  # a dead process's
        assert await b.claim("B", "acme", t0, 10, lease) == []  # B's first reading of the wall clock
        stepped = tick(1.0, step=3600.0)  # one second later by the monotonic clock, an hour by the wall clock
        with structlog.testing.capture_logs() as logs:
            assert await b.claim("B", "acme", stepped, 10, lease) == []  # nothing reaped
        [seen] = [e for e in logs if e["event"] == "queue_clock_stepped"]
        assert seen["renewed"] == 1 and seen["step"] == 3600.0
        own = await b.show("BBBBBBBBBBBBBBBB")
        assert own is not None and own["lease_until"] == stepped + lease  # B's lease renewed at once
        # A sees the step too: its heartbeat renews its leases onto the stepped clock.
        now = tick(lease / 3)
        await a.renew("A", now + lease)
        assert await b.claim("B", "acme", now, 10, lease) == []  # still within the hold
        now = tick(lease / 2)  # the hold is over: only the lease nobody renewed is taken over
        claimed = await b.claim("B", "acme", now, 10, lease)
        assert [c.id for c in claimed] == ["CCCCCCCCCCCCCCCC"]
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_a_wall_clock_step_on_sqlite_takes_over_no_live_return_path_lease(tmp_path: Path) -> None:
    """The ledger's return path on SQLite has leases of its own on the host's wall clock (a notice decision's
    120 s, a webhook POST's timeout and a margin, an event cursor's), renewed by nobody while the work runs: a
    forward step of the clock by a lease made them look expired and the next claim, in any process, took
    them over (the notice or the webhook POST sent twice). Two processes on one ledger file, fake clocks, the
    wall clock stepped: the process that sees it takes over none of them for one lease of each kind (not half
    of one, as the queue, whose heartbeats renew), while new notices are still claimed; then the leases
    nobody settled (a dead process's) are taken over as before, each kind after its own lease."""
    path = tmp_path / "queue.sqlite3"
    t0, notice_lease, hook_lease, cursor_lease = 1_800_000_000.0, 120.0, 40.0, 60.0
    mono, wall = [100.0], [t0]
    clocks: dict[str, Any] = {"wall": lambda: wall[0], "monotonic": lambda: mono[0]}
    ledger_a, ledger_b = SqliteLedger(path), SqliteLedger(path)
    a, b = SqliteReturns(ledger_a, **clocks), SqliteReturns(ledger_b, **clocks)

    def tick(seconds: float, step: float = 0.0) -> float:
        """Both clocks on by `seconds`, the wall clock by `step` more; the wall clock's now."""
        mono[0] += seconds
        wall[0] += seconds + step
        return wall[0]

    def sent(msg_id: str, at: float) -> list[Any]:
        return [
            MessageRow(msg_id, at, "acme", "billing@acme.example", "Invoice", 100),
            RecipientRow(msg_id, at, "a@example.com", "bounced", at + 1, upstream_id=f"U-{msg_id}"),
            NoticeRow(msg_id, at, "a@example.com", at + 1),
        ]

    try:
        await ledger_a.open()
        await ledger_a.write([*sent("M1", t0), OutboxRow("app", "ev1", "M1", t0, t0, "bounced", "{}")])
        # A takes the notice decision, the webhook delivery and the event cursor: its work runs.
        assert [c.msg_id for c in await a.claim_notices("A", t0, notice_lease, 10)] == ["M1"]
        assert [d.event_id for d in await a.claim_deliveries("A", t0, 10, hook_lease)] == ["ev1"]
        cursor, _ = await a.lease_cursor("acme", "acme", "A", t0, cursor_lease, t0)
        assert cursor is not None
        assert await b.claim_notices("B", t0, notice_lease, 10) == []  # B's first reading of the wall clock
        stepped = tick(1.0, step=3600.0)  # one second later by the monotonic clock, an hour by the wall clock
        await ledger_a.write(sent("M2", stepped))  # new work, after the step
        with structlog.testing.capture_logs() as logs:
            assert [c.msg_id for c in await b.claim_notices("B", stepped, notice_lease, 10)] == ["M2"]
            assert await b.claim_deliveries("B", stepped, 10, hook_lease) == []
            busy, _ = await b.lease_cursor("acme", "acme", "B", stepped, cursor_lease, stepped)
        assert busy is None
        [seen] = [e for e in logs if e["event"] == "return_path_clock_stepped"]
        assert seen["log_level"] == "warning" and seen["step"] == 3600.0 and seen["seen_by"] == "notice"
        now = tick(notice_lease / 2)  # half a lease: enough for the queue (renewed), not for these
        assert await b.claim_notices("B", now, notice_lease, 10) == []
        [hook] = await b.claim_deliveries("B", now, 10, hook_lease)  # the webhook's own lease (40 s) is over
        assert hook.event_id == "ev1" and hook.reclaimed
        taken, _ = await b.lease_cursor("acme", "acme", "B", now, cursor_lease, now)  # and the cursor's (60 s)
        assert taken is not None and taken.token > cursor.token
        now = tick(notice_lease / 2)  # a whole notice lease since the step: A's decision, never settled, is B's
        [notice] = await b.claim_notices("B", now, notice_lease, 10)
        assert notice.msg_id == "M1"
    finally:
        await ledger_a.close()
        await ledger_b.close()


class _Clocks:
    """A fake wall clock and monotonic clock for SqliteQueue (wallstep.py reads both; nothing sleeps)."""

    def __init__(self, t0: float) -> None:
        self.wall, self.mono = t0, 100.0

    def tick(self, seconds: float, step: float = 0.0) -> float:
        """Both clocks on by `seconds`, the wall clock by `step` more; the wall clock's now."""
        self.mono += seconds
        self.wall += seconds + step
        return self.wall

    def queue(self, path: Path) -> SqliteQueue:
        return SqliteQueue(path, wall=lambda: self.wall, monotonic=lambda: self.mono)


@pytest.mark.asyncio
async def test_a_step_before_a_process_first_claims_is_seen_at_that_claim(tmp_path: Path) -> None:
    """Review today8a F5: the first reading was taken at the first claim, so a step between the process's
    start and that claim was its baseline: its own live lease, looking expired, was reaped by itself."""
    t0, lease = 1_800_000_000.0, 30.0
    clocks = _Clocks(t0)
    b = clocks.queue(tmp_path / "queue.db")  # started (its first reading) before the step
    try:
        await b.insert(new("BBBBBBBBBBBBBBBB", t0, owner="B"))
        stepped = clocks.tick(1.0, step=3600.0)
        with structlog.testing.capture_logs() as logs:
            assert await b.claim("B", "acme", stepped, 10, lease) == []  # its own live lease not reaped
        [seen] = [e for e in logs if e["event"] == "queue_clock_stepped"]
        assert seen["renewed"] == 1
    finally:
        await b.close()


@pytest.mark.asyncio
async def test_a_step_whose_renewal_failed_is_renewed_at_the_next_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review today8a F5: the step was consumed when it was read, so a renewal the queue refused (busy) was
    never tried again: the process's live leases stayed expired on the stepped clock, to be reaped once the
    hold was over."""
    t0, lease = 1_800_000_000.0, 30.0
    clocks = _Clocks(t0)
    b = clocks.queue(tmp_path / "queue.db")
    try:
        await b.insert(new("BBBBBBBBBBBBBBBB", t0, owner="B"))
        assert await b.claim("B", "acme", t0, 10, lease) == []
        real = b._renew_all
        busy = [True]

        def renew_all(owner: str, lease_until: float) -> int:
            if busy.pop() if busy else False:
                raise sqlite3.OperationalError("database is locked")
            return real(owner, lease_until)

        monkeypatch.setattr(b, "_renew_all", renew_all)
        stepped = clocks.tick(1.0, step=3600.0)
        with pytest.raises(SpoolUnavailable):
            await b.claim("B", "acme", stepped, 10, lease)
        now = clocks.tick(1.0)
        with structlog.testing.capture_logs() as logs:
            assert await b.claim("B", "acme", now, 10, lease) == []
        [seen] = [e for e in logs if e["event"] == "queue_clock_stepped"]
        assert seen["renewed"] == 1
        own = await b.show("BBBBBBBBBBBBBBBB")
        assert own is not None and own["lease_until"] == now + lease
    finally:
        await b.close()


@pytest.mark.asyncio
async def test_a_step_shorter_than_a_second_is_seen_for_a_short_lease(tmp_path: Path) -> None:
    """Review today8a F5: a step of up to STEP_TOLERANCE (1 s) was never a step, though it reaps a live lease
    of 1.5 s (a heartbeat every 0.5 s leaves as little as 1 s of it). The tolerance is a third of a short
    lease."""
    t0, lease = 1_800_000_000.0, 1.5
    clocks = _Clocks(t0)
    b = clocks.queue(tmp_path / "queue.db")
    try:
        await b.insert(replace(new("BBBBBBBBBBBBBBBB", t0, owner="B"), lease_until=t0 + lease))
        assert await b.claim("B", "acme", t0, 10, lease) == []
        stepped = clocks.tick(0.7, step=0.9)  # 1.6 s on by the wall clock: the live lease looks expired
        with structlog.testing.capture_logs() as logs:
            assert await b.claim("B", "acme", stepped, 10, lease) == []
        assert [e["renewed"] for e in logs if e["event"] == "queue_clock_stepped"] == [1]
    finally:
        await b.close()
