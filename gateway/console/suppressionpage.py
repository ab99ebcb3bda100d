"""The Suppressions page: the addresses each account refuses at RCPT TO (hard bounces, not sent, complaints,
the vendor's invalid contacts), from the queue's database (every instance's), filtered by account and address,
each of which can be taken off its account's list (as `smtp-gateway suppression remove` does)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.console.runtime import Gateway
from gateway.ledger.model import address_key
from gateway.ledger.store import LedgerUnavailable

# A page shows at most this many entries (the newest first per account); the filters narrow it.
SHOWN = 500


async def page(gw: Gateway, query: Mapping[str, str]) -> dict[str, Any]:
    account = (query.get("account") or "").strip()
    needle = address_key((query.get("address") or "").strip())
    given = {"account": account, "address": needle}
    context: dict[str, Any] = {
        "given": given,
        "accounts": list(gw.settings.accounts),
        "entries": [],
        "more": 0,
        "counts": {},
        "problem": "",
        "removed": _removed(query),
    }
    if gw.returns is None:
        context["problem"] = "the suppression lists are not open (the queue is not open)"
        return context
    try:
        entries = await gw.returns.suppressions(account or None)
    except LedgerUnavailable as exc:
        context["problem"] = f"the suppression lists cannot be read now: {exc.reason}"
        return context
    if needle:  # a part of an address finds it (`@example.net` lists a domain's)
        entries = [e for e in entries if needle in e.address]
    context["entries"] = entries[:SHOWN]
    context["more"] = max(len(entries) - SHOWN, 0)
    context["counts"] = {name: sum(1 for e in entries if e.account == name) for name in gw.settings.accounts}
    return context


# The query parameters saying what the last removal did; the console shows them only with their tag (web.py).
OUTCOME = ("removed", "n", "tag")


def outcome_text(query: Mapping[str, str]) -> str | None:
    """What a removal's redirect says (its address and count), as one text to tag, or None when it says none."""
    if "removed" not in query and "n" not in query:
        return None
    return f"{query.get('removed', '')}\n{query.get('n', '')}"


def _removed(query: Mapping[str, str]) -> str | None:
    """What the last removal did (the page it redirected to says it)."""
    address = query.get("removed")
    if not address:
        return None
    count = query.get("n", "0")
    return (
        f"{address}: removed ({count} entr{'y' if count == '1' else 'ies'})"
        if count != "0"
        else (f"{address}: was not suppressed")
    )


async def remove(gw: Gateway, address: str, account: str | None) -> int:
    """Take `address` off one account's list (or every account's): the shared lists, and this process's copy at
    once (the other instances' copies follow within `return_path.suppression_refresh`). Returns how many went."""
    if gw.returns is None:
        raise LedgerUnavailable("the queue is not open")
    removed = await gw.returns.unsuppress(address, account)
    if gw.suppressions is not None:
        gw.suppressions.remove(address, account)
    return removed
