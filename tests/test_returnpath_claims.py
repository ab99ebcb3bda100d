"""docs/after-250.md and docs/unconfirmed.md on events read back: an event about no message this gateway sent
is counted in smtp_gateway_events_unmatched_total (once per event) and not stored; a vendor event name no wire
table maps is counted as smtp_gateway_events_total{type="unknown"} and logged once per name as
`events_unknown_type`; every event and unreadable row is counted once, though the polls' windows overlap.
Read from DMDS ver_eventos rows by the real wire reader, into a real SQLite ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.core.events import EventPage
from gateway.ledger.announce import Subscriptions
from gateway.ops.metrics import EVENTS_READ, EVENTS_UNMATCHED, EVENTS_UNREADABLE
from tests.test_returnpath_units import T0, Clock, DmdsRowsSource, _ledger, _poller, _select, _sent


class WindowedRows(DmdsRowsSource):
    """DMDS rows, each page only those of its window (as the API answers a since/until query)."""

    async def page(self, since: float, until: float, number: int) -> EventPage:
        return await DmdsRowsSource([r for r in self.rows if since <= _at(r) < until]).page(since, until, number)


def _at(row: dict[str, object]) -> float:
    return datetime.strptime(str(row["timestamp"]), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


@pytest.mark.asyncio
async def test_unmatched_and_unknown_events_are_counted_not_stored_and_an_unknown_name_logged_once(
    tmp_path: Path,
) -> None:
    ledger = await _ledger(tmp_path)
    try:
        await _sent(ledger, "M1", "a@example.net", "E1", T0 - 600)
        rows: list[dict[str, object]] = [
            {"evento": "rebote-hard", "email": "a@example.net", "timestamp": "2026-12-06 08:00:30", "eeid": "E1"},
            # Another system's mail on the same DMDS account: no message of this gateway has this id or address.
            {"evento": "view", "email": "z@example.org", "timestamp": "2026-12-06 08:00:40", "eeid": "EX"},
            {"evento": "teleported", "email": "a@example.net", "timestamp": "2026-12-06 08:00:50", "eeid": "E1"},
            {"evento": "teleported", "email": "a@example.net", "timestamp": "2026-12-06 08:04:10", "eeid": "E1"},
        ]
        unmatched = EVENTS_UNMATCHED.labels(account="acme")._value.get()
        unknown = EVENTS_READ.labels(account="acme", type="unknown")._value.get()
        clock = Clock(T0)
        poller = _poller(ledger, WindowedRows(rows), clock, Subscriptions())
        with capture_logs() as logs:
            results = [await poller.poll()]
            for step in (1, 2, 3):
                clock.t = T0 + 200 * step
                results.append(await poller.poll())
        assert results == ["ok", "ok", "ok", "ok"]
        record = await ledger.get("M1")
        assert record is not None and record.recipients[0].state == "bounced"  # the matched event is recorded
        # The polls' windows overlap (`overlap`): an event read again is counted as unmatched once.
        assert EVENTS_UNMATCHED.labels(account="acme")._value.get() == unmatched + 1
        # The rows of the unmapped name are counted once each, though read in several windows; the name is
        # logged once.
        assert EVENTS_READ.labels(account="acme", type="unknown")._value.get() == unknown + 2
        named = [e for e in logs if e["event"] == "events_unknown_type"]
        assert [(e["account"], e["name"]) for e in named] == [("acme", "teleported")]
        # Nothing of the unmatched event or the unknown names is stored.
        stored = _select(tmp_path, "SELECT * FROM ledger_events")
        assert stored and all("z@example.org" not in str(row) and "teleport" not in str(row) for row in stored)
    finally:
        await ledger.close()


def _known(account: str) -> float:
    return sum(
        EVENTS_READ.labels(account=account, type=t)._value.get() for t in ("bounced", "opened", "delivered", "sent")
    )


@pytest.mark.asyncio
async def test_each_event_and_unreadable_row_is_counted_once_though_the_windows_overlap(tmp_path: Path) -> None:
    """One bounce and one unreadable row, four polls 200 s apart (each window re-reads the last `overlap`):
    smtp_gateway_events_total and smtp_gateway_events_unreadable_total move by 1 each, not once per poll."""
    ledger = await _ledger(tmp_path)
    try:
        await _sent(ledger, "M1", "a@example.net", "E1", T0 - 600)
        rows: list[dict[str, object]] = [
            {"evento": "rebote-hard", "email": "a@example.net", "timestamp": "2026-12-06 08:00:30", "eeid": "E1"},
            {"evento": "view", "email": "no address", "timestamp": "2026-12-06 08:00:40", "eeid": "E1"},
        ]
        known, unreadable = _known("acme"), EVENTS_UNREADABLE.labels(account="acme")._value.get()
        clock = Clock(T0)
        poller = _poller(ledger, WindowedRows(rows), clock, Subscriptions())
        with capture_logs():
            results = [await poller.poll()]
            for step in (1, 2, 3):
                clock.t = T0 + 200 * step
                results.append(await poller.poll())
        assert results == ["ok"] * 4
        assert _known("acme") == known + 1
        assert EVENTS_UNREADABLE.labels(account="acme")._value.get() == unreadable + 1
    finally:
        await ledger.close()
