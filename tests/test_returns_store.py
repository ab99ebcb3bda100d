"""The ReturnStore contract on both backends (SQLite, PostgreSQL), two stores on one database standing for two
instances: an event cursor leased to one instance at a time and fenced, its window resumed where it stopped;
events matched to the recipients sent; suppressions; the webhook outbox written once per event, leased,
retried and reclaimed; one notice decision per message and recipient; notices counted per sender."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest

from gateway.ledger import returns_sql
from gateway.ledger import sql as ledger_sql
from gateway.ledger.backends import open_returns
from gateway.ledger.model import EventRow, MessageRow, NoticeRow, OutboxRow, RecipientRow, SuppressionRow
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.postgres_returns import PostgresReturns
from gateway.ledger.returns import ReturnStore
from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.store import LedgerStore
from tests.pgserver import PgCluster
from tests.queue_contract import stores_on_backend

T0 = 1_700_000_000.0
Pair = tuple[LedgerStore, ReturnStore]


@pytest.fixture(params=["sqlite", "postgresql"])
async def instances(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], Pair]]:
    async for factory in stores_on_backend(request, tmp_path, SqliteLedger, PostgresLedger):
        yield lambda make=factory: _pair(make())  # type: ignore[misc]


def _pair(ledger: LedgerStore) -> Pair:
    return ledger, open_returns(ledger)


async def sent(ledger: LedgerStore, msg_id: str, *rcpts: tuple[str, str, str], created: float = T0) -> None:
    """A message with recipients (address, state, upstream id)."""
    rows: list[MessageRow | RecipientRow] = [
        MessageRow(msg_id, created, "acme", "Billing@acme.example", "Invoice", 100, login="scanner")
    ]
    rows += [RecipientRow(msg_id, created, a, s, created + 1, upstream_id=u) for a, s, u in rcpts]  # type: ignore[arg-type]
    await ledger.write(rows)


async def test_an_event_cursor_is_leased_to_one_instance_fenced_and_resumed(instances: Callable[[], Pair]) -> None:
    (_, a), (_, b) = instances(), instances()
    lease, position = await a.lease_cursor("acme", "acme", "gw-a", T0, 60, T0 - 900)
    assert lease is not None and position == T0 - 900 and lease.window_until is None
    busy, seen = await b.lease_cursor("acme", "acme", "gw-b", T0 + 1, 60, T0)
    assert busy is None and seen == T0 - 900  # the first start is kept
    row = EventRow("ev1", "M1", T0, T0 + 2, "sent")
    assert await a.apply("acme", lease.token, [row], since=T0 - 900, until=T0, page=3, now=T0 + 2, lease=60) == [row]
    # a's lease runs out (it died); b takes over where a stopped: the window and the next page
    taken, _ = await b.lease_cursor("acme", "acme", "gw-b", T0 + 100, 60, T0)
    assert taken is not None and (taken.window_since, taken.window_until, taken.page) == (T0 - 900, T0, 3)
    assert taken.token > lease.token
    # a, back, is fenced: nothing it writes lands, its window does not complete
    late = EventRow("ev-late", "M1", T0, T0 + 3, "sent")
    assert await a.apply("acme", lease.token, [late], since=T0 - 900, until=T0, page=4, now=T0 + 101, lease=60) is None
    assert not await a.complete("acme", lease.token, T0, T0 + 101, 60)
    assert await b.complete("acme", taken.token, T0, T0 + 101, 60)
    await b.release("acme", taken.token)
    again, position = await a.lease_cursor("acme", "acme", "gw-a", T0 + 102, 60, T0)
    assert again is not None and position == T0 and again.window_until is None and again.page == 0
    [cursor] = await a.cursors()
    assert cursor["owner"] == "gw-a" and cursor["position"] == T0


async def test_events_match_the_recipients_sent_by_upstream_id_or_by_address(instances: Callable[[], Pair]) -> None:
    ledger, returns = instances()
    await ledger.open()
    await sent(ledger, "M1", ("A@Example.com", "sent", "EEID-1"), ("b@example.com", "sent", "EEID-1"))
    await sent(ledger, "M2", ("a@example.com", "sent", "TX-2"), created=T0 + 10)
    matches = await returns.match_ids(["EEID-1", "TX-2", "nobody"])
    assert sorted((m.msg_id, m.rcpt, m.upstream_id, m.account) for m in matches) == [
        ("M1", "a@example.com", "EEID-1", "acme"),
        ("M1", "b@example.com", "EEID-1", "acme"),
        ("M2", "a@example.com", "TX-2", "acme"),
    ]
    [first] = [m for m in matches if m.rcpt == "a@example.com" and m.msg_id == "M1"]
    assert first.address == "A@Example.com" and first.mail_from == "Billing@acme.example" and first.login == "scanner"
    assert first.state == "sent" and first.state_at == T0 + 1
    found = await returns.match_addresses(["A@EXAMPLE.com", "x@example.com"], T0)
    assert sorted(m.msg_id for m in found) == ["M1", "M2"]
    assert [m.msg_id for m in await returns.match_addresses(["a@example.com"], T0 + 5)] == ["M2"]


async def test_recipients_whose_call_answer_was_lost_are_found_by_address(instances: Callable[[], Pair]) -> None:
    """match_lost: recipients with no upstream id whose call has an `ambiguous` event (its answer was lost),
    not settled since (deferred, held or deleted dead); not a call refused or deferred plainly, nor one sent."""
    ledger, returns = instances()
    await ledger.open()
    rows: list[MessageRow | RecipientRow | EventRow] = []
    for msg_id, state, call, upstream_id, ambiguous in (
        ("L1", "deferred", "c1", None, True),  # answer lost, queued
        ("L2", "dead", "c1", None, True),  # answer lost, then held or deleted
        ("P1", "deferred", "c1", None, False),  # a plain 503: never sent
        ("P2", "dead", "c1", None, False),  # refused for good
        ("S1", "sent", "c1", "TX-9", True),  # answer lost, then a retry was answered
    ):
        rows.append(MessageRow(msg_id, T0, "acme", "billing@acme.example", "Invoice", 100))
        rows.append(RecipientRow(msg_id, T0, "A@Example.com", state, T0 + 1, upstream_id, call))  # type: ignore[arg-type]
        if ambiguous:
            rows.append(EventRow(f"{msg_id}-e", msg_id, T0, T0 + 1, "attempt", "A@Example.com", call, "ambiguous"))
    await ledger.write(rows)
    found = await returns.match_lost(["a@example.com", "x@example.com"], T0)
    assert sorted((m.msg_id, m.rcpt, m.state, m.lost) for m in found) == [
        ("L1", "a@example.com", "deferred", True),
        ("L2", "a@example.com", "dead", True),
    ]
    assert await returns.match_lost(["a@example.com"], T0 + 5) == []  # accepted before the window


async def test_suppressions_are_listed_removed_and_synced_with_a_vendor_list(instances: Callable[[], Pair]) -> None:
    ledger, returns = instances()
    await ledger.open()
    bounce = SuppressionRow("acme", "Gone@Example.com", "hard bounce", "bounced", T0, "M1", "550 no such user")
    await returns.suppress([bounce, SuppressionRow("crm", "gone@example.com", "hard bounce", "bounced", T0 + 1)])
    await returns.suppress([SuppressionRow("acme", "gone@example.com", "complaint", "complained", T0 + 2)])
    [kept] = await returns.suppressions("acme")
    assert (kept.address, kept.reason, kept.source, kept.msg_id) == ("gone@example.com", "hard bounce", "bounced", "M1")
    assert len(await returns.suppressions()) == 2
    invalid = [
        SuppressionRow("acme", a, "invalid at DMDS", "invalid_list", T0) for a in ("x@e.com", "GONE@example.com")
    ]
    added, removed = await returns.sync_source("acme", "invalid_list", invalid)
    assert (added, removed) == (["x@e.com"], [])  # gone@ was listed already (by its bounce)
    added, removed = await returns.sync_source("acme", "invalid_list", invalid[1:])
    assert (added, removed) == ([], ["x@e.com"])
    assert await returns.unsuppress("gone@example.com", "acme") == 1
    assert await returns.unsuppress("GONE@example.com") == 1  # crm's
    assert await returns.suppressions() == []
    # Entries a lifted source made (DMDS' Not-Sent) before the list was read go with the list's state; a later
    # one (the list may be older than it) and other sources' stay.
    await returns.suppress(
        [
            SuppressionRow("acme", "revalidated@e.com", "not sent", "not_sent", T0),
            SuppressionRow("acme", "still@e.com", "not sent", "not_sent", T0),
            SuppressionRow("acme", "late@e.com", "not sent", "not_sent", T0 + 20),
            SuppressionRow("acme", "bounced@e.com", "hard bounce", "bounced", T0),
        ]
    )
    listed = [SuppressionRow("acme", "still@e.com", "invalid at DMDS", "invalid_list", T0 + 3)]
    added, removed = await returns.sync_source("acme", "invalid_list", listed, ("not_sent",), read_at=T0 + 10)
    assert (added, removed) == ([], ["revalidated@e.com"])
    assert sorted((e.address, e.source) for e in await returns.suppressions("acme")) == [
        ("bounced@e.com", "bounced"),
        ("late@e.com", "not_sent"),
        ("still@e.com", "not_sent"),  # listed: its first entry is kept
    ]


@pytest.mark.parametrize("invalid_first", [True, False], ids=["list-first", "bounce-first"])
async def test_a_read_back_bounce_replaces_an_entry_only_the_invalid_list_made(
    instances: Callable[[], Pair], invalid_first: bool
) -> None:
    """DMDS lists a hard-bounced address among its invalid contacts: its list's sync and the poll that reads the
    bounce back race (which writes first is chance). Either way the entry is the bounce's (its reason, message
    and detail), and the list's next sync, the address listed or not, neither adds to it nor removes it."""
    ledger, returns = instances()
    await ledger.open()
    listed = [SuppressionRow("acme", "gone@example.com", "invalid contact at the upstream", "invalid_list", T0)]
    bounce = SuppressionRow(
        "acme", "Gone@Example.com", "hard bounce", "bounced", T0 + 5, "M1", "550 5.1.1 User unknown", "ev-1"
    )
    lease, _ = await returns.lease_cursor("acme", "acme", "gw-a", T0, 60, T0 - 900)
    assert lease is not None
    if invalid_first:
        assert await returns.sync_source("acme", "invalid_list", listed) == (["gone@example.com"], [])
    page = [EventRow("ev-1", "M1", T0 + 5, T0 + 6, "bounced", recipient="gone@example.com"), bounce]
    assert await returns.apply("acme", lease.token, page, since=T0, until=T0 + 10, page=1, now=T0 + 10, lease=60)
    if not invalid_first:
        assert await returns.sync_source("acme", "invalid_list", listed) == ([], [])
    [kept] = await returns.suppressions("acme")
    assert (kept.address, kept.reason, kept.source, kept.created, kept.msg_id, kept.detail) == (
        "gone@example.com",
        "hard bounce",
        "bounced",
        T0 + 5,
        "M1",
        "550 5.1.1 User unknown",
    )
    assert await returns.sync_source("acme", "invalid_list", listed) == ([], [])
    assert await returns.sync_source("acme", "invalid_list", []) == ([], [])  # revalidated: the bounce stays
    assert [(e.address, e.source) for e in await returns.suppressions("acme")] == [("gone@example.com", "bounced")]
    # Nothing else is replaced: an operator's entry, or an event's, by another event or by the list.
    await returns.suppress([SuppressionRow("acme", "kept@example.com", "asked to", "operator", T0)])
    await returns.suppress([SuppressionRow("acme", "kept@example.com", "hard bounce", "bounced", T0 + 1, "M2")])
    await returns.suppress([SuppressionRow("acme", "gone@example.com", "spam complaint", "complained", T0 + 2)])
    assert await returns.sync_source("acme", "invalid_list", [listed[0]._replace(address="kept@example.com")]) == (
        [],
        [],
    )
    assert sorted((e.address, e.source) for e in await returns.suppressions("acme")) == [
        ("gone@example.com", "bounced"),
        ("kept@example.com", "operator"),
    ]


async def test_an_event_read_again_does_not_suppress_again(instances: Callable[[], Pair]) -> None:
    """The next window's overlap reads an event again: its suppression, removed since (by the operator, or by
    the vendor's invalid-contacts list), stays removed; an event read for the first time still suppresses."""
    ledger, returns = instances()
    await ledger.open()

    def page(event_id: str, address: str) -> list[EventRow | SuppressionRow]:
        return [
            EventRow(event_id, "M1", T0, T0 + 5, "not_sent", recipient=address),
            SuppressionRow("acme", address, "not sent", "not_sent", T0 + 5, "M1", None, event_id),
        ]

    lease, _ = await returns.lease_cursor("acme", "acme", "gw-a", T0, 60, T0 - 900)
    assert lease is not None
    first = page("ev-1", "old@example.com")
    assert (
        await returns.apply("acme", lease.token, first, since=T0, until=T0 + 10, page=1, now=T0 + 10, lease=60) == first
    )
    assert [s.address for s in await returns.suppressions("acme")] == ["old@example.com"]
    assert await returns.unsuppress("old@example.com", "acme") == 1
    again = page("ev-1", "old@example.com") + page("ev-2", "new@example.com")
    written = await returns.apply("acme", lease.token, again, since=T0, until=T0 + 20, page=2, now=T0 + 20, lease=60)
    assert written == again[:1] + again[2:]  # ev-1's timeline row is an upsert; its suppression is left out
    assert [s.address for s in await returns.suppressions("acme")] == ["new@example.com"]


async def test_the_outbox_delivers_each_event_once_leased_retried_and_reclaimed(instances: Callable[[], Pair]) -> None:
    (ledger, a), (_, b) = instances(), instances()
    await ledger.open()
    row = OutboxRow("app", "ev1", "M1", T0, T0, "bounced", '{"id": "ev1"}')
    await ledger.write([row, row, OutboxRow("ops", "ev1", "M1", T0, T0, "bounced", "{}")])
    await ledger.write([row])  # the event read again by an overlapping poll: not a second delivery
    assert await a.pending_deliveries() == {"app": 1, "ops": 1}
    first = await a.claim_deliveries("gw-a", T0 + 1, 10, 30)
    assert sorted(d.webhook for d in first) == ["app", "ops"] and not any(d.reclaimed for d in first)
    assert await b.claim_deliveries("gw-b", T0 + 2, 10, 30) == []  # leased
    app = next(d for d in first if d.webhook == "app")
    assert app.body == '{"id": "ev1"}' and app.type == "bounced" and app.attempts == 0
    assert await a.settle_delivery(app, "pending", attempts=1, next_attempt=T0 + 10, error="HTTP 500", now=T0 + 2)
    assert await b.claim_deliveries("gw-b", T0 + 5, 10, 30) == []  # not due yet
    [again] = await b.claim_deliveries("gw-b", T0 + 11, 10, 30)
    assert again.webhook == "app" and again.attempts == 1 and not again.reclaimed
    # ops's owner died mid-POST: its lease expires and the delivery is reclaimed (it may have been received)
    [reclaimed] = await b.claim_deliveries("gw-b", T0 + 40, 10, 30)
    assert reclaimed.webhook == "ops" and reclaimed.reclaimed
    ops = next(d for d in first if d.webhook == "ops")
    assert not await a.settle_delivery(ops, "delivered", attempts=1, next_attempt=0, error=None, now=T0 + 41)
    done = EventRow("wd1", "M1", T0, T0 + 41, "webhook_delivered")
    assert await b.settle_delivery(
        reclaimed, "delivered", attempts=1, next_attempt=0, error=None, now=T0 + 41, rows=[done]
    )
    assert await b.settle_delivery(again, "failed", attempts=2, next_attempt=0, error="expired", now=T0 + 41)
    assert await a.pending_deliveries() == {}
    record = await ledger.get("M1")
    assert record is None  # the timeline row of a message whose own row is not here: get() needs the message
    assert await b.claim_deliveries("gw-b", T0 + 10_000, 10, 30) == []


async def test_the_outbox_claims_each_webhook_up_to_its_room(instances: Callable[[], Pair]) -> None:
    """`room`: each named webhook's due deliveries read on their own (another's earlier queue cannot crowd
    them out), at most its room; a webhook not named (removed) shares what the limit leaves."""
    (ledger, a), _ = instances(), instances()
    await ledger.open()
    rows = [OutboxRow("slow", f"s{n}", "M1", T0, T0 - 100 + n, "bounced", "{}") for n in range(6)]
    rows += [OutboxRow("fast", "f1", "M1", T0, T0, "bounced", "{}"), OutboxRow("gone", "g1", "M1", T0, T0, "x", "{}")]
    await ledger.write(rows)
    got = await a.claim_deliveries("gw-a", T0 + 1, 4, 30, room={"slow": 2, "fast": 2})
    assert sorted(d.event_id for d in got) == ["f1", "g1", "s0", "s1"]
    assert await a.claim_deliveries("gw-a", T0 + 1, 4, 30, room={"slow": 0, "fast": 2}) == []
    more = await a.claim_deliveries("gw-a", T0 + 1, 1, 30, room={"slow": 3, "fast": 2})
    assert [d.event_id for d in more] == ["s2"]  # the limit before the room


async def test_the_outbox_claims_a_removed_webhooks_deliveries_besides_the_named_ones(
    instances: Callable[[], Pair],
) -> None:
    """A removed webhook's deliveries (a webhook `room` does not name) are read besides the named webhooks'
    `limit`, up to `removed`: they end without a POST, so they never wait for the named ones' backlog (review
    today7 F1: they got only what `limit` left, nothing while the rooms filled it); an empty `room` (no webhook
    configured) reads only those (N4)."""
    (ledger, a), _ = instances(), instances()
    await ledger.open()
    rows = [OutboxRow("gone", f"g{n}", "M1", T0, T0 - 200 + n, "x", "{}") for n in range(3)]
    rows += [OutboxRow(w, f"{w}{n}", "M1", T0, T0 - 50 + n, "x", "{}") for w in ("a", "b") for n in range(5)]
    await ledger.write(rows)
    got = await a.claim_deliveries("gw-a", T0, 4, 30, room={"a": 2, "b": 2}, removed=1)
    assert sorted(d.event_id for d in got) == ["a0", "a1", "b0", "b1", "g0"]
    got = await a.claim_deliveries("gw-a", T0, 0, 30, room={"a": 0, "b": 2}, removed=8)
    assert sorted(d.event_id for d in got) == ["g1", "g2"]  # every slot taken: still ended
    await ledger.write([OutboxRow("gone", "g3", "M1", T0, T0 - 10, "x", "{}")])
    # No webhook configured: every webhook with rows is a removed one.
    got = await a.claim_deliveries("gw-a", T0, 0, 30, room={}, removed=20)
    assert sorted(d.event_id for d in got) == ["a2", "a3", "a4", "b2", "b3", "b4", "g3"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_each_webhooks_due_deliveries_and_the_outbox_webhooks_are_read_by_index(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A receiver's outage leaves a backlog of one webhook's due deliveries: another webhook's query seeks its
    own rows by (webhook, state, next_attempt), not a walk of that backlog in due order, and the webhooks that
    have rows (to read a removed one's by name) are found one index seek each, not by a walk of every row."""
    big = [OutboxRow("big", f"b{n}", "M1", T0, T0 - 10_000 + n, "bounced", "{}") for n in range(2000)]
    small = [OutboxRow("small", f"s{n}", "M1", T0, T0 - 10 + n, "bounced", "{}") for n in range(3)]
    due = (returns_sql.FOR_SQLITE if backend == "sqlite" else returns_sql.FOR_POSTGRES).outbox_due_of
    hooks = (returns_sql.FOR_SQLITE if backend == "sqlite" else returns_sql.FOR_POSTGRES).outbox_webhooks
    if backend == "sqlite":
        path = tmp_path / "queue.sqlite3"
        ledger: LedgerStore = SqliteLedger(path)
    else:
        url = request.getfixturevalue("pg_cluster").new_database()
        ledger = PostgresLedger(url)
    try:
        await ledger.open()
        await ledger.write([*big, *small])
        assert await open_returns(ledger).claim_deliveries("gw-a", T0, 2, 30, room={"small": 1}) != []
    finally:
        await ledger.close()
    if backend == "sqlite":
        with contextlib.closing(sqlite3.connect(path)) as db:
            plan = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {due}", ("small", T0, 8))]
            assert plan == [
                "SEARCH webhook_outbox USING INDEX webhook_outbox_due_of (webhook=? AND state=? AND next_attempt<?)"
            ]
            plan = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {hooks}")]
            assert not [p for p in plan if p.startswith("SCAN webhook_outbox")] and len(plan) > 1, plan
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE webhook_outbox")  # the statistics autovacuum would gather, now
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {due}", ("small", T0, 8)))
        assert "Index Scan using webhook_outbox_due_of" in plan and "Sort" not in plan, plan
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {hooks}"))
        assert "Seq Scan" not in plan, plan


async def test_one_notice_decision_per_message_and_recipient(instances: Callable[[], Pair]) -> None:
    (ledger, a), (_, b) = instances(), instances()
    await ledger.open()
    await sent(ledger, "M1", ("a@example.com", "bounced", "E1"), ("b@example.com", "sent", "E1"))
    await sent(ledger, "M2", ("c@example.com", "dead", None))
    bounced = NoticeRow("M1", T0, "A@example.com", T0 + 2)
    await ledger.write([bounced, NoticeRow("M2", T0, "c@example.com", T0 + 3)])
    await ledger.write([bounced])  # the bounce read again: still one decision
    claims = await a.claim_notices("gw-a", T0 + 5, 30, 10)
    assert [(c.msg_id, c.rcpt) for c in claims] == [("M1", "a@example.com"), ("M2", "c@example.com")]
    assert await b.claim_notices("gw-b", T0 + 5, 30, 10) == []  # a has them
    m1 = [c for c in claims if c.msg_id == "M1"]
    dsn = EventRow("d1", "M1", T0, T0 + 6, "dsn_sent", recipient="a@example.com")
    assert await a.finish_notices(m1, "sent", T0 + 6, "DSN0000000000001", None, [dsn]) == 1
    await ledger.write([bounced])  # decided: a row written again does not make it pending
    # a died before deciding M2's: its lease expires and b takes it over
    assert await b.claim_notices("gw-b", T0 + 20, 30, 10) == []
    [taken] = await b.claim_notices("gw-b", T0 + 40, 30, 10)
    assert (taken.msg_id, taken.rcpt) == ("M2", "c@example.com") and taken.token > claims[-1].token
    assert await a.finish_notices([c for c in claims if c.msg_id == "M2"], "sent", T0 + 41, "X", None, []) == 0
    await b.postpone_notices([taken], T0 + 100, "the queue could not take it")
    assert await a.claim_notices("gw-a", T0 + 50, 30, 10) == []
    assert await b.finish_notices([taken], "skipped", T0 + 101, None, "notify off", []) == 1
    assert await a.claim_notices("gw-a", T0 + 1000, 30, 10) == []
    data = await a.notice_data("M1")
    assert data is not None and data[1] is None and [e.kind for e in data[0].events] == ["dsn_sent"]


async def test_notices_per_sender_are_counted_per_window(instances: Callable[[], Pair]) -> None:
    (ledger, a), (_, b) = instances(), instances()
    await ledger.open()
    now = 3600 * 1000 + 10.0
    assert await a.count_notice("k1", "acme", "s@example.com", 3600, 2, now)
    assert await b.count_notice("k2", "acme", "s@example.com", 3600, 2, now + 1)
    assert not await a.count_notice("k3", "acme", "s@example.com", 3600, 2, now + 2)
    assert await a.count_notice("k4", "acme", "t@example.com", 3600, 2, now + 2)
    await a.uncount_notice("k2")  # a notice not handed over (4xx): given back
    assert await b.count_notice("k5", "acme", "s@example.com", 3600, 2, now + 6)
    assert not await a.count_notice("k6", "acme", "s@example.com", 3600, 2, now + 7)
    await a.uncount_notice("k7")  # nothing taken: nothing to give back
    assert await a.count_notice("k8", "acme", "u@example.com", 3600, 1, now + 8)
    assert not await a.count_notice("k9", "acme", "u@example.com", 3600, 1, now + 9)
    assert await b.count_notice("k10", "acme", "s@example.com", 3600, 2, now + 3600)  # the next window


async def test_a_notice_counted_already_is_not_counted_again(instances: Callable[[], Pair]) -> None:
    """A decision taken over after its notice was handed to the queue counts it again under the same key:
    it is not refused by the limit, and takes nothing more (review after250c F3)."""
    (ledger, a), (_, b) = instances(), instances()
    await ledger.open()
    now = 3600 * 1000 + 10.0
    assert await a.count_notice("notice:m1", "acme", "s@example.com", 3600, 1, now)
    assert await b.count_notice("notice:m1", "acme", "s@example.com", 3600, 1, now + 130)  # taken over
    assert not await b.count_notice("notice:m2", "acme", "s@example.com", 3600, 1, now + 131)
    # In the next window too (the takeover came late): still the one count, which the new window does not hold.
    assert await b.count_notice("notice:m1", "acme", "s@example.com", 3600, 1, now + 3600)
    assert await b.count_notice("notice:m3", "acme", "s@example.com", 3600, 1, now + 3601)
    # What a decision taken over looks at first (its recipients may have been requeued since: review today6a F4).
    assert await a.notice_counted("notice:m1", now + 3602) and not await a.notice_counted("notice:m2", now + 3602)
    await a.uncount_notice("notice:m3")
    assert not await b.notice_counted("notice:m3", now + 3602)


async def test_notice_counts_are_per_account_and_pruned_by_their_own_window(instances: Callable[[], Pair]) -> None:
    """Account A allows one notice a day per sender, B one a minute: B's counting neither shares A's count
    nor prunes it (review after250c F4)."""
    (ledger, a), (_, b) = instances(), instances()
    await ledger.open()
    day = 86400 * 20000.0  # the start of a day, and of a minute
    assert await a.count_notice("a1", "A", "s@example.com", 86400, 1, day + 10)
    assert await b.count_notice("b1", "B", "s@example.com", 60, 1, day + 20)  # another account's count
    assert await b.count_notice("b2", "B", "s@example.com", 60, 1, day + 130)  # B's next minute: prunes B's
    assert not await a.count_notice("a2", "A", "s@example.com", 86400, 1, day + 140), "A's daily limit was reset"
    # Two windows of one account starting together (an hour and ten minutes, on the hour) count apart.
    assert await a.count_notice("a3", "A", "t@example.com", 3600, 1, day + 3600)
    assert await a.count_notice("a4", "A", "t@example.com", 600, 1, day + 3601)
    assert await a.count_notice("a5", "A", "s@example.com", 86400, 1, day + 86400)  # A's next day


async def test_the_leases_of_an_owner_that_is_gone_end_at_once(instances: Callable[[], Pair]) -> None:
    (ledger, a), (_, b) = instances(), instances()
    await ledger.open()
    await ledger.write([OutboxRow("app", "ev1", "M1", T0, T0, "sent", "{}"), NoticeRow("M1", T0, "a@example.com", T0)])
    assert await a.lease_cursor("acme", "acme", "host:1:dead", T0, 600, T0) != (None, T0)
    assert len(await a.claim_deliveries("host:1:dead", T0, 10, 600)) == 1
    assert len(await a.claim_notices("host:1:dead", T0, 600, 10)) == 1
    assert await b.owners() == ["host:1:dead"]
    assert (await b.lease_cursor("acme", "acme", "host:2:live", T0 + 1, 600, T0))[0] is None
    assert await b.expire_owners(["host:1:dead"], T0 + 2) == 3
    assert (await b.lease_cursor("acme", "acme", "host:2:live", T0 + 3, 600, T0))[0] is not None
    [again] = await b.claim_deliveries("host:2:live", T0 + 3, 10, 600)
    assert again.reclaimed
    assert len(await b.claim_notices("host:2:live", T0 + 3, 600, 10)) == 1
    assert await b.owners() == ["host:2:live"]


async def test_a_suppression_kept_under_an_old_unicode_key_is_still_removed(
    instances: Callable[[], Pair], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 6 and older kept an internationalized domain as typed (lower case), the keys are now IDNA: removing
    the address removes the entry under either key (else the operator could never remove it)."""
    ledger, returns = instances()
    await ledger.open()
    with monkeypatch.context() as old:
        old.setattr(ledger_sql, "address_key", lambda address: address.strip().lower())
        await returns.suppress([SuppressionRow("acme", "a@Bücher.example", "hard bounce", "bounced", T0)])
    assert [s.address for s in await returns.suppressions("acme")] == ["a@bücher.example"]
    assert await returns.unsuppress("A@bücher.example", "acme") == 1
    assert await returns.suppressions() == []


# The return path's leases on a PostgreSQL ledger shared by instances whose clocks disagree: B's host runs 2 minutes
# ahead of A's (and of the database's, which runs on this host), more than any lease here.
SKEW = 120.0


@contextlib.asynccontextmanager
async def skewed(pg_cluster: PgCluster) -> AsyncIterator[tuple[PostgresLedger, ReturnStore, ReturnStore]]:
    """A's return store on this host's clock, B's on a clock SKEW seconds ahead, on one PostgreSQL ledger."""
    url = pg_cluster.new_database()
    ledgers = [PostgresLedger(url), PostgresLedger(url)]
    try:
        await ledgers[0].open()
        yield ledgers[0], PostgresReturns(ledgers[0]), PostgresReturns(ledgers[1], clock=lambda: time.time() + SKEW)
    finally:
        for ledger in ledgers:
            await ledger.close()


async def test_a_webhook_lease_is_not_taken_over_by_an_instance_whose_clock_is_ahead(pg_cluster: PgCluster) -> None:
    """A is POSTing a delivery under a 60 s lease; B's clock is 2 minutes ahead and B passes its own clock's
    `now`, as its webhook loop does. The lease ends by the database's clock: B may not reclaim it now (the
    receiver would get the event twice), only once its 60 s are over."""
    async with skewed(pg_cluster) as (ledger, a, b):
        now = time.time()
        await ledger.write([OutboxRow("app", "ev1", "M1", now, now, "bounced", '{"id": "ev1"}')])
        [held] = await a.claim_deliveries("gw-a", now, 10, 60)
        b_now = time.time() + SKEW
        assert await b.claim_deliveries("gw-b", b_now, 10, 60) == [], "B took over A's live webhook lease"
        # The events poll's cursor, leased likewise.
        assert (await a.lease_cursor("acme", "acme", "gw-a", now, 60, now))[0] is not None
        assert (await b.lease_cursor("acme", "acme", "gw-b", b_now, 60, now))[0] is None, "B took A's cursor"
        # Durations still come from B's clock: 61 s on, A's lease is over for B too.
        [reclaimed] = await b.claim_deliveries("gw-b", b_now + 61, 10, 60)
        assert reclaimed.reclaimed and reclaimed.token > held.token
        assert (await b.lease_cursor("acme", "acme", "gw-b", b_now + 61, 60, now))[0] is not None


async def test_a_notice_lease_is_not_taken_over_by_an_instance_whose_clock_is_ahead(pg_cluster: PgCluster) -> None:
    """A decides a notice under notices.LEASE (120 s); B, 2 minutes ahead, may not take the decision over while
    it is A's, nor a decision A postponed before its time."""
    async with skewed(pg_cluster) as (ledger, a, b):
        now = time.time()
        await ledger.write(
            [
                MessageRow("M2", now, "acme", "billing@acme.example", "Invoice", 100),
                RecipientRow("M2", now, "c@example.com", "dead", now + 1),
                NoticeRow("M2", now, "c@example.com", now + 2),
            ]
        )
        [held] = await a.claim_notices("gw-a", now, 120, 10)
        b_now = time.time() + SKEW
        assert await b.claim_notices("gw-b", b_now + 5, 120, 10) == [], "B took over A's live notice lease"
        await a.postpone_notices([held], time.time() + 300, "the delivery owner was busy")
        assert await b.claim_notices("gw-b", b_now + 200, 120, 10) == [], "B took a postponed notice early"
        [taken] = await b.claim_notices("gw-b", b_now + 301, 120, 10)
        assert taken.token > held.token
