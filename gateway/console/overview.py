"""The Overview page: the ledger's counts of the last hour and day per account, the queue's depth and oldest
message, each upstream account's health, and what clients were refused."""

from __future__ import annotations

import time
from typing import Any

from gateway.console import figures
from gateway.console.runtime import Gateway
from gateway.core.errors import SpoolUnavailable
from gateway.ledger.store import LedgerUnavailable

# The columns of the per-account table: messages accepted, then recipients by their state now.
COLUMNS = ("messages", "delivered", "sent", "deferred", "accepted", "bounced", "not_sent", "dead", "test")


async def page(gw: Gateway) -> dict[str, Any]:
    now = time.time()
    accounts = list(gw.settings.accounts)
    problems: list[str] = []
    windows: list[tuple[str, dict[str, dict[str, int]]]] = []
    if gw.ledger is not None:
        try:
            for label, seconds in (("last hour", 3600), ("last day", 86400)):
                tally = await gw.ledger.tally(now - seconds)
                rows = tally.by_account()
                for account in accounts:
                    rows.setdefault(account, {})
                windows.append((label, dict(sorted(rows.items()))))
        except LedgerUnavailable as exc:
            problems.append(f"the message ledger cannot be read now: {exc.reason}")
    queue: dict[str, dict[str, Any]] = {}
    if gw.store is not None:
        try:
            queue = await gw.store.counts(now)
        except SpoolUnavailable as exc:
            problems.append(f"the queue cannot be read now: {exc.reason}")
    upstream = figures.upstream(accounts)
    health = [
        {"account": account, "state": state, "for": seconds, "reason": reason, **upstream.get(account, {})}
        for account, state, seconds, reason in gw.health.status()
    ]
    return {
        "columns": COLUMNS,
        "windows": windows,
        "queue": [(state, queue.get(state, {})) for state in ("queued", "inflight", "dead")],
        "health": health,
        "refusals": figures.refusals()[:30],
        "problems": problems,
    }
