"""The QueueStore contract, run against every backend: claims, leases, fencing, reaping, settling,
operator actions, idempotency keys and schema migrations (SQLite here; PostgreSQL joins the same suite)."""

from __future__ import annotations

import base64
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest

from gateway.core import authcount, quota
from gateway.core.errors import QueueTooNew, UpstreamRejected, UpstreamUnavailable
from gateway.core.model import Attachment
from gateway.core.outcome import Outcome
from gateway.delivery import transition
from gateway.limits.clients import MAX_LISTED, ScopedLedger
from gateway.queue import codec, postgres_schema, sqlite_schema
from gateway.queue import postgres as postgres_queue
from gateway.queue import sqlite as sqlite_queue
from gateway.queue import store as queue_store
from gateway.queue.postgres import PostgresQueue
from gateway.queue.sql import FOR_POSTGRES, FOR_SQLITE, POSTGRES
from gateway.queue.sqlite import SqliteQueue
from gateway.queue.sqlite_schema import LATEST, V1
from gateway.queue.store import KeyHit, KeyTakenOver, NewMessage, QueueDataRefused, QueueStore
from tests.pgserver import PgCluster
from tests.queue_contract import PLAN, POLICY, new, stores_on_backend, submission

Factory = Callable[[], QueueStore]


@pytest.fixture(params=["sqlite", "postgresql"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Opens stores on one shared backend: several stores are several instances on one queue."""
    async for factory in stores_on_backend(request, tmp_path, SqliteQueue, PostgresQueue):
        yield factory


@pytest.fixture
async def store(make_store: Factory) -> QueueStore:
    s = make_store()
    await s.open()
    return s


def test_codec_round_trip() -> None:
    s = submission()
    assert codec.decode(*codec.encode(s)) == s


def test_codec_refuses_corrupt_records() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(b'{"v": 2}')
    with pytest.raises(codec.CodecError):
        codec.decode(b'{"v": 99}')
    with pytest.raises(codec.CodecError):
        codec.decode(b"not json")


async def test_claim_leases_once_and_delivered_calls_are_never_claimed_again(store: QueueStore) -> None:
    now = time.time()
    await store.insert(new("M1", now))
    [claimed] = await store.claim("A", "acme", now, 10, lease=30)
    assert claimed.id == "M1" and not claimed.reaped
    assert await store.claim("B", "acme", now, 10, lease=30) == []  # leased: not claimed twice
    outcome = Outcome(delivered={"0": "E1"}, deferred={"1": UpstreamUnavailable("500")})
    decision = transition.decide(claimed.before, outcome, POLICY, now)
    assert decision.verdict == "queued"
    assert await store.settle("M1", claimed.token, decision, now)
    row = await store.show("M1")
    assert row is not None and row["attempts"] == 2 and row["owner"] is None
    assert row["next_attempt"] == pytest.approx(now + 20.0)  # the schedule's second entry
    assert await store.claim("A", "acme", now + 19, 10, lease=30) == []
    [again] = await store.claim("A", "acme", now + 21, 10, lease=30)
    assert {k: (c.state, c.upstream_id) for k, c in again.before.calls.items()} == {
        "0": ("done", "E1"),
        "1": ("pending", None),
    }
    assert again.token != claimed.token
    done = transition.decide(again.before, Outcome(delivered={"1": "E1"}), POLICY, now)
    assert await store.settle("M1", again.token, done, now)
    assert await store.show("M1") is None


async def test_text_with_a_nul_is_stored_with_u_fffd_on_every_backend(store: QueueStore) -> None:
    """PostgreSQL refuses U+0000 in text (DataError): an upstream's reason or id, or a client's Subject, with
    one would fail every settle of the message, which then looped (resent every lease). Both backends store
    it as U+FFFD."""
    now = time.time()
    m = new("N0", now)
    calls = {k: replace(c, error="was\x00here") for k, c in m.decision.calls.items()}
    m = replace(m, subject="a\x00b", mail_from="x\x00@acme.example", decision=replace(m.decision, calls=calls))
    await store.insert(m)
    row = await store.show("N0")
    assert row is not None and (row["subject"], row["mail_from"]) == ("a\ufffdb", "x\ufffd@acme.example")
    [claimed] = await store.claim("A", "acme", now, 1, lease=30)
    assert {c.error for c in claimed.before.calls.values()} == {"was\ufffdhere"}
    outcome = Outcome(delivered={"0": "id\x00"}, rejected={"1": UpstreamRejected("invalid\x00email")})
    decision = transition.decide(claimed.before, outcome, POLICY, now)
    assert decision.verdict == "dead"
    assert await store.settle("N0", claimed.token, decision, now)
    row = await store.show("N0")
    assert row is not None and row["state"] == "dead" and "invalid\ufffdemail" in row["dead_reason"]
    assert {c["key"]: (c["upstream_id"], c["error"]) for c in row["calls"]} == {
        "0": ("id\ufffd", None),
        "1": (None, "invalid\ufffdemail"),
    }


async def test_a_stale_token_changes_nothing(store: QueueStore) -> None:
    now = time.time()
    await store.insert(new("M2", now))
    [first] = await store.claim("A", "acme", now, 1, lease=5)
    # A's lease expires; B reaps the message, which gets a new token.
    [second] = await store.claim("B", "acme", now + 6, 1, lease=30)
    assert second.reaped and second.token != first.token
    late = transition.decide(first.before, Outcome(delivered={"0": "X", "1": "X"}), POLICY, now)
    assert not await store.settle("M2", first.token, late, now)  # fenced
    assert not await store.mark_sending("M2", first.token, ["0"])
    assert not await store.release("M2", first.token, now)
    row = await store.show("M2")
    assert row is not None and row["state"] == "inflight" and row["owner"] == "B"


async def test_a_lease_expired_mid_call_leaves_the_sent_calls_ambiguous(store: QueueStore) -> None:
    now = time.time()
    await store.insert(new("M3", now))
    [claimed] = await store.claim("A", "acme", now, 1, lease=5)
    assert await store.mark_sending("M3", claimed.token, ["0"])  # call 0 went out; 1 never did
    [reaped] = await store.claim("B", "acme", now + 6, 1, lease=30)
    assert reaped.reaped
    before, lost = transition.resume(reaped.before)
    assert lost == ["0"]
    assert before.calls["0"].state == "pending" and before.calls["0"].lost == 1
    assert before.calls["1"].state == "pending" and before.calls["1"].lost == 0


async def test_renew_keeps_a_lease_and_expire_owners_ends_it(store: QueueStore) -> None:
    now = time.time()
    await store.insert(new("M4", now))
    await store.claim("A", "acme", now, 1, lease=5)
    assert await store.renew("A", now + 60) == 1
    assert await store.claim("B", "acme", now + 30, 1, lease=5) == []
    assert await store.owners() == ["A"]
    assert await store.expire_owners(["A"], now + 30) == 1
    assert await store.expire_owners(["A"], now + 31) == 0  # already over: not counted (nor logged) again
    [reaped] = await store.claim("B", "acme", now + 30, 1, lease=5)
    assert reaped.reaped


async def test_inflight_insert_is_owned_and_due_when_its_lease_expires(store: QueueStore) -> None:
    now = time.time()
    calls = {k: replace(c, state="sending") for k, c in transition.fresh(PLAN, now, POLICY).calls.items()}
    token = await store.insert(new("M5", now, calls=calls, owner="A"))
    assert await store.claim("B", "acme", now + 1, 5, lease=5) == []
    assert await store.next_due(["acme"]) == pytest.approx(now + 30)
    [reaped] = await store.claim("B", "acme", now + 31, 5, lease=5)
    assert reaped.reaped and reaped.token != token


async def test_release_makes_a_claimed_message_due_again(store: QueueStore) -> None:
    now = time.time()
    await store.insert(new("M6", now))
    [claimed] = await store.claim("A", "acme", now, 1, lease=30)
    assert await store.release("M6", claimed.token, now)
    [again] = await store.claim("B", "acme", now, 1, lease=30)
    assert not again.reaped


async def test_refused_calls_and_expiry_become_dead_letters_and_requeue(store: QueueStore) -> None:
    now = time.time()
    await store.insert(new("M7", now))
    [claimed] = await store.claim("A", "acme", now, 1, lease=30)
    decision = transition.decide(
        claimed.before, Outcome(delivered={"0": "E"}, rejected={"1": UpstreamRejected("invalid email")}), POLICY, now
    )
    assert decision.verdict == "dead"
    assert await store.settle("M7", claimed.token, decision, now)
    dead = await store.show("M7")
    assert dead is not None and dead["state"] == "dead" and "invalid email" in dead["dead_reason"]
    await store.insert(new("M8", now))
    [claimed] = await store.claim("A", "acme", now, 1, lease=30)
    expired = transition.decide(
        claimed.before,
        Outcome(deferred={"0": UpstreamUnavailable("DMDS answered 500")}, skipped={"1"}),
        POLICY,
        now + 101,
    )
    assert await store.settle("M8", claimed.token, expired, now + 101)
    row = await store.show("M8")
    assert row is not None and row["dead_reason"].startswith("expired") and "500" in row["dead_reason"]
    assert [r["id"] for r in await store.list(["dead"])] == ["M7", "M8"]
    assert await store.requeue("M7", now, 100)
    row = await store.show("M7")
    assert row is not None and [c["state"] for c in row["calls"]] == ["done", "pending"]
    assert not await store.requeue("M7", now, 100)  # not a dead letter any more


async def test_operator_actions(store: QueueStore) -> None:
    now = time.time()
    await store.insert(new("M9", now + 500))
    assert await store.claim("A", "acme", now, 1, lease=30) == []
    assert await store.retry_now("M9", now)
    [claimed] = await store.claim("A", "acme", now, 1, lease=30)
    assert not await store.delete("M9")  # its call is running
    assert not await store.retry_now("M9", now)
    assert await store.release("M9", claimed.token, now)
    assert await store.delete("M9")
    assert await store.show("M9") is None
    assert await store.submission("M9") is None


async def test_counts_list_and_show(store: QueueStore) -> None:
    now = time.time()
    await store.insert(new("Q1", now - 60))
    await store.insert(new("D1", now - 120, verdict="dead"))
    counts = await store.counts(now)
    assert counts["queued"]["count"] == 1 and counts["dead"]["count"] == 1
    assert counts["dead"]["oldest_age"] == pytest.approx(120, abs=1)
    [row] = await store.list(["queued", "inflight"])
    assert (row["id"], row["open_calls"], row["calls"]) == ("Q1", 2, 2)
    shown = await store.show("Q1")
    assert shown is not None and [c["key"] for c in shown["calls"]] == ["0", "1"]
    assert codec.decode(await store.submission("Q1") or b"") == submission()  # small attachments: in the record
    await store.insert(new("O1", now - 30, account="other"))
    await store.insert(new("O2", now - 30, account="other", owner="gw:1:x"))  # in flight: waiting all the same
    assert await store.waiting() == {"acme": 1, "other": 2}  # per account, dead letters left out


async def test_a_messages_notice_data_is_stored_with_it_and_comes_back_with_its_claim(store: QueueStore) -> None:
    """What a notice needs beyond the submission (whom to tell, the header block) is in the message's own row
    and comes back with every claim (a reaped one too), for the record a claiming instance rebuilds; a message
    stored without any claims None. `show` and `delete` leave it out, as they leave out the submission."""
    now = time.time()
    kept = '{"to":"billing@acme.example","headers":"Subject: s\\r\\n"}'
    await store.insert(replace(new("N1", now), notice=kept))
    await store.insert(new("N2", now))
    claimed = {c.id: c.notice for c in await store.claim("A", "acme", now, 5, lease=30)}
    assert claimed == {"N1": kept, "N2": None}
    await store.expire_owners(["A"], now)
    [reaped] = [c for c in await store.claim("B", "acme", now + 1, 5, lease=30) if c.id == "N1"]
    assert reaped.reaped and reaped.notice == kept
    shown = await store.show("N1")
    assert shown is not None and "notice" not in shown and "submission" not in shown
    assert await store.release("N1", reaped.token, now)
    deleted = await store.delete("N1")
    assert deleted is not None and "notice" not in deleted


async def test_wake_makes_an_accounts_backlog_due(store: QueueStore) -> None:
    now = time.time()
    for n in range(3):
        await store.insert(new(f"W{n}", now + 300 + n))
    await store.insert(new("OTHER", now + 300, account="other"))
    assert await store.wake("acme", now, limit=1) == 1
    assert [c.id for c in await store.claim("A", "acme", now, 5, lease=30)] == ["W0"]
    assert await store.wake("acme", now) == 2
    assert sorted(c.id for c in await store.claim("A", "acme", now, 5, lease=30)) == ["W1", "W2"]
    assert await store.claim("A", "other", now, 5, lease=30) == []


async def test_a_backlog_is_woken_in_batches(store: QueueStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An account's whole backlog made due a batch per transaction (a million in one UPDATE held SQLite's writer
    lock for seconds, or passed PostgreSQL's statement bound and was undone, the error swallowed)."""
    monkeypatch.setattr(queue_store, "WAKE_BATCH", 2)
    now = time.time()
    for n in range(5):
        await store.insert(new(f"B{n}", now + 300 + n))
    limits: list[int | None] = []
    wake = store.wake

    async def counted(account: str, now: float, limit: int | None = None) -> int:
        limits.append(limit)
        return await wake(account, now, limit)

    monkeypatch.setattr(store, "wake", counted)
    assert await store.wake("acme", now) == 5
    assert limits == [None, 2, 2, 2]  # 2 + 2 + 1: the last batch short, so the backlog is done
    assert sorted(c.id for c in await store.claim("A", "acme", now, 10, lease=30)) == [f"B{n}" for n in range(5)]


async def test_large_attachments_are_stored_in_chunks_and_come_back_whole(store: QueueStore) -> None:
    now = time.time()
    scan = Attachment("scan.pdf", "application/pdf", b64=base64.b64encode(os.urandom(3 * 1024 * 1024 + 5)))
    other = Attachment("logo.png", "image/png", os.urandom(100_000))
    sub = submission()
    sub = replace(sub, message=replace(sub.message, attachments=(scan, other, *sub.message.attachments)))
    record, blobs = codec.encode(sub)
    assert len(blobs) == 2 and len(record) < 10_000  # the contents are not in the record
    base = new("B1", now)
    await store.insert(replace(base, submission=record, blobs=blobs))
    [claimed] = await store.claim("A", "acme", now, 1, lease=30)
    back = codec.decode(claimed.submission, claimed.blobs)
    assert [a.decoded() for a in back.message.attachments] == [a.decoded() for a in sub.message.attachments]
    assert back.message.attachments[0].b64 == scan.b64  # carried as base64, as it arrived
    shown = codec.decode(await store.submission("B1") or b"", None)  # `queue show`: names without contents
    assert [a.filename for a in shown.message.attachments] == ["scan.pdf", "logo.png", "x.bin"]
    assert await store.release("B1", claimed.token, now) and await store.delete("B1")


async def test_two_instances_never_claim_the_same_message(make_store: Factory) -> None:
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    now = time.time()
    for n in range(20):
        await a.insert(new(f"C{n:02}", now))
    first = await a.claim("A", "acme", now, 12, lease=30)
    second = await b.claim("B", "acme", now, 12, lease=30)
    ids = [c.id for c in first + second]
    assert len(ids) == 20 and len(set(ids)) == 20


# A host's clock 2 minutes off the database's: more than a 60 s lease either way.
SKEW = 120.0


def ahead(seconds: float) -> Callable[[], float]:
    """A host's clock `seconds` ahead of this one's (behind when negative), as the store reads it."""
    return lambda: time.time() + seconds


@contextlib.asynccontextmanager
async def instances(pg_cluster: PgCluster, *skews: float) -> AsyncIterator[list[PostgresQueue]]:
    """Instances on one PostgreSQL queue, the host of each with its clock `skew` seconds ahead of the
    database's (the database runs on this host)."""
    url = pg_cluster.new_database()
    stores = [PostgresQueue(url, clock=ahead(skew)) for skew in skews]
    try:
        for store in stores:
            await store.open()
        yield stores
    finally:
        for store in stores:
            await store.close()


async def test_an_instance_whose_clock_is_ahead_does_not_take_over_a_live_lease(pg_cluster: PgCluster) -> None:
    """A holds a 60 s lease; B's clock is 2 minutes ahead and B passes its own clock's `now`, as its worker
    does. The lease ends by the database's clock: B may not reap it now (it would resend A's calls in flight),
    nor 55 s later by its clock, only once the 60 s are over; C, 2 minutes behind, reaps an ended lease as soon
    as it has ended, not 2 minutes late."""
    async with instances(pg_cluster, 0.0, SKEW, -SKEW) as (a, b, c):
        now = time.time()
        await a.insert(new("L1", now))
        [held] = await a.claim("A", "acme", now, 1, lease=60)
        b_now = time.time() + SKEW
        assert await b.claim("B", "acme", b_now, 1, lease=60) == [], "B took over A's live lease"
        assert await b.next_due(["acme"]) == pytest.approx(b_now + 60, abs=5)  # on B's clock
        assert await a.renew("A", time.time() + 60) == 1  # A's heartbeat: 60 s more from now
        assert await b.claim("B", "acme", b_now + 55, 1, lease=60) == []
        [reaped] = await b.claim("B", "acme", b_now + 65, 1, lease=60)
        assert reaped.reaped and reaped.token != held.token
        assert not await a.mark_sending("L1", held.token, ["0"])  # A is fenced off

        await a.insert(new("L2", now))
        [short] = await a.claim("A", "acme", now, 1, lease=5)
        c_now = time.time() - SKEW
        assert await c.claim("C", "acme", c_now, 1, lease=60) == []
        [late] = await c.claim("C", "acme", c_now + 6, 1, lease=60)  # 6 s later: A's 5 s lease is over
        assert late.id == "L2" and late.reaped and late.token != short.token


async def test_due_times_are_kept_by_the_database_clock(pg_cluster: PgCluster) -> None:
    """A retry A scheduled 20 s ahead is due in 20 s for every instance, whatever its clock: not at once for B
    (2 minutes ahead), not 2 minutes late for C (behind). What a skewed instance makes due now (a release at
    shutdown) is due now for the others; the times it reads back are on its own clock."""
    async with instances(pg_cluster, 0.0, SKEW, -SKEW) as (a, b, c):
        now = time.time()
        for msg_id in ("R1", "R2"):
            await a.insert(new(msg_id, now))
            [claimed] = await a.claim("A", "acme", now, 1, lease=60)
            retry = transition.decide(claimed.before, Outcome(deferred={"0": UpstreamUnavailable("503")}), POLICY, now)
            assert retry.next_attempt == now + 20  # the second attempt failed (POLICY)
            assert await a.settle(msg_id, claimed.token, retry, now)
        b_now, c_now = time.time() + SKEW, time.time() - SKEW
        assert await b.claim("B", "acme", b_now + 15, 2, lease=60) == [], "B sent a retry early"
        assert await b.next_due(["acme"]) == pytest.approx(b_now + 20, abs=5)
        shown = await b.show("R1")
        assert shown is not None and shown["next_attempt"] == pytest.approx(b_now + 20, abs=5)
        [first] = await c.claim("C", "acme", c_now + 25, 1, lease=60)  # due 20 s later by C's clock too
        [second] = await b.claim("B", "acme", b_now + 25, 1, lease=60)
        assert {first.id, second.id} == {"R1", "R2"} and not first.reaped and not second.reaped

        assert await b.release(second.id, second.token, b_now)  # B shuts down: due now, for A too
        [again] = await a.claim("A", "acme", time.time(), 1, lease=60)
        assert again.id == second.id and not again.reaped


async def test_a_messages_acceptance_time_comes_back_as_the_accepting_instance_wrote_it(
    pg_cluster: PgCluster,
) -> None:
    """`created` labels the message's acceptance: the accepting instance writes its ledger rows with it, and
    every other writer (the instance that claims it, an operator's show, retry or delete from another host)
    must hand the ledger the same value, whatever its clock (gateway/queue/shared_schema.py LEDGER). A's clock
    is 2 minutes ahead, B's right: B gets A's value, not one moved onto its own clock. Ages are taken on the
    reader's clock: A's count of its own message's age is right."""
    async with instances(pg_cluster, SKEW, 0.0) as (a, b):
        created = time.time() + SKEW - 60  # A's clock: what A's ledger.accepted rows carry
        await a.insert(new("K1", created))
        await a.insert(new("K2", created, verdict="dead"))
        counts = await a.counts(time.time() + SKEW)
        assert counts["queued"]["oldest_age"] == pytest.approx(60, abs=5)
        [claimed] = await b.claim("B", "acme", time.time(), 1, lease=60)
        assert claimed.before.created == created  # what B's DeliveryOwner hands the ledger
        shown = await b.show("K1")
        assert shown is not None and shown["created"] == created
        assert [r["created"] for r in await b.list(["inflight", "dead"])] == [created, created]
        deleted = await b.delete("K2")
        assert deleted is not None and deleted["created"] == created
        # The other times are still moved onto B's clock: the dead letter's time is A's, 2 minutes back.
        assert deleted["dead_at"] == pytest.approx(created - SKEW, abs=5)


class SteppedClock:
    """A host's clock `skew` seconds off this one's; `skew` changes as NTP steps it."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def __call__(self) -> float:
        return time.time() + self.skew


@contextlib.asynccontextmanager
async def stepped(
    pg_cluster: PgCluster, skew: float
) -> AsyncIterator[tuple[PostgresQueue, PostgresQueue, SteppedClock]]:
    """A, on this host's clock, and B, whose host's clock is `skew` seconds off until the test steps it."""
    url = pg_cluster.new_database()
    clock = SteppedClock(skew)
    a, b = PostgresQueue(url), PostgresQueue(url, clock=clock)
    try:
        await a.open()
        await b.open()
        yield a, b, clock
    finally:
        await a.close()
        await b.close()


async def test_a_clock_stepped_forward_is_followed_at_once_and_takes_over_no_live_lease(
    pg_cluster: PgCluster,
) -> None:
    """B's host booted 2 minutes behind (its offset read: +120 s); NTP steps it to the right time. B's next
    claim comes well before the offset's refresh (SHIFT_REFRESH): with the offset from before the step, its
    now right clock would pass as 2 minutes ahead, A's 60 s lease of a moment ago would look over and B would
    resend A's calls in flight."""
    async with stepped(pg_cluster, -SKEW) as (a, b, clock):
        assert await b.next_due(["acme"]) is None  # any queue call: B reads its offset (+120 s)
        now = time.time()
        await a.insert(new("L1", now))
        [held] = await a.claim("A", "acme", now, 1, lease=60)
        clock.skew = 0.0  # NTP steps B's clock to the right time
        taken = await b.claim("B", "acme", time.time(), 1, lease=60)
        assert taken == [], f"B took over A's live lease (token {held.token} -> {taken[0].token})"
        assert await b.next_due(["acme"]) == pytest.approx(time.time() + 60, abs=5)  # B's times follow too


async def test_a_clock_stepped_back_is_followed_at_once_and_writes_no_lease_already_over(
    pg_cluster: PgCluster,
) -> None:
    """B's host ran 2 minutes ahead (offset -120 s); NTP steps it back. B's claim right after, with a 60 s
    lease, must end 60 s from now by the database's clock: with the offset from before the step it was
    written as ended a minute ago, and A reaped B's live attempt at once (and so B's heartbeats until the
    refresh)."""
    async with stepped(pg_cluster, SKEW) as (a, b, clock):
        assert await b.next_due(["acme"]) is None  # B reads its offset (-120 s)
        await a.insert(new("L2", time.time() - 300))  # a retry due a while ago
        clock.skew = 0.0  # NTP steps B's clock back
        [mine] = await b.claim("B", "acme", time.time(), 1, lease=60)
        taken = await a.claim("A", "acme", time.time(), 1, lease=60)
        assert taken == [], f"A took over B's lease of a moment ago (token {mine.token} -> {taken[0].token})"
        assert await b.renew("B", time.time() + 60) == 1
        assert await a.claim("A", "acme", time.time(), 1, lease=60) == []


async def test_idempotency_keys(make_store: Factory) -> None:
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    now = time.time()
    assert await a.claim_key("acme", "k1", "M1", now, 3600, 60) is None
    hit = await b.claim_key("acme", "k1", "M2", now, 3600, 60)
    assert hit is not None and (hit.msg_id, hit.reply_id) == ("M1", None)  # first copy still in progress
    await a.finish_key("acme", "k1", "M1", "eeid-1")
    hit = await b.claim_key("acme", "k1", "M3", now + 10, 3600, 60)
    assert hit is not None and hit.reply_id == "eeid-1"
    assert await b.claim_key("other", "k1", "M4", now, 3600, 60) is None  # per account
    assert await b.claim_key("acme", "k1", "M5", now + 3601, 3600, 60) is None  # window over
    assert await a.claim_key("acme", "k2", "M6", now, 3600, 60) is None
    await a.finish_key("acme", "k2", "M6", None)  # refused: the key is forgotten
    assert await b.claim_key("acme", "k2", "M7", now, 3600, 60) is None
    # An attempt whose process died before answering: its key is taken over after `stale` seconds ...
    assert await a.claim_key("acme", "k3", "M8", now, 3600, 60) is None
    hit = await b.claim_key("acme", "k3", "M9", now + 30, 3600, 60)
    assert hit is not None and hit.reply_id is None  # within `stale`: still in progress
    # (taken over: the caller counts it, a duplicate if the dead attempt's calls went out)
    assert await b.claim_key("acme", "k3", "M9", now + 61, 3600, 60) == KeyTakenOver("M8")
    hit = await a.claim_key("acme", "k3", "M9b", now + 62, 3600, 60)
    assert hit is not None and not isinstance(hit, KeyTakenOver) and hit.msg_id == "M9"  # the key is M9's now
    # ... unless its message was queued: then it was accepted, and a resend gets that message's id.
    await a.insert(new("M10", now))
    assert await a.claim_key("acme", "k4", "M10", now, 3600, 60) is None
    hit = await b.claim_key("acme", "k4", "M11", now + 61, 3600, 60)
    assert hit is not None and hit.reply_id == "M10"
    # The digest of what the first message said comes back with the hit, also after a take-over.
    assert await a.claim_key("acme", "k5", "M12", now, 3600, 60, "digest-1") is None
    hit = await b.claim_key("acme", "k5", "M13", now, 3600, 60, "digest-2")
    assert hit is not None and hit.digest == "digest-1"
    assert await b.claim_key("acme", "k5", "M14", now + 61, 3600, 60, "digest-3") == KeyTakenOver("M12")
    hit = await a.claim_key("acme", "k5", "M15", now + 62, 3600, 60, "digest-4")
    assert isinstance(hit, KeyHit) and (hit.msg_id, hit.digest) == ("M14", "digest-3")


async def test_expired_idempotency_keys_are_swept_in_batches_on_postgresql(
    pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL deleted only the expired row of the key being claimed: every other key stayed for ever (the
    table grew by one row per keyed message). Claims sweep the expired ones, a bounded batch at a time and
    again at once while a batch comes back full; live keys stay. (SQLite deletes them all in each claim.)"""
    monkeypatch.setattr(postgres_queue, "KEY_SWEEP_BATCH", 2)
    url = pg_cluster.new_database()
    store = PostgresQueue(url)
    await store.open()

    def keys() -> set[str]:
        with psycopg.connect(url, autocommit=True) as conn:
            return {row[0] for row in conn.execute("SELECT key FROM idempotency").fetchall()}

    try:
        now = time.time()
        for n in range(5):  # expired an hour ago (late keys recorded with their own times)
            assert await store.record_key("acme", f"old{n}", f"M{n}", f"M{n}", now - 7200, now - 3600, None)
        assert await store.record_key("acme", "live", "L", "L", now - 60, now + 3600, None)
        assert await store.claim_key("acme", "k1", "N1", now, 3600, 60) is None  # a batch of 2: full
        assert len(keys() & {f"old{n}" for n in range(5)}) == 3
        assert await store.claim_key("acme", "k2", "N2", now, 3600, 60) is None  # full again
        assert await store.claim_key("acme", "k3", "N3", now, 3600, 60) is None  # the last one
        assert keys() == {"live", "k1", "k2", "k3"}
        # Not full: the next sweep waits KEY_SWEEP_EVERY; a key expiring meanwhile stays until then.
        assert await store.record_key("acme", "old5", "M5", "M5", now - 7200, now - 3600, None)
        assert await store.claim_key("acme", "k4", "N4", now, 3600, 60) is None
        assert "old5" in keys()
        hit = await store.claim_key("acme", "live", "N5", now, 3600, 60)
        assert hit is not None and hit.msg_id == "L"  # a live key still answers
    finally:
        await store.close()


async def test_migrate_is_idempotent(make_store: Factory) -> None:
    first = make_store()
    found, latest = await first.migrate()
    assert found == 0 and latest >= 1  # a new queue: every migration ran
    second = make_store()
    assert await second.migrate() == (latest, latest)


@dataclass(frozen=True)
class _Slot:
    """A rate slot taken, placed on this process's clock: the store answers a wait from the moment it read
    the database's clock, somewhere between `asked` and `answered`. Comparing waits alone would count the
    time the calls themselves took (tens of ms on a loaded machine) as a change of the slots."""

    asked: float
    answered: float
    wait: float

    @property
    def at(self) -> float:
        return (self.asked + self.answered) / 2 + self.wait

    @property
    def spread(self) -> float:
        return self.answered - self.asked

    def since(self, first: _Slot) -> float:
        """Off by at most half of each slot's spread: a bound adds both spreads (the first call on a store may be
        its slowest: it opens the side file, creates the row)."""
        return self.at - first.at


async def _slot(store: QueueStore, interval: float, burst: int, recovery: float = 30.0) -> _Slot:
    asked = time.monotonic()
    [wait] = await store.rate_slots("acme", 1, interval, burst, recovery)
    return _Slot(asked, time.monotonic(), wait)


async def test_shared_rate_limit_spaces_calls_across_instances(make_store: Factory) -> None:
    """Two instances taking slots of one 10/s bucket (burst 2) are spaced as one: the n-th slot waits
    about (n - burst + 1) / rate, whichever instance takes it."""
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    slots = [await _slot(a if n % 2 else b, 0.1, 2) for n in range(6)]
    assert slots[0].wait == pytest.approx(0, abs=0.05) and slots[1].wait == pytest.approx(0, abs=0.05)
    for n in range(2, 6):
        assert slots[n].since(slots[0]) == pytest.approx((n - 1) * 0.1, abs=0.05 + slots[n].spread + slots[0].spread)
    await a.rate_pause("acme", 5.0, 30.0)  # a 429 with Retry-After: 5
    assert (await b.rate_slots("acme", 1, 0.1, 2))[0] >= 4.5


async def test_shared_rate_limit_slows_down_after_a_429_as_the_local_bucket_does(make_store: Factory) -> None:
    """The row holds the state of gateway.core.tokenbucket: right after a 429 the interval is doubled for
    every instance, as in TokenBucket."""
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    await a.rate_pause("acme", 0.0, 3600.0)  # a 429 without Retry-After wait; recovery over an hour
    slots = [await _slot(a if n % 2 else b, 0.1, 1, 3600.0) for n in range(4)]
    assert slots[0].wait == pytest.approx(0, abs=0.05)
    for n in range(1, 4):
        assert slots[n].since(slots[0]) == pytest.approx(n * 0.2, abs=0.05 + slots[n].spread + slots[0].spread)


async def test_slots_taken_together_are_spaced_as_one_by_one_and_a_pause_still_holds(make_store: Factory) -> None:
    """One process's waiting callers take their slots in one transaction: spaced by the interval as if taken
    one by one, the next caller (another instance's too) after them; a 429's pause and slower rate hold for
    slots taken together as for one."""
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    asked = time.monotonic()
    waits = await a.rate_slots("acme", 4, 0.1, 2)
    spread = time.monotonic() - asked
    assert waits[:2] == [0.0, 0.0]  # the burst
    assert waits[2:] == pytest.approx([0.1, 0.2], abs=1e-6)  # one database clock reading: exact spacing
    [after] = await b.rate_slots("acme", 1, 0.1, 2)
    assert after == pytest.approx(0.3, abs=0.05 + spread + (time.monotonic() - asked))
    pausing = time.monotonic()
    await b.rate_pause("acme", 5.0, 3600.0)  # a 429 with Retry-After: 5; recovery over an hour
    paused = await a.rate_slots("acme", 3, 0.1, 1, 3600.0)
    # The pause less the time between its clock reading and this one (a loaded machine: well over 0.5 s).
    between = time.monotonic() - pausing
    assert 5.0 - between - 1e-3 <= paused[0] <= 5.0 + 1e-3
    # The halved rate, already recovering by the time between the two clock readings over the hour (20 ms on a
    # loaded machine: 1e-6 of 0.2 s), as gateway.core.tokenbucket.slowed says.
    spacing = [later - paused[0] for later in paused[1:]]
    assert spacing == pytest.approx([0.2, 0.4], rel=between / 3600.0 + 1e-6)
    assert spacing[0] <= 0.2 + 1e-6 and spacing[1] <= 0.4 + 1e-6  # never slower than halved


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_next_due_reads_the_due_indexes_not_the_whole_queue(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The retry worker asks when the next message is due after every attempt, for each account with room:
    the answer comes from the partial indexes of queued and in-flight messages, never from a scan of every
    row (the other accounts' backlogs and the dead ones too)."""
    query = "EXPLAIN " + ("QUERY PLAN " if backend == "sqlite" else "")
    if backend == "sqlite":
        path = tmp_path / "queue.sqlite3"
        store = SqliteQueue(path)
        await store.open()
        await store.close()
        with contextlib.closing(sqlite3.connect(path)) as db:
            plan = [row[3] for row in db.execute(query + FOR_SQLITE.next_due(2), ("a", "b") * 2)]
        assert not any(step.startswith("SCAN messages") for step in plan), plan
        return
    url = request.getfixturevalue("pg_cluster").new_database()
    store = PostgresQueue(url)
    await store.open()
    await store.close()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SET enable_seqscan = off")  # so a plan that can only scan the table shows one
        cursor = await conn.execute(query + FOR_POSTGRES.next_due(2), 2 * POSTGRES.items(["a", "b"]))
        plan = [row[0] for row in await cursor.fetchall()]
    assert not any("Seq Scan" in step for step in plan), plan


async def test_quota_counts_are_shared_and_never_go_past_a_limit(make_store: Factory) -> None:
    """Two instances counting one login's messages: each take checks every window and counts only what fits,
    in one transaction; a message taken back frees its share; another login's counts are its own."""
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    now = time.time()
    windows = quota.windows(now, (3, 0), (0, 1000))
    taken = [await (a if n % 2 else b).quota_take("acme/printer", windows, 300) for n in range(4)]
    assert [verdict.ok for verdict, _ in taken] == [True, True, True, False]
    assert taken[3][0].window == windows[0] and taken[3][0].unit == "messages"
    assert taken[2][1] == {windows[0].key: quota.Counts(3, 900), windows[1].key: quota.Counts(3, 900)}
    assert taken[3][1] == taken[2][1]  # refused: nothing counted
    await b.quota_return("acme/printer", windows, 300)
    verdict, counts = await a.quota_take("acme/printer", windows, 500)
    assert not verdict.ok and verdict.unit == "bytes" and verdict.window == windows[1]  # 600 + 500 > 1000
    assert counts[windows[1].key] == quota.Counts(2, 600)
    assert (await b.quota_take("acme/printer", windows, 400))[0].ok  # exactly 1000 bytes, 3 messages
    assert (await b.quota_counts("acme/other", windows))[windows[0].key] == quota.Counts()
    # The next hour is a new window: its own counts.
    later = quota.windows(now + 3600, (3, 0), (0, 0))
    assert (await b.quota_take("acme/printer", later, 1))[0].ok


async def test_the_clock_offset_is_measured_against_the_database(store: QueueStore) -> None:
    """PostgreSQL: this host's clock minus the database's (here the same host: the round trip's worth);
    SQLite: None, a file on this host has no clock of its own."""
    offset = await store.clock_offset()
    if isinstance(store, SqliteQueue):
        assert offset is None
    else:
        assert offset is not None and abs(offset) < 1.0


async def test_a_clock_ahead_does_not_reset_the_count_of_an_instance_behind(make_store: Factory) -> None:
    """B's clock is behind (HH:59:00), A's ahead (HH+1:01:00): each computes its windows with its own clock.
    A's take must not drop B's current window as ended, or B's count would start from 0 again (its hourly
    quota of 1 taken twice); a day's quota would be reset the same way at midnight."""
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    hour = int(time.time()) // quota.HOUR * quota.HOUR  # the database's clock is in this hour, or later
    b_windows = quota.windows(hour - 60, (1, 0), (1, 0))
    a_windows = quota.windows(hour + 60, (1, 0), (0, 0))
    assert [(await b.quota_take("acme/metered", b_windows, 100))[0].ok for _ in range(2)] == [True, False]
    assert (await a.quota_take("acme/metered", a_windows, 100))[0].ok  # A's new hour: a window of its own
    verdict, counts = await b.quota_take("acme/metered", b_windows, 100)
    assert not verdict.ok, f"B's window was dropped by A's take: {counts}"
    assert counts[b_windows[0].key] == quota.Counts(1, 100)


async def test_each_scopes_held_list_is_read_on_its_own(make_store: Factory) -> None:
    """More than MAX_LISTED SMTP AUTH records (bare keys, sorted before `console:`) and one console sign-in
    failure: the console's list still shows its one, and SMTP's its first MAX_LISTED and no console key. Read
    as one list of every scope's and split, the flood pushed the console's record off the page (review
    follow6 2)."""
    store = make_store()
    await store.open()
    rules = authcount.Rules(window=600.0, slow_from=100, delay_max=1.0, lockout_at=3, lockout_time=900.0)
    smtp, console, api = (ScopedLedger(store, scope) for scope in (None, "console", "api"))
    for n in range(MAX_LISTED + 1):
        await smtp.auth_end(f"10.0.{n // 256}.{n % 256}", rules, failed=True, in_flight=False)
    await console.auth_end("192.0.2.9", rules, failed=True, in_flight=False)
    assert [client for client, _, _ in await console.auth_held(MAX_LISTED)] == ["192.0.2.9"]
    assert await api.auth_held(MAX_LISTED) == []
    listed = [client for client, _, _ in await smtp.auth_held(MAX_LISTED)]
    assert len(listed) == MAX_LISTED and all(client.startswith("10.0.") for client in listed)


async def test_auth_records_are_shared_peeked_and_lifted(make_store: Factory) -> None:
    """Two instances counting one client's AUTH attempts: the attempts in flight and the failures of both count
    toward one lockout; auth_peek reads the record as it is, writing nothing; auth_held lists the clients held
    back (locked out first); a lift deletes the record for both."""
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    rules = authcount.Rules(window=600.0, slow_from=100, delay_max=1.0, lockout_at=3, lockout_time=900.0)
    assert await a.auth_peek("192.0.2.7") is None  # nothing held: nothing to read
    record, verdict, now = await a.auth_begin("192.0.2.7", rules)
    assert record.in_flight == 1 and not verdict.locked_for
    peeked = await b.auth_peek("192.0.2.7")
    assert peeked is not None and peeked[0] == record and abs(peeked[1] - now) < 60
    again = await b.auth_peek("192.0.2.7")
    assert again is not None and again[0] == record  # a peek wrote nothing
    await b.auth_begin("192.0.2.7", rules)
    await a.auth_end("192.0.2.7", rules, failed=True, in_flight=True)
    record, locked, _ = await b.auth_end("192.0.2.7", rules, failed=True, in_flight=True)
    assert (record.failures, record.in_flight, locked) == (2, 0, False)
    # The third failure, on either instance, locks the client out for both.
    await a.auth_begin("192.0.2.7", rules)
    record, locked, now = await a.auth_end("192.0.2.7", rules, failed=True, in_flight=True)
    assert locked and record.locked_until > now
    _, verdict, _ = await b.auth_begin("192.0.2.7", rules)
    assert verdict.locked_for > 800
    await a.auth_begin("192.0.2.9", rules)
    await a.auth_end("192.0.2.9", rules, failed=True, in_flight=True)
    await a.auth_begin("192.0.2.10", rules)  # only in flight: nothing to list
    held = await b.auth_held(10)
    assert [(client, r.failures, r.locked_until > now) for client, r, now in held] == [
        ("192.0.2.7", 0, True),  # locked out first
        ("192.0.2.9", 1, False),
    ]
    assert [client for client, _, _ in await b.auth_held(1)] == ["192.0.2.7"]
    assert await b.auth_peek("192.0.2.8") is None  # another address: its own record
    assert await b.auth_lift("192.0.2.7", rules)
    assert await a.auth_peek("192.0.2.7") is None
    assert [client for client, _, _ in await a.auth_held(10)] == ["192.0.2.9"]
    assert not await a.auth_lift("192.0.2.7", rules)  # nothing held any more
    _, verdict, _ = await a.auth_begin("192.0.2.7", rules)
    assert not verdict.locked_for


async def test_console_sign_outs_are_shared_and_pruned_past_their_lifetime(make_store: Factory) -> None:
    """A console session signed out on one instance is revoked for another and for a store opened after a
    restart; a row past its session's lifetime (by more than the clock margin) is deleted by the next
    sign-out, one still within it is kept."""
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    now = time.time()
    assert not await b.session_revoked("sid-1")
    await a.session_revoke("sid-1", now + 3600)
    assert await b.session_revoked("sid-1")
    assert not await b.session_revoked("sid-2")  # another session: not signed out
    await a.session_revoke("sid-1", now + 3600)  # signed out twice (two tabs): one row, no error
    # Over: its lifetime ended longer ago than the margin. Within the margin: kept (a clock behind still counts).
    await b.session_revoke("old", now - queue_store.SIGNOUT_KEPT_PAST - 60)
    assert await a.session_revoked("old")
    await b.session_revoke("recent", now - queue_store.SIGNOUT_KEPT_PAST + 60)  # the next sign-out prunes
    assert not await a.session_revoked("old")
    assert await a.session_revoked("recent")
    await b.session_revoke("sid-3", now + 3600)
    assert await a.session_revoked("recent")
    await a.close()
    again = make_store()  # a restart: the record outlives the process
    await again.open()
    assert await again.session_revoked("sid-1") and await again.session_revoked("sid-3")
    # The periodic AUTH sweep (its first at a store's first AUTH record) prunes them too.
    await b.session_revoke("stale", now - queue_store.SIGNOUT_KEPT_PAST - 60)
    assert await again.session_revoked("stale")
    rules = authcount.Rules(window=600.0, slow_from=100, delay_max=1.0, lockout_at=3, lockout_time=900.0)
    await again.auth_begin("192.0.2.7", rules)
    assert not await again.session_revoked("stale")
    assert await again.session_revoked("sid-1")


async def test_a_sign_out_on_an_instance_behind_the_database_is_kept_while_its_clock_holds_the_session(
    pg_cluster: PgCluster,
) -> None:
    """B's clock is 10 minutes behind the database's. It signs out a session whose lifetime ends in 30 s by
    its clock, as its console checks it. Compared as written with the database's clock, the row was already
    past its lifetime by more than SIGNOUT_KEPT_PAST: the next sign-out swept it, and B took the cookie again
    for those 30 s. A row over by B's clock is still swept."""
    behind = -600.0
    async with instances(pg_cluster, 0.0, behind) as (a, b):
        b_now = time.time() + behind
        await b.session_revoke("sid-1", b_now + 30)
        await b.session_revoke("over", b_now - queue_store.SIGNOUT_KEPT_PAST - 60)
        await a.session_revoke("sid-2", time.time() + 3600)  # the next sign-out sweeps
        assert await b.session_revoked("sid-1"), "B's sign-out was swept while B still accepts the session"
        assert not await a.session_revoked("over")


async def test_an_instance_over_an_hour_behind_the_database_keeps_its_quota_count(pg_cluster: PgCluster) -> None:
    """B's clock is 2.5 hours behind the database's; it computes its windows with its own clock, as the
    gateway does. Its current window's end compared as written with the database's clock was over an hour
    past: each take dropped the row first, and B's hourly quota of 1 let every message through."""
    behind = -9000.0
    async with instances(pg_cluster, behind) as (b,):
        windows = quota.windows(time.time() + behind, (1, 0), (0, 0))
        assert [(await b.quota_take("acme/metered", windows, 100))[0].ok for _ in range(2)] == [True, False]
        assert (await b.quota_counts("acme/metered", windows))[windows[0].key] == quota.Counts(1, 100)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_queue_of_the_previous_version_gets_the_sign_out_table_at_its_next_start(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the queue migrated by the version before (9) gets console_signouts from migration 10.
    SQLite: a rate-limit side file the version before made (its tables, none for sign-outs) gets it at open."""
    store: QueueStore
    if backend == "sqlite":
        path = tmp_path / "queue.sqlite3"
        side = path.with_name(path.name + "-ratelimit")
        with contextlib.closing(sqlite3.connect(side)) as db:
            db.execute("CREATE TABLE rate_buckets (account TEXT PRIMARY KEY, tat REAL NOT NULL)")
            db.commit()
        store = SqliteQueue(path)
    else:
        url = request.getfixturevalue("pg_cluster").new_database()
        pg = 10  # the version that adds console_signouts
        with monkeypatch.context() as previous:
            previous.setattr(postgres_schema, "LATEST", pg - 1)
            store = PostgresQueue(url)
            try:
                assert await store.migrate() == (0, pg - 1)
                with pytest.raises(Exception, match="console_signouts"):
                    await store.session_revoked("sid")  # no such table yet
            finally:
                await store.close()
        with monkeypatch.context() as previous:
            previous.setattr(postgres_schema, "LATEST", pg)
            store = PostgresQueue(url)
            try:
                assert await store.migrate() == (pg - 1, pg)
            finally:
                await store.close()
        store = PostgresQueue(url)
    try:
        await store.open()
        await store.session_revoke("sid", time.time() + 60)
        assert await store.session_revoked("sid")
    finally:
        await store.close()


async def test_a_v1_spool_is_migrated_and_its_messages_resumed(tmp_path: Path) -> None:
    """A spool written before the provider-neutral queue: legs become calls, its in-flight legs ambiguous."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(V1)
    now = time.time()
    v1 = (
        b'{"v":1,"principal":{"account":"acme","login":"scanner","campaign":22,"campaign_from_subject":false,'
        b'"may_choose_campaign":false,"allowed_senders":[],"default_from":null,"force_from":false},'
        b'"mail_from":"b@acme.example","rcpt_tos":["a@example.com"],"message":{"subject":"old","from":null,'
        b'"sender":null,"reply_to":null,"to":[],"cc":[],"html":"<p>x</p>","text":null,"attachments":[],'
        b'"options":{},"message_id":null},"campaign":22,"legs":[],"archive":false,"batch_eeid":null}'
    )
    for msg_id, state in (("OLD1", "queued"), ("OLD2", "inflight")):
        db.execute(
            "INSERT INTO messages (id, account, state, created, expires, next_attempt, attempts, mail_from,"
            " subject, size, submission) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (msg_id, "acme", state, now, now + 100, now, 1, "b@acme.example", "old", len(v1), v1),
        )
        db.execute(
            "INSERT INTO legs (msg_id, leg, recipients, state) VALUES (?,0,'a@example.com','pending')", (msg_id,)
        )
    db.commit()
    db.close()
    store = SqliteQueue(path)
    try:
        assert await store.migrate() == (1, LATEST)
        claimed = {c.id: c for c in await store.claim("A", "acme", now, 5, lease=30)}
        assert set(claimed) == {"OLD1", "OLD2"} and claimed["OLD2"].reaped
        assert claimed["OLD1"].before.calls["0"].state == "pending"
        assert claimed["OLD2"].before.calls["0"].state == "sending"  # it may have reached DMDS
        sub = codec.decode(claimed["OLD1"].submission)
        assert sub.params.to_json() == {"campaign": 22, "archive": False, "batch": None}
        assert sub.principal.extra.to_json()["campaign"] == 22
    finally:
        await store.close()
    # Written without auto_vacuum, small: VACUUMed once so that it can give freed space back (a full disk).
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


async def test_a_value_postgresql_refuses_is_no_outage(pg_cluster: PgCluster) -> None:
    """DataError is what was written, not the database: SpoolUnavailable (retried, the circuit opened) would
    repeat the same refused write every lease. It is QueueDataRefused, a bug the callers log and count."""
    store = PostgresQueue(pg_cluster.new_database())
    await store.open()
    try:
        with pytest.raises(QueueDataRefused, match="DataError"):
            await store.claim_key("acme", "k\x00", "M", time.time(), 60.0, 60.0)  # keys are hex digests
        assert await store.claim_key("acme", "k", "M", time.time(), 60.0, 60.0) is None  # still serving
    finally:
        await store.close()


# The indexes SQLite's version 7 and PostgreSQL's version 8 add or widen: name -> columns.
SCALE_INDEXES = {
    "webhook_outbox_msg": ["msg_id"],
    **{f"{table}_created": ["created", "msg_id"] for table in ("ledger_recipients", "ledger_events")},
    **{f"{table}_created": ["created", "msg_id"] for table in ("webhook_outbox", "ledger_notices")},
}
# The recipient indexes SQLite's version 8 and PostgreSQL's version 9 widen for the searches.
SEARCH_INDEXES = {
    "ledger_recipients_rcpt": ["rcpt", "created", "msg_id"],
    "ledger_recipients_state": ["state", "created", "msg_id", "rcpt"],
}
# The index SQLite's version 11 and PostgreSQL's version 13 add: each webhook's due deliveries in due order.
WEBHOOK_DUE_INDEX = {"webhook_outbox_due_of": ["webhook", "state", "next_attempt"]}
# (SQLite's version, PostgreSQL's version, what that version adds).
STEPS = {"scale": (7, 8, SCALE_INDEXES), "search": (8, 9, SEARCH_INDEXES), "webhook_due": (11, 13, WEBHOOK_DUE_INDEX)}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_queue_of_a_previous_version_gets_the_new_indexes_at_its_next_start(
    backend: str, step: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue the version before made (with its ledger) gets the indexes of the step when the next gateway
    opens it: scale, those retention needs at size (the outbox by message, the expired rows by (created,
    msg_id)); search, the recipients by state or address in a page's order (created, msg_id); webhook_due,
    the outbox by webhook, state and due time (each webhook's due deliveries read by a query of its own)."""
    lite, pg, indexes = STEPS[step]

    def columns(found: dict[str, list[str]]) -> dict[str, list[str]]:
        return {name: cols for name, cols in found.items() if name in indexes}

    store: QueueStore
    if backend == "sqlite":
        path = tmp_path / "queue.sqlite3"
        with monkeypatch.context() as previous:
            previous.setattr(sqlite_schema, "LATEST", lite - 1)
            store = SqliteQueue(path)
            assert await store.migrate() == (0, lite - 1)
            await store.close()

        def on_file() -> dict[str, list[str]]:
            with contextlib.closing(sqlite3.connect(path)) as db:
                names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")]
                return columns({name: [r[2] for r in db.execute(f"PRAGMA index_info({name})")] for name in names})

        assert on_file() != indexes
        with monkeypatch.context() as previous:
            previous.setattr(sqlite_schema, "LATEST", lite)
            store = SqliteQueue(path)
            try:
                assert await store.migrate() == (lite - 1, lite)
            finally:
                await store.close()
        assert on_file() == indexes
        return
    url = request.getfixturevalue("pg_cluster").new_database()

    def on_database() -> dict[str, list[str]]:
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute("SELECT indexname, indexdef FROM pg_indexes").fetchall()
        return columns({name: d[d.rindex("(") + 1 : -1].split(", ") for name, d in rows})

    for version in (pg - 1, pg):
        with monkeypatch.context() as previous:
            previous.setattr(postgres_schema, "LATEST", version)
            store = PostgresQueue(url)
            try:
                assert await store.migrate() == ((0, version) if version < pg else (pg - 1, pg))
            finally:
                await store.close()
        assert (on_database() == indexes) is (version == pg)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_queue_of_the_previous_version_keeps_notice_data_from_its_next_start(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue the version before made (SQLite 8, PostgreSQL 10), with a message in it, gets the messages'
    notice column in place at the next start: the old message is claimed with no notice data (its record, if
    rebuilt, is skipped as `rebuilt`), a new one with its own. An instance of the version before, still
    running on the migrated queue (a rolling upgrade), stores and claims as it did: its insert and claim
    name their columns, and the new one is NULL for its messages."""
    url = "" if backend == "sqlite" else request.getfixturevalue("pg_cluster").new_database()
    schema = sqlite_schema if backend == "sqlite" else postgres_schema
    latest = 9 if backend == "sqlite" else 11  # the version that adds the messages' notice column

    def opened() -> QueueStore:
        return SqliteQueue(tmp_path / "queue.sqlite3") if backend == "sqlite" else PostgresQueue(url)

    now = time.time()
    old_columns = queue_store.MESSAGE_COLUMNS.replace(" notice,", "")
    with monkeypatch.context() as previous:
        previous.setattr(schema, "LATEST", latest - 1)
        store = opened()
        try:
            assert await store.migrate() == (0, latest - 1)
            # The previous version's insert: its column list and values, without the notice.
            backend_module = sqlite_queue if backend == "sqlite" else postgres_queue
            previous.setattr(backend_module, "message_row", _without_notice(queue_store.message_row))
            statements = FOR_SQLITE if backend == "sqlite" else FOR_POSTGRES
            mark = statements.dialect.mark
            previous.setattr(
                statements,
                "insert_message",
                f"INSERT INTO messages ({old_columns}) VALUES ({','.join([mark] * (old_columns.count(',') + 1))})",
            )
            await store.insert(new("OLD", now))
        finally:
            await store.close()
    store = opened()
    try:
        assert await store.migrate() == (latest - 1, schema.LATEST)
        await store.insert(replace(new("NEW", now), notice='{"to":"billing@acme.example","headers":""}'))
        claimed = {c.id: c.notice for c in await store.claim("A", "acme", now, 5, lease=30)}
        assert claimed == {"OLD": None, "NEW": '{"to":"billing@acme.example","headers":""}'}
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_queue_of_the_previous_version_gets_the_notice_tally_at_its_next_start(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue the version before made (SQLite 9, PostgreSQL 11) gets notice_tally and notice_counted, and
    keeps notice_counts, where an instance of the version before still counts (a rolling upgrade)."""
    url = "" if backend == "sqlite" else request.getfixturevalue("pg_cluster").new_database()
    schema = sqlite_schema if backend == "sqlite" else postgres_schema
    step = 10 if backend == "sqlite" else 12

    def opened() -> QueueStore:
        return SqliteQueue(tmp_path / "queue.sqlite3") if backend == "sqlite" else PostgresQueue(url)

    def tables() -> set[str]:
        if backend == "sqlite":
            with contextlib.closing(sqlite3.connect(tmp_path / "queue.sqlite3")) as db:
                return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        with psycopg.connect(url, autocommit=True) as conn:
            return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}

    with monkeypatch.context() as previous:
        previous.setattr(schema, "LATEST", step - 1)
        store = opened()
        try:
            assert await store.migrate() == (0, step - 1)
        finally:
            await store.close()
    assert "notice_counts" in tables() and "notice_tally" not in tables()
    store = opened()
    try:
        assert await store.migrate() == (step - 1, schema.LATEST)
    finally:
        await store.close()
    assert {"notice_counts", "notice_tally", "notice_counted"} <= tables()


def _without_notice(
    message_row: Callable[[NewMessage, float], queue_store.MessageRow],
) -> Callable[[NewMessage, float], queue_store.MessageRow]:
    """The previous version's row: the values without the notice (the one before the submission)."""

    def row(m: NewMessage, shift: float = 0.0) -> queue_store.MessageRow:
        made = message_row(m, shift)
        return made._replace(values=made.values[:-2] + made.values[-1:])

    return row


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_queue_a_newer_version_wrote_is_refused_as_too_new(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """QueueTooNew, not a passing outage: `serve` refuses to start on it (tests/test_config_refusals.py)."""
    store: QueueStore
    if backend == "sqlite":
        path = tmp_path / "queue.sqlite3"
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            db.execute("INSERT INTO schema_version VALUES (99)")
            db.commit()
        store = SqliteQueue(path)
    else:
        url = request.getfixturevalue("pg_cluster").new_database()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (99)")
        store = PostgresQueue(url)
    told: list[str] = []
    store.health.on_too_new = told.append  # the app stops the process on it (tests/test_queue_too_new.py)
    try:
        with pytest.raises(QueueTooNew, match="queue schema version 99 is newer than this gateway"):
            await store.open()
        with pytest.raises(QueueTooNew):  # every later use says the same; the owner was told once
            await store.open()
    finally:
        await store.close()
    assert len(told) == 1 and "queue schema version 99 is newer than this gateway" in told[0]
    # This instance's own fault even on the shared PostgreSQL queue: unready (a newer instance can serve).
    assert any("written by a newer version of the gateway" in p for p in store.health.problems())
