"""An operator's delete tells the ledger about the calls it deleted, as they stood at the delete (on both
backends): a worker's attempt that settles between a read of the message and its delete (one call accepted
by the upstream, the other deferred: the message is queued again) must not leave the accepted recipient
recorded `dead` (which outranks `sent`); and a call whose answer was lost is an unknown outcome: its
recipients are `dead` with a reason that says the upstream may have them (never left `deferred`: nothing will
retry them), and an `ambiguous` event."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.core.records import CallRow, Decision
from gateway.delivery.admin import QueueAdmin
from gateway.ledger import model
from gateway.ledger.model import EventRow, MessageRow, RecipientRow
from gateway.ledger.recorder import Recorder
from gateway.ledger.sqlite import SqliteLedger
from gateway.queue.postgres import PostgresQueue
from gateway.queue.sqlite import SqliteQueue
from gateway.queue.store import QueueStore
from tests.queue_contract import new, stores_on_backend

Factory = Callable[[], QueueStore]
MSG = "0123456789ABCDEF"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    async for factory in stores_on_backend(request, tmp_path, SqliteQueue, PostgresQueue):
        s = factory()
        await s.open()
        yield s


class Racing:
    """The store, with the retry worker's claim + settle landing just before the admin's delete runs (after
    any read the admin made of the message): c1 accepted by the upstream, c2 deferred."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def delete(self, msg_id: str) -> Any:
        now = time.time()
        [claimed] = await self.store.claim("worker", "acme", now, 1, 60.0)
        calls = {
            "c1": CallRow("c1", "a@example.com", "done", "UP-1"),
            "c2": CallRow("c2", "b@example.com", "pending", None, "503"),
        }
        assert await self.store.settle(msg_id, claimed.token, Decision("queued", calls, 1, now + 60, "503"), now)
        return await self.store.delete(msg_id)


async def test_a_recipient_delivered_just_before_the_delete_is_not_recorded_dead(store: QueueStore) -> None:
    now = time.time()
    calls = {"c1": CallRow("c1", "a@example.com"), "c2": CallRow("c2", "b@example.com")}
    await store.insert(new(MSG, now - 1, calls=calls))
    rows: list[Any] = []
    admin = QueueAdmin(Racing(store), Recorder(rows.extend, "op@host"))  # type: ignore[arg-type]
    assert await admin.delete(MSG)
    assert await store.show(MSG) is None
    states = {r.address: (r.state, r.reason) for r in rows if isinstance(r, RecipientRow)}
    # a@ was accepted (UP-1) before the delete: its `sent` stands; b@ was deleted unsent.
    assert states == {"b@example.com": ("dead", model.DELETED_BY_OPERATOR)}


async def test_a_call_whose_answer_was_lost_is_recorded_dead_with_its_doubt_by_a_delete(store: QueueStore) -> None:
    calls = {
        "c1": CallRow("c1", "a@example.com", "pending", None, "answer lost", lost=1),
        "c2": CallRow("c2", "b@example.com", "pending", None, "503"),
    }
    await store.insert(new(MSG, calls=calls))
    rows: list[Any] = []
    assert await QueueAdmin(store, Recorder(rows.extend, "op@host")).delete(MSG)
    states = {r.address: (r.state, r.reason) for r in rows if isinstance(r, RecipientRow)}
    # a@ may have been sent: dead (nothing will retry it), the reason says the upstream may have it
    assert states == {
        "a@example.com": ("dead", model.DELETED_ANSWER_LOST),
        "b@example.com": ("dead", model.DELETED_BY_OPERATOR),
    }
    [doubt] = [r for r in rows if isinstance(r, EventRow) and r.kind == model.AMBIGUOUS]
    assert (doubt.call, doubt.recipient, doubt.outcome) == ("c1", "a@example.com", "ambiguous")


async def test_the_store_returns_the_calls_it_deleted_and_nothing_for_a_running_message(store: QueueStore) -> None:
    now = time.time()
    await store.insert(new(MSG, now - 1))
    [claimed] = await store.claim("A", "acme", now, 1, lease=30)
    assert await store.delete(MSG) is None  # its call is running
    assert await store.release(MSG, claimed.token, now)
    gone = await store.delete(MSG)
    assert gone is not None and gone["id"] == MSG and "submission" not in gone
    assert [c["recipients"] for c in gone["calls"]] == ["a@example.com,c@example.com", "b@example.com"]
    assert await store.delete(MSG) is None


async def test_a_deleted_message_whose_answer_was_lost_is_not_shown_deferred(tmp_path: Path) -> None:
    """The message's one word (API, console, `status`) after the delete: not `deferred` ("it will be retried")
    although it left the queue and nothing will try it again."""
    queue = SqliteQueue(tmp_path / "spool.sqlite3")
    await queue.open()
    ledger = SqliteLedger(tmp_path / "spool.sqlite3")
    await ledger.open()
    try:
        now = time.time()
        calls = {"c1": CallRow("c1", "a@example.com", "pending", None, "answer lost", lost=1)}
        await queue.insert(new(MSG, now, calls=calls))
        rows: list[Any] = [MessageRow(MSG, now, "acme", "billing@acme.example", "s", 10)]
        recorder = Recorder(rows.extend, "gw:1:x")
        # what the inline attempt recorded: its answer lost, the message queued (the recipient `deferred`)
        decision = Decision("queued", calls, 1, now + 60, "answer lost")
        recorder.attempt(msg_id=MSG, created=now, decision=decision, outcome=None, path="inline", settled=True)
        assert await QueueAdmin(queue, recorder).delete(MSG)
        assert await queue.show(MSG) is None  # nothing will retry it
        await ledger.write(rows)
        record = await ledger.get(MSG)
        assert record is not None
        [recipient] = record.recipients
        assert (recipient.state, recipient.reason) == ("dead", model.DELETED_ANSWER_LOST)
        assert record.state == "dead"
    finally:
        await ledger.close()
        await queue.close()
