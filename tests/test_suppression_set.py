"""The in-memory copy of the suppression lists: what this instance adds or removes while a reload reads the
database is not undone by that reload (the read may have begun before the change was written)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from gateway.ledger.returns import ReturnStore, Suppressed
from gateway.ledger.suppression import SuppressionSet

T0 = 1_700_000_000.0


def entry(address: str, source: str = "bounced") -> Suppressed:
    return Suppressed("acme", address, "hard bounce", source, T0)


class SlowStore:
    """A database read that returns what it held when it began, once the test lets it end."""

    def __init__(self, rows: list[Suppressed]) -> None:
        self.rows = rows
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def suppressions(self, account: str | None = None) -> list[Suppressed]:
        snapshot = list(self.rows)
        self.reading.set()
        await self.release.wait()
        return snapshot


async def test_changes_made_during_a_reload_survive_it() -> None:
    copy = SuppressionSet()
    copy.replace([entry("old@example.com"), entry("gone@example.com")])
    store = SlowStore([entry("old@example.com"), entry("gone@example.com")])
    reload = asyncio.ensure_future(copy.refresh(cast(ReturnStore, cast(Any, store))))
    await store.reading.wait()
    # While the read is under way: the poller adds a Not-Sent's entry, an operator removes one.
    copy.add([entry("new@example.com", "not_sent")])
    copy.remove("GONE@example.com", "acme")
    store.release.set()
    await reload
    assert copy.check("acme", "new@example.com") is not None
    assert copy.check("acme", "gone@example.com") is None
    assert copy.check("acme", "old@example.com") is not None
    assert copy.counts() == {"acme": 2}
    # The next reload reads what the database holds, and nothing is replayed twice.
    store.rows = [entry("old@example.com")]
    store.release.set()
    await copy.refresh(cast(ReturnStore, cast(Any, store)))
    assert copy.counts() == {"acme": 1}
