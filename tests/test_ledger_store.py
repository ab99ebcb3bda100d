"""The LedgerStore contract, run against both backends (SQLite, and PostgreSQL on the tests' private cluster):
upserts that keep the later state whatever order instances flush in, events stored once by id, every
lookup of the search, paging, retention."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import psycopg
import pytest

from gateway.ledger import sql
from gateway.ledger.model import BadQuery, Cursor, EventRow, MessageRow, Query, RecipientRow, Record, json
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.store import LedgerStore, LedgerUnavailable
from gateway.queue.sqlite import SqliteQueue
from tests.queue_contract import stores_on_backend

Factory = Callable[[], LedgerStore]
# A statement built for a backend's placeholder and its parameters -> the lines of its query plan.
Explain = Callable[[Callable[[str], str], Sequence[object]], list[str]]
T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Several stores on one database are several instances on one queue."""
    async for factory in stores_on_backend(request, tmp_path, SqliteLedger, PostgresLedger):
        yield factory


@pytest.fixture
async def store(make_store: Factory) -> LedgerStore:
    s = make_store()
    await s.open()
    return s


def message(msg_id: str, created: float = T0, **fields: object) -> MessageRow:
    values: dict[str, object] = {
        "account": "acme",
        "mail_from": "Billing@Acme.example",
        "subject": "Invoice",
        "size": 5120,
        "login": "scanner",
        "listener": "submission",
        "peer": "192.0.2.7:51234",
        "message_id": "<m-" + msg_id.lower() + "@acme.example>",
        "reply_id": "EEID-" + msg_id,
        "reply": f"250 2.0.0 Ok: queued as EEID-{msg_id}",
        "request": json(
            [{"call": "0", "method": "POST", "path": "/v1/envio/send_one_inline/", "body": {"html": "<p>"}}]
        ),
    }
    values.update(fields)
    return MessageRow(msg_id, created, **values)  # type: ignore[arg-type]


def rcpt(msg_id: str, address: str, state: str, at: float, created: float = T0, **fields: object) -> RecipientRow:
    return RecipientRow(msg_id, created, address, state, at, **fields)  # type: ignore[arg-type]


def event(
    event_id: str, msg_id: str, at: float, kind: str = "attempt", created: float = T0, **fields: object
) -> EventRow:
    return EventRow(event_id, msg_id, created, at, kind, **fields)  # type: ignore[arg-type]


async def test_a_record_round_trips_with_its_recipients_timeline_and_request(store: LedgerStore) -> None:
    await store.write(
        [
            message("M1"),
            rcpt("M1", "A@Example.com", "sent", T0 + 1, upstream_id="EEID-M1", call="0"),
            rcpt("M1", "b@example.com", "deferred", T0 + 1, call="1", reason="DMDS answered 503"),
            event("e1", "M1", T0, "accepted", detail="250 2.0.0 Ok"),
            event("e2", "M1", T0 + 1, call="0", outcome="delivered", upstream_id="EEID-M1", actor="gw:1:aa"),
            event("e3", "M1", T0 + 1, call="1", outcome="deferred", detail="DMDS answered 503", data=json({"n": 1})),
        ]
    )
    record = await store.get("m1")  # local ids are upper-case hex; any case finds them
    assert record is not None
    assert (record.id, record.account, record.login, record.listener, record.peer) == (
        "M1",
        "acme",
        "scanner",
        "submission",
        "192.0.2.7:51234",
    )
    assert record.mail_from == "Billing@Acme.example" and record.message_id == "m-m1@acme.example"
    assert [(r.address, r.state, r.upstream_id) for r in record.recipients] == [
        ("A@Example.com", "sent", "EEID-M1"),
        ("b@example.com", "deferred", None),
    ]
    assert [e.kind for e in record.events] == ["accepted", "attempt", "attempt"]
    assert record.events[2].data == {"n": 1} and record.events[1].actor == "gw:1:aa"
    assert record.request[0]["path"] == "/v1/envio/send_one_inline/"
    assert record.state == "deferred"
    assert await store.get("NOPE") is None


async def test_events_are_stored_once_and_batches_can_be_written_again(store: LedgerStore) -> None:
    batch = [message("M1"), rcpt("M1", "a@example.com", "sent", T0 + 1), event("e1", "M1", T0)]
    await store.write(batch)
    await store.write(batch)  # a retried flush, an upstream event read twice
    await store.write([event("e1", "M1", T0 + 5, detail="the same id")])
    record = await store.get("M1")
    assert record is not None and len(record.events) == 1 and record.events[0].detail is None
    assert len(record.recipients) == 1


async def test_one_batch_may_carry_several_states_of_one_recipient(store: LedgerStore) -> None:
    await store.write(
        [
            message("M1"),
            rcpt("M1", "a@example.com", "accepted", T0, call="0"),
            event("e1", "M1", T0, "accepted"),
            rcpt("M1", "A@example.com", "sent", T0 + 1, upstream_id="EEID-1", call="0"),
            event("e2", "M1", T0 + 1),
            event("e1", "M1", T0 + 2, detail="the same event again"),
        ]
    )
    record = await store.get("M1")
    assert record is not None and [(r.state, r.upstream_id) for r in record.recipients] == [("sent", "EEID-1")]
    assert [(e.id, e.detail) for e in record.events] == [("e1", None), ("e2", None)]


async def test_the_later_state_wins_whatever_order_instances_flush_in(make_store: Factory) -> None:
    accepting, claiming = make_store(), make_store()
    # The claiming instance flushes first: its row for the message fills only what is known from the queue.
    await claiming.write(
        [
            message("M1", login=None, listener=None, peer=None, reply=None, reply_id=None),
            rcpt("M1", "a@example.com", "sent", T0 + 30, upstream_id="EEID-9", call="0"),
            event("b1", "M1", T0 + 30, outcome="delivered", upstream_id="EEID-9"),
        ]
    )
    await accepting.write(
        [
            message("M1", reply_id="M1", reply="250 2.0.0 Ok: queued as M1"),
            rcpt("M1", "a@example.com", "accepted", T0, call="0"),
            event("a1", "M1", T0, "accepted"),
        ]
    )
    record = await accepting.get("M1")
    assert record is not None
    assert [(r.state, r.upstream_id) for r in record.recipients] == [("sent", "EEID-9")]
    assert (record.listener, record.reply_id, record.reply) == ("submission", "M1", "250 2.0.0 Ok: queued as M1")
    assert [e.id for e in record.events] == ["a1", "b1"]
    # An operator requeues a dead letter: newer, though less far along, it wins.
    await claiming.write([rcpt("M1", "a@example.com", "dead", T0 + 40, reason="refused")])
    await claiming.write([rcpt("M1", "a@example.com", "deferred", T0 + 50, reason="requeued by an operator")])
    record = await claiming.get("M1")
    assert record is not None and [(r.state, r.reason) for r in record.recipients] == [
        ("deferred", "requeued by an operator")
    ]
    # A vendor event stamped earlier than our own `sent` (clock skew) still advances the state.
    await claiming.write([rcpt("M1", "a@example.com", "sent", T0 + 60, upstream_id="EEID-9")])
    await claiming.write([rcpt("M1", "a@example.com", "delivered", T0 + 59)])
    record = await claiming.get("M1")
    assert record is not None and [(r.state, r.upstream_id) for r in record.recipients] == [("delivered", "EEID-9")]
    # A late answer to an instance whose lease had expired: its `deferred` does not undo what is known.
    await accepting.write([rcpt("M1", "a@example.com", "deferred", T0 + 70, reason="DMDS answered 503")])
    record = await claiming.get("M1")
    assert record is not None and [r.state for r in record.recipients] == ["delivered"]


async def test_every_lookup_finds_its_messages(store: LedgerStore) -> None:
    await store.write(
        [
            message("M1", T0, login="scanner", account="acme"),
            rcpt("M1", "a@example.com", "sent", T0, upstream_id="BATCH-1"),
            message("M2", T0 + 10, login="erp", account="crm", mail_from="shop@crm.example"),
            rcpt("M2", "B@example.com", "dead", T0 + 10, reason="refused"),
            message("M3", T0 + 20, reply_id="BATCH-1"),
            rcpt("M3", "c@example.com", "sent", T0 + 20, upstream_id="BATCH-1"),
            rcpt("M3", "b@example.com", "deferred", T0 + 20),
        ]
    )

    async def ids(**filters: object) -> list[str]:
        page = await store.find(Query(**filters))  # type: ignore[arg-type]
        return [r.id for r in page.records]

    assert await ids() == ["M3", "M2", "M1"]  # newest first
    assert await ids(id="m2") == ["M2"]
    assert await ids(reply_id="BATCH-1") == ["M3"]
    assert await ids(upstream_id="BATCH-1") == ["M3", "M1"]  # a DMDS batch: several messages share an eeid
    assert await ids(message_id="m-m1@acme.example") == ["M1"]
    assert await ids(message_id="<m-m1@acme.example>") == ["M1"]
    assert await ids(sender="billing@acme.EXAMPLE") == ["M3", "M1"]
    assert await ids(recipient="b@EXAMPLE.com") == ["M3", "M2"]
    assert await ids(login="erp") == ["M2"]
    assert await ids(account="acme") == ["M3", "M1"]
    assert await ids(state="dead") == ["M2"]
    assert await ids(state="deferred", recipient="b@example.com") == ["M3"]
    assert await ids(since=T0 + 10) == ["M3", "M2"]
    assert await ids(until=T0 + 10) == ["M1"]
    assert await ids(sender="nobody@example.com") == []
    page = await store.find(Query(recipient="b@example.com"))
    assert [(r.address, r.state) for r in page.records[0].recipients] == [
        ("b@example.com", "deferred"),
        ("c@example.com", "sent"),
    ]
    assert page.records[0].events == () and page.records[0].request is None  # summaries only


async def test_state_and_recipient_searches_page_each_message_once_in_order(store: LedgerStore, tmp_path: Path) -> None:
    """A search by state or recipient walks the recipients (the page's own order, newest first, ties by id):
    a message with several recipients in the state still comes once, and paging with other filters finds
    exactly what filtering every message would, whichever walk serves it (SQLite's choice by counted ranges,
    PostgreSQL's planner; on SQLite each possible walk is also run itself)."""
    rows: list[MessageRow | RecipientRow] = []
    for n in range(12):
        msg_id, created = f"S{n:02d}", T0 + n // 3  # several messages a second: ties broken by id
        rows.append(message(msg_id, created, login=("scanner", "erp")[n % 2]))
        for address, state in (("a@example.com", "sent"), ("b@example.com", "sent"), (f"{n}@example.com", "dead")):
            if n % 3 or address != "b@example.com":
                rows.append(rcpt(msg_id, address, state if n % 4 else "deferred", T0 + 50, created))
    await store.write(rows)
    everything = [r for r in (await store.find(Query(limit=500))).records]

    def expected(**filters: object) -> list[str]:
        def keeps(r: Record) -> bool:
            states = {x.state for x in r.recipients}
            addresses = {x.address for x in r.recipients}
            return (
                ("state" not in filters or filters["state"] in states)
                and ("recipient" not in filters or filters["recipient"] in addresses)
                and ("login" not in filters or filters["login"] == r.login)
                and ("since" not in filters or r.created >= filters["since"])  # type: ignore[operator]
                and ("until" not in filters or r.created < filters["until"])  # type: ignore[operator]
            )

        return [r.id for r in everything if keeps(r)]

    async def paged(**filters: object) -> list[str]:
        seen: list[str] = []
        cursor: Cursor | None = None
        while True:
            page = await store.find(Query(limit=2, cursor=cursor, **filters))  # type: ignore[arg-type]
            seen += [r.id for r in page.records]
            if page.next is None:
                return seen
            cursor = Cursor.decode(page.next.encode())

    for filters in (
        {"state": "sent"},
        {"state": "deferred"},
        {"state": "dead", "login": "erp"},
        {"state": "sent", "since": T0 + 1, "until": T0 + 3},
        {"recipient": "b@example.com"},
        {"recipient": "a@example.com", "state": "deferred"},
        {"recipient": "A@Example.com", "login": "scanner", "until": T0 + 3},
        {"state": "accepted"},
    ):
        found = await paged(**filters)
        assert found == expected(**{k: v.lower() if k == "recipient" else v for k, v in filters.items()}), filters
        if isinstance(store, SqliteLedger):
            query = Query(limit=500, **filters)  # type: ignore[arg-type]
            with contextlib.closing(sqlite3.connect(tmp_path / "queue.sqlite3")) as db:
                for walk in sql.drivers(query):
                    rows = db.execute(*sql.search(query, "?", walk)).fetchall()
                    assert [r[0] for r in rows] == found, (filters, walk)
    assert len(await paged(state="sent")) == 9 and len(await paged(recipient="b@example.com")) == 8


async def test_pages_follow_the_cursor_without_gaps_or_repeats(store: LedgerStore) -> None:
    # Several messages in the same second: the cursor breaks ties by id.
    rows = [message(f"M{n:02d}", T0 + n // 3) for n in range(10)]
    await store.write(rows)
    seen: list[str] = []
    cursor: Cursor | None = None
    while True:
        page = await store.find(Query(limit=4, cursor=cursor))
        seen += [r.id for r in page.records]
        if page.next is None:
            break
        cursor = Cursor.decode(page.next.encode())
    assert seen == sorted((r.id for r in rows), key=lambda i: (T0 + int(i[1:]) // 3, i), reverse=True)
    with pytest.raises(BadQuery):
        Cursor.decode("not-a-cursor")
    with pytest.raises(BadQuery):
        Query(limit=501)


async def test_retention_prunes_old_messages_in_bounded_batches(store: LedgerStore) -> None:
    await store.write(
        [
            *[message(f"OLD{n}", T0 + n) for n in range(5)],
            *[event(f"old-e{n}", f"OLD{n}", T0 + n) for n in range(5)],
            message("NEW", T0 + 100),
            rcpt("NEW", "a@example.com", "sent", T0 + 100, created=T0 + 100),
            # Rows of a message whose own row never arrived (its instance was killed before flushing it).
            rcpt("ORPHAN", "a@example.com", "sent", T0 + 1, created=T0 + 1),
            event("orphan-e", "ORPHAN", T0 + 1, created=T0 + 1),
        ]
    )
    pruned = []
    while n := await store.prune(T0 + 50, limit=2):
        pruned.append(n)
    assert pruned == [2, 2, 1, 1]  # five old messages in batches of two, then the orphan
    assert [r.id for r in (await store.find(Query())).records] == ["NEW"]
    assert await store.get("ORPHAN") is None
    record = await store.get("NEW")
    assert record is not None and len(record.recipients) == 1


async def test_the_ledger_lives_in_the_queues_file_and_migrates_it(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    queue = SqliteQueue(path)
    await queue.open()
    ledger = SqliteLedger(path)
    await ledger.write([message("M1")])
    await queue.close()
    await ledger.close()
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "calls", "ledger_messages", "ledger_recipients", "ledger_events"} <= tables


async def test_a_full_disk_keeps_ledger_rows_out_of_the_queues_reserve(tmp_path: Path) -> None:
    full = False
    ledger = SqliteLedger(tmp_path / "spool.sqlite3", disk_full=lambda: full)
    try:
        await ledger.write([message("M1")])
        full = True
        with pytest.raises(LedgerUnavailable, match="disk is full"):
            await ledger.write([message("M2")])
    finally:
        await ledger.close()


async def test_an_unreachable_database_raises_ledger_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()
    ledger = SqliteLedger(tmp_path / "dir.sqlite3")
    try:
        with pytest.raises(LedgerUnavailable):
            await ledger.find(Query())
    finally:
        await ledger.close()


async def test_tally_counts_messages_by_login_and_recipients_by_state_since_a_time(store: LedgerStore) -> None:
    """What the console's Overview and Logins pages read: messages since a time per account and login (with the
    newest one's time), their recipients by state now; older messages are not counted."""
    await store.write(
        [
            message("A000000000000001", T0 + 10),
            rcpt("A000000000000001", "a@x.example", "sent", T0 + 11, T0 + 10),
            rcpt("A000000000000001", "b@x.example", "dead", T0 + 12, T0 + 10),
            message("A000000000000002", T0 + 20, login="erp", account="crm"),
            rcpt("A000000000000002", "c@x.example", "deferred", T0 + 21, T0 + 20),
            message("A000000000000003", T0 - 100),  # before the window
            rcpt("A000000000000003", "d@x.example", "sent", T0 - 99, T0 - 100),
            message("A000000000000004", T0 + 30),
            rcpt("A000000000000004", "e@x.example", "sent", T0 + 31, T0 + 30),
        ]
    )
    tally = await store.tally(T0)
    assert tally.messages == {("acme", "scanner"): (2, T0 + 30), ("crm", "erp"): (1, T0 + 20)}
    assert tally.recipients == {
        ("acme", "scanner", "sent"): 2,
        ("acme", "scanner", "dead"): 1,
        ("crm", "erp", "deferred"): 1,
    }
    assert tally.by_account() == {"acme": {"messages": 2, "sent": 2, "dead": 1}, "crm": {"messages": 1, "deferred": 1}}
    assert tally.by_login()[("crm", "erp")] == {"messages": 1, "last": T0 + 20, "deferred": 1}
    assert (await store.tally(T0 + 1000)).messages == {}


async def test_find_by_several_ids(store: LedgerStore) -> None:
    await store.write([message(f"B00000000000000{n}", T0 + n) for n in range(5)])
    page = await store.find(Query(ids=("B000000000000001", "b000000000000003", "FFFFFFFFFFFFFFFF"), limit=10))
    assert [r.id for r in page.records] == ["B000000000000003", "B000000000000001"]
    with pytest.raises(BadQuery, match="ids"):
        Query(ids=tuple(f"{n:016X}" for n in range(501)))


# -- query plans at size ------------------------------------------------------------------------------------
# A ledger of 1,000,000 messages (docs/after-250.md#storage) must be read and pruned by index ranges: a full
# scan costs ~0.5-9 s there (measured). The plans are read on a database migrated by the ledger's own open()
# (no ANALYZE, as in production); on PostgreSQL with sequential scans off, so a plan that can only scan
# shows one.


@pytest.fixture(params=["sqlite", "postgresql"])
async def explain(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Explain]:
    if request.param == "sqlite":
        path = tmp_path / "queue.sqlite3"
        ledger: LedgerStore = SqliteLedger(path)
        await ledger.open()
        await ledger.close()
        with contextlib.closing(sqlite3.connect(path)) as db:

            def on_sqlite(statement: Callable[[str], str], params: Sequence[object]) -> list[str]:
                return [str(row[3]) for row in db.execute("EXPLAIN QUERY PLAN " + statement("?"), params)]

            yield on_sqlite
        return
    url = request.getfixturevalue("pg_cluster").new_database()
    ledger = PostgresLedger(url)
    await ledger.open()
    await ledger.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")

        def on_postgres(statement: Callable[[str], str], params: Sequence[object]) -> list[str]:
            return [str(row[0]) for row in conn.execute(("EXPLAIN " + statement("%s")).encode(), params).fetchall()]

        yield on_postgres


def full_scans(plan: list[str], table: str) -> list[str]:
    """The plan's steps that read every row of `table` (SQLite's SCAN, with or without an index to walk)."""
    return [step for step in plan if step.startswith(f"SCAN {table}") or f"Seq Scan on {table}" in step]


async def test_a_prune_batch_deletes_outbox_rows_by_an_index(explain: Explain) -> None:
    """Each prune batch deletes the outbox rows of its messages inside SQLite's one writer lock (every SMTP
    enqueue waits for it): by a full scan, 0.5 s a batch at 2,000,000 outbox rows."""
    for table in sql.TABLES:
        plan = explain(functools.partial(sql.delete_ids, table, count=3), ["A", "B", "C"])
        assert not full_scans(plan, table), plan


@pytest.mark.parametrize("table", sql.TABLES)
async def test_finding_expired_ids_reads_the_time_index(explain: Explain, table: str) -> None:
    """The last call of every prune run (every 5 minutes) finds fewer expired messages than it asks for: it
    must stop at the end of the expired rows of the `created` index, not walk the table in id order testing
    `created` on every row (SQLite did: 9.4 s at 1,000,000 messages on the ledger's one thread)."""
    plan = explain(functools.partial(sql.expired_ids, table), [T0, 500])
    assert not full_scans(plan, table), plan
    assert any(f"{table}_created" in step for step in plan), plan
    # In the index's order, distinct as it goes: no sort of every expired row (SQLite's plan says; PostgreSQL's
    # planner sorts an empty table's rows as cheaply as it reads them: shown on 300,000 messages instead).
    assert not any("TEMP B-TREE FOR DISTINCT" in step or "FOR ORDER BY" in step for step in plan), plan


async def test_retention_prunes_each_message_once_oldest_first(store: LedgerStore) -> None:
    """A message's rows in every table are pruned together, in the order the messages were accepted."""
    await store.write(
        [
            *[message(f"C{n:015X}", T0 + 10 - n) for n in range(4)],  # ids and times in opposite orders
            *[rcpt(f"C{n:015X}", f"{m}@example.com", "sent", T0 + 20, T0 + 10 - n) for n in range(4) for m in "ab"],
            *[event(f"c-e{n}-{m}", f"C{n:015X}", T0 + 20, created=T0 + 10 - n) for n in range(4) for m in "xyz"],
        ]
    )
    assert await store.prune(T0 + 9, limit=3) == 2  # fewer than asked: the last call of a run
    assert sorted(r.id for r in (await store.find(Query())).records) == ["C000000000000000", "C000000000000001"]
    assert await store.prune(T0 + 100, limit=1) == 1
    assert [r.id for r in (await store.find(Query())).records] == ["C000000000000000"]


async def test_the_overview_tally_reads_only_its_window(explain: Explain) -> None:
    """The Overview's counts of the last hour and day (twice a page load) read the window's range of the
    `created` index, not every message of the ledger."""
    plan = explain(sql.tally_messages, [T0])
    assert not full_scans(plan, "ledger_messages"), plan
    assert any("ledger_messages_created" in step for step in plan), plan
    plan = explain(sql.tally_recipients, [T0])
    assert not full_scans(plan, "ledger_recipients"), plan
    assert any("ledger_recipients_created" in step for step in plan), plan


@pytest.mark.parametrize("query", [Query(), Query(account="acme"), Query(since=T0)], ids=["all", "account", "since"])
async def test_a_page_after_a_cursor_starts_at_the_cursor_in_the_index(explain: Explain, query: Query) -> None:
    """A page deep in the ledger (a script paging a month by 500) begins where the cursor points in the index,
    not at the newest message with every row before the cursor filtered out (N²/2 rows for the whole month)."""
    query = dataclasses.replace(query, cursor=Cursor(T0 + 50, "A000000000000001"))
    plan = explain(lambda p: sql.search(query, p)[0], sql.search(query, "?")[1])
    assert not full_scans(plan, "ledger_messages"), plan
    # The cursor bounds the index range: SQLite's SEARCH (created,id)<(?,?) or created<?, PostgreSQL's Index
    # Cond on ROW(created, id) or the created <= it derives from it.
    bounds = ("(created,id)<(?,?)", "created<?", "ROW(created, id) <", "created <=")
    ranges = [step for step in plan if step.startswith("SEARCH") or "Index Cond" in step]
    assert any(bound in step for step in ranges for bound in bounds), plan


SEARCHES = {
    "state": Query(state="delivered"),
    "state-login-window": Query(state="bounced", login="scanner", since=T0, until=T0 + 86400),
    "state-account-cursor": Query(state="bounced", account="acme", cursor=Cursor(T0 + 50, "A000000000000001")),
    "recipient": Query(recipient="invoices@acme.example"),
    "recipient-state": Query(recipient="invoices@acme.example", state="delivered", sender="scanner@acme.example"),
    "recipient-cursor": Query(recipient="invoices@acme.example", cursor=Cursor(T0 + 50, "A000000000000001")),
}
WALKS = [(name, walk) for name, query in SEARCHES.items() for walk in sql.drivers(query)]


@pytest.mark.parametrize(("search", "walk"), WALKS, ids=[f"{name}-by-{walk or 'message'}" for name, walk in WALKS])
async def test_a_state_or_recipient_search_walks_an_index_in_the_pages_order(
    explain: Explain, search: str, walk: str | None
) -> None:
    """A page of `state=delivered` (95 % of a ledger) or of a mailbox that receives every scan reads its own
    rows from the recipient index, newest first: not the list of every matching message, all read and sorted
    for one page (1.8 s and 2.1 s at 1,000,000 messages on SQLite). With a login, account or sender too, the
    walk may be that message index instead (SQLite walks the smallest range, counted by an index alone); the
    other filters are probes of the message's own recipients."""
    query = SEARCHES[search]
    plan = explain(lambda p: sql.search(query, p, walk)[0], sql.search(query, "?", walk)[1])
    assert not full_scans(plan, "ledger_recipients") and not full_scans(plan, "ledger_messages"), plan
    counted = explain(lambda p: sql.extent(query, walk, p)[0], sql.extent(query, walk, "?")[1])
    assert not full_scans(counted, "ledger_recipients") and not full_scans(counted, "ledger_messages"), counted
    if any("cost=" in step for step in plan):
        return  # PostgreSQL's planner sorts an empty table's rows as cheaply as it walks an index: measured on
        # 1,000,000 messages instead (docs/development/benchmarks.md)
    assert not any("LIST SUBQUERY" in step for step in plan), plan  # no list of every match
    if walk is None:
        # Chosen when its range is under sql.EXTENT rows: ties of `created` sorted by id as they come.
        assert any(step.startswith("SEARCH m USING INDEX ledger_messages_") for step in plan), plan
        assert not any("TEMP B-TREE FOR ORDER BY" in step for step in plan), plan
        return
    assert any(f"ledger_recipients_{walk}" in step for step in plan), plan
    assert any(step.startswith("SEARCH ledger_recipients USING COVERING INDEX") for step in counted), counted
    assert not any("TEMP B-TREE" in step for step in plan), plan  # no sort at all
    if query.cursor is not None:
        assert any("(created,msg_id)<(?,?)" in step for step in plan), plan


@pytest.mark.parametrize(
    "query",
    [Query(id="A000000000000001", state="delivered"), Query(upstream_id="EEID-1", recipient="a@example.com")],
    ids=["id-state", "upstream-recipient"],
)
async def test_a_search_by_an_id_probes_its_messages_recipients(explain: Explain, query: Query) -> None:
    """With an id the search finds its few messages first and looks at each one's own recipients (the
    primary key's msg_id prefix), not at every recipient in the state or of the address."""
    plan = explain(lambda p: sql.search(query, p)[0], sql.search(query, "?")[1])
    assert not full_scans(plan, "ledger_recipients") and not full_scans(plan, "ledger_messages"), plan
    if not any("cost=" in step for step in plan):  # PostgreSQL's choice on empty tables says nothing
        assert not any("ledger_recipients_state" in step or "ledger_recipients_rcpt" in step for step in plan), plan
