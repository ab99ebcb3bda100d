"""Events about a call whose answer was lost (docs/after-250.md "Events about a call whose answer was lost"): the
gateway never learnt the upstream id (DMDS eeid, dEngage transactionId) the vendor's events name, so they are
matched by account, address and time to the one recipient whose call was lost; the vendor's word then settles
it, even a `dead` (held, or deleted by an operator) recorded after the vendor's event. Two such recipients that
fit: unmatched, never a guess. Read through the real DMDS and dEngage event readers, the poller and a SQLite
ledger."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import orjson
import pytest

from gateway.config import EventSettings
from gateway.core.events import EventPage, VendorEvent
from gateway.ledger import model, readback
from gateway.ledger.announce import Subscriptions
from gateway.ledger.backends import open_returns
from gateway.ledger.model import EventRow, MessageRow, RecipientRow
from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.suppression import SuppressionSet
from gateway.ops.metrics import EVENTS_MATCHED_LOST, EVENTS_UNMATCHED
from gateway.providers.dengage import eventwire as dengage_wire
from gateway.providers.dmds import eventwire as dmds_wire
from gateway.returnpath.poller import Context, EventPoller
from gateway.upstream.response import HttpResponse

T0 = 1_796_544_000.0
pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rows:
    """An EventSource answering with the vendor's JSON rows, read by the provider's real event reader."""

    max_window = 86400.0

    def __init__(self, vendor: str) -> None:
        self.vendor = vendor
        self.rows: list[dict[str, object]] = []

    async def page(self, since: float, until: float, number: int) -> EventPage:
        # Every row on the first page and none after: a window is read until an empty page (DMDS' pages may
        # be shorter than asked, so a short page ends nothing).
        rows = self.rows if number == 0 else []
        if self.vendor == "dmds":
            body = orjson.dumps({"status": "ok", "eventos": rows})
            return dmds_wire.read_events(HttpResponse(200, body, {}), "acme", UTC, 100, number)
        return dengage_wire.read_report({"code": 0, "data": {"items": rows}}, "acme", UTC, 100, number)


def row(vendor: str, kind: str, address: str, at: float, upstream_id: str) -> dict[str, object]:
    stamp = model.iso(at)[:19].replace("T", " ")
    if vendor == "dmds":
        names = {"sent": "envio", "bounced": "rebote-hard"}
        return {"evento": names[kind], "email": address, "timestamp": stamp, "eeid": upstream_id}
    names = {"sent": "Sent", "bounced": "Bounced", "delivered": "Delivered"}
    return {"eventType": names[kind], "email": address, "eventDate": stamp, "transactionId": upstream_id}


async def lost(ledger: SqliteLedger, msg_id: str, address: str, state: str, at: float, reason: str | None) -> None:
    """A message whose call c1's answer was lost (an `ambiguous` attempt, no upstream id), its recipient
    then `state` at `at` (deferred: queued; dead: held or deleted)."""
    await ledger.write(
        [
            MessageRow(msg_id, T0, "acme", "billing@acme.example", "Invoice", 100, login="scanner"),
            RecipientRow(msg_id, T0, address, "deferred", T0 + 5, None, "c1", "answer lost"),
            EventRow(f"{msg_id}-a1", msg_id, T0, T0 + 5, "attempt", address, "c1", "ambiguous"),
            RecipientRow(msg_id, T0, address, state, at, None, "c1", reason),  # type: ignore[arg-type]
        ]
    )


def poller(ledger: SqliteLedger, source: Rows, clock: Clock) -> EventPoller:
    ctx = Context(open_returns(ledger), "gw-a", lambda: Subscriptions(), SuppressionSet(), clock=clock)
    settings = EventSettings(enabled=True)
    return EventPoller("acme", source, None, lambda: settings, lambda: True, ctx)  # type: ignore[arg-type]


@pytest.fixture
async def ledger(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = SqliteLedger(tmp_path / "queue.sqlite3")
    await store.open()
    yield store
    await store.close()


def counted() -> tuple[float, float]:
    return (
        EVENTS_MATCHED_LOST.labels(account="acme")._value.get(),
        EVENTS_UNMATCHED.labels(account="acme")._value.get(),
    )


@pytest.mark.parametrize("vendor", ["dmds", "dengage"])
async def test_the_vendors_events_settle_a_held_recipient_whose_answer_was_lost(ledger, vendor: str) -> None:  # type: ignore[no-untyped-def]
    # held (ambiguous = "hold") at T0 + 60: after the vendor sent it (T0 + 10), as a hold is
    await lost(ledger, "M1", "a@example.net", "dead", T0 + 60, "held: the upstream may have sent it")
    clock, source = Clock(T0), Rows(vendor)
    polls = poller(ledger, source, clock)
    assert await polls.poll() == "ok"  # the cursor starts now
    source.rows = [row(vendor, "sent", "a@example.net", T0 + 10, "TX-VENDOR-1")]
    before = counted()
    clock.t = T0 + 300
    assert await polls.poll() == "ok"
    record = await ledger.get("M1")
    assert record is not None
    [rcpt] = record.recipients
    assert (rcpt.state, rcpt.upstream_id) == ("sent", "TX-VENDOR-1")  # the id is learnt: later events match by it
    assert counted() == (before[0] + 1, before[1])
    # the vendor's later bounce then matches by that id: bounced, suppressed, the sender's notice to decide
    source.rows.append(row(vendor, "bounced", "a@example.net", T0 + 20, "TX-VENDOR-1"))
    clock.t = T0 + 600
    assert await polls.poll() == "ok"
    record = await ledger.get("M1")
    assert record is not None and record.state == "bounced"
    assert counted() == (before[0] + 1, before[1])
    returns = open_returns(ledger)
    assert [s.address for s in await returns.suppressions("acme")] == ["a@example.net"]


async def test_a_bounce_settles_a_recipient_deleted_after_its_answer_was_lost(ledger) -> None:  # type: ignore[no-untyped-def]
    await lost(ledger, "M1", "a@example.net", "dead", T0 + 3600, model.DELETED_ANSWER_LOST)
    clock, source = Clock(T0), Rows("dengage")
    polls = poller(ledger, source, clock)
    assert await polls.poll() == "ok"
    source.rows = [row("dengage", "bounced", "a@example.net", T0 + 30, "TX-VENDOR-2")]
    clock.t = T0 + 300
    assert await polls.poll() == "ok"
    record = await ledger.get("M1")
    assert record is not None
    [rcpt] = record.recipients
    assert (rcpt.state, rcpt.upstream_id, rcpt.reason) == ("bounced", "TX-VENDOR-2", "the upstream reported Bounced")
    assert [s.address for s in await open_returns(ledger).suppressions("acme")] == ["a@example.net"]


async def test_an_event_that_fits_two_lost_recipients_is_not_matched(ledger) -> None:  # type: ignore[no-untyped-def]
    await lost(ledger, "M1", "a@example.net", "deferred", T0 + 5, "answer lost")
    await lost(ledger, "M2", "a@example.net", "dead", T0 + 60, model.DELETED_ANSWER_LOST)
    clock, source = Clock(T0), Rows("dmds")
    polls = poller(ledger, source, clock)
    assert await polls.poll() == "ok"
    source.rows = [row("dmds", "bounced", "a@example.net", T0 + 30, "EEID-X")]
    before = counted()
    clock.t = T0 + 300
    assert await polls.poll() == "ok"
    states = {}
    for msg_id in ("M1", "M2"):
        record = await ledger.get(msg_id)
        assert record is not None
        states[msg_id] = record.recipients[0].state
    assert states == {"M1": "deferred", "M2": "dead"}
    assert counted() == (before[0], before[1] + 1)
    assert await open_returns(ledger).suppressions("acme") == []


async def test_the_reviews_reproducer_a_delivered_for_a_held_recipient_is_matched(ledger) -> None:  # type: ignore[no-untyped-def]
    """The review's pure reproducer, with the poller's candidates (by id, then the lost recipients)."""
    await lost(ledger, "M1", "a@example.net", "dead", T0 + 5, "held: the upstream may have sent it")
    returns = open_returns(ledger)
    delivered = VendorEvent("ev1", "delivered", "Delivered", "a@example.net", T0 + 60, upstream_id="TX-VENDOR-1")
    candidates = await returns.match_ids(["TX-VENDOR-1"])
    candidates += await returns.match_lost(["a@example.net"], T0 - readback.LOST_WINDOW)
    applied = readback.apply(
        [delivered], candidates, account="acme", actor="gw", now=T0 + 120, subscriptions=Subscriptions(), suppress=True
    )
    assert (applied.matched, applied.lost, applied.unmatched) == (1, ["ev1"], [])
    # another account's event at the same address is not this recipient's
    other = readback.apply(
        [delivered], candidates, account="crm", actor="gw", now=T0 + 120, subscriptions=Subscriptions(), suppress=True
    )
    assert other.matched == 0
    # nor one older than the message, or later than the window
    for at in (T0 - 3600, T0 + readback.LOST_WINDOW + 1):
        late = VendorEvent("ev2", "delivered", "Delivered", "a@example.net", at, upstream_id="TX-VENDOR-1")
        again = readback.apply(
            [late], candidates, account="acme", actor="gw", now=at, subscriptions=Subscriptions(), suppress=True
        )
        assert again.matched == 0


async def test_a_dmds_batch_whose_answer_was_lost_is_settled_recipient_by_recipient(ledger) -> None:  # type: ignore[no-untyped-def]
    """One DMDS call (one eeid) for two recipients: the eeid learnt from a@'s event does not make b@'s event,
    read in a later poll, look like another recipient's."""
    await ledger.write(
        [
            MessageRow("M1", T0, "acme", "billing@acme.example", "Invoice", 100),
            RecipientRow("M1", T0, "a@example.net", "deferred", T0 + 5, None, "c1", "answer lost"),
            RecipientRow("M1", T0, "b@example.net", "deferred", T0 + 5, None, "c1", "answer lost"),
            EventRow("M1-a1", "M1", T0, T0 + 5, "attempt", "a@example.net,b@example.net", "c1", "ambiguous"),
        ]
    )
    clock, source = Clock(T0), Rows("dmds")
    polls = poller(ledger, source, clock)
    assert await polls.poll() == "ok"
    source.rows = [row("dmds", "sent", "a@example.net", T0 + 10, "EEID-1")]
    clock.t = T0 + 300
    assert await polls.poll() == "ok"
    source.rows = [row("dmds", "sent", "b@example.net", T0 + 320, "EEID-1")]
    clock.t = T0 + 600
    assert await polls.poll() == "ok"
    record = await ledger.get("M1")
    assert record is not None
    assert sorted((r.address, r.state, r.upstream_id) for r in record.recipients) == [
        ("a@example.net", "sent", "EEID-1"),
        ("b@example.net", "sent", "EEID-1"),
    ]


class Bare:
    """An EventSource answering every window with the events the test lists that fall in it."""

    max_window = 86400.0

    def __init__(self) -> None:
        self.events: list[VendorEvent] = []

    async def page(self, since: float, until: float, number: int) -> EventPage:
        return EventPage([e for e in self.events if since <= e.at < until], more=False)


async def test_an_event_matched_to_a_lost_recipient_is_counted_once_though_windows_overlap(ledger) -> None:  # type: ignore[no-untyped-def]
    """An event naming no upstream id, matched by address and time, that leaves its recipient as it was (a soft
    bounce): the next poll's window overlaps this one and matches it again; smtp_gateway_events_matched_lost_total
    counts it once, as smtp_gateway_events_total does (it was counted at every overlapping poll)."""
    await lost(ledger, "M1", "a@example.net", "deferred", T0 + 5, "answer lost")
    clock, source = Clock(T0), Bare()
    polls = poller(ledger, source, clock)
    assert await polls.poll() == "ok"  # the cursor starts now
    source.events = [VendorEvent("ev-soft-1", "soft_bounced", "soft-bounce", "a@example.net", T0 + 10)]
    before = counted()
    for step in (1, 2, 3):  # each window reaches back `overlap` (900 s) over the last: all three read ev-soft-1
        clock.t = T0 + 300 * step
        assert await polls.poll() == "ok"
        assert counted() == (before[0] + 1, before[1])
    record = await ledger.get("M1")
    assert record is not None
    assert [e.kind for e in record.events].count("soft_bounced") == 1
