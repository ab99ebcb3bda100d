"""The in-memory copy of the suppression lists: what this instance adds or removes while a reload reads the
database is not undone by that reload (the read may have begun before the change was written)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
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


def test_the_copy_keeps_what_rcpt_to_answers_from_with_one_object_per_repeated_string() -> None:
    """A database read makes a new string per row: tens of thousands of entries with a handful of reasons would
    hold as many copies. The copy keeps one object per distinct account, reason and source, and no message id
    or detail (read from the database by the pages and the API): a third of the memory per entry."""
    account, reason = ["ac", "me"], ["hard ", "bounce"]
    rows = [
        Suppressed("".join(account), f"u{n}@example.com", "".join(reason), "bounced", T0, f"M{n}", "x")
        for n in range(3)
    ]
    assert rows[0].reason is not rows[1].reason  # as a database read gives them
    copy = SuppressionSet()
    copy.replace(rows[:2])
    copy.add(rows[2:])
    kept = [copy.check("acme", f"u{n}@example.com") for n in range(3)]
    assert all(k is not None and (k.source, k.reason, k.created) == ("bounced", "hard bounce", T0) for k in kept)
    assert kept[0] is not None and kept[1] is not None
    assert kept[0].reason is kept[1].reason and kept[0].account is kept[1].account
    assert all(k is not None and k.msg_id is None and k.detail is None for k in kept)


def test_an_entry_only_the_invalid_list_made_is_replaced_by_any_other_in_either_order() -> None:
    """As the database's upsert does: the copy answers with the bounce whether the invalid list's sync or the
    poll that read the bounce added its entry first; other entries keep the first."""
    listed = Suppressed("acme", "gone@example.com", "invalid contact at the upstream", "invalid_list", T0)
    bounce = Suppressed("acme", "Gone@Example.com", "hard bounce", "bounced", T0 + 5, "M1", "550 User unknown")
    for order in ([listed, bounce], [bounce, listed]):
        copy = SuppressionSet()
        for e in order:
            copy.add([e])
        kept = copy.check("acme", "gone@example.com")
        assert kept is not None and (kept.source, kept.reason, kept.created) == ("bounced", "hard bounce", T0 + 5)
        assert copy.counts() == {"acme": 1}
    copy = SuppressionSet()
    copy.add([entry("a@example.com", "operator"), entry("b@example.com"), listed])
    copy.add([entry("a@example.com", "bounced"), entry("b@example.com", "complained"), replace(listed, reason="x")])
    kept = [copy.check("acme", a) for a in ("a@example.com", "b@example.com", "gone@example.com")]
    assert [(k.source, k.reason) for k in kept if k is not None] == [
        ("operator", "hard bounce"),
        ("bounced", "hard bounce"),
        ("invalid_list", "invalid contact at the upstream"),
    ]
