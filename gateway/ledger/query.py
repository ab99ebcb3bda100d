"""Asking the ledger: search filters from text (the API's query string, the CLI) and what one id, address or
Message-ID names. The same rules for `smtp-gateway status` and `GET /api/v1/messages`."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.ledger.model import BadQuery, Cursor, Query, Record
from gateway.ledger.store import LedgerStore

FILTERS = (
    "id",
    "reply_id",
    "upstream_id",
    "message_id",
    "sender",
    "recipient",
    "login",
    "account",
    "state",
    "since",
    "until",
)
PAGING = ("limit", "cursor")
LOCAL_ID = re.compile(r"[0-9A-Fa-f]{16}")


def parse_time(text: str, name: str) -> float:
    """ISO 8601 (`2025-01-31T12:00:00Z`, a date, an offset) or epoch seconds; a time without a zone is UTC."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # float() also reads nan and inf (1e400): no time, and NaN compares unlike on SQLite and PostgreSQL.
        if not math.isfinite(seconds):
            raise BadQuery(f"{name}: a finite number of epoch seconds, not {text[:40]!r}")
        return seconds
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadQuery(f"{name}: an ISO 8601 time (2025-01-31T12:00:00Z) or epoch seconds, not {text[:40]!r}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


def parse_query(params: Mapping[str, str], default_limit: int = 50) -> Query:
    """A Query from text parameters; unknown names and bad values raise BadQuery naming them."""
    unknown = sorted(set(params) - set(FILTERS) - set(PAGING))
    if unknown:
        raise BadQuery(f"unknown parameter {', '.join(unknown)} (filters: {', '.join(FILTERS)}; paging: limit, cursor)")
    values: dict[str, object] = {k: v for k, v in params.items() if k in FILTERS and k not in ("since", "until") and v}
    for name in ("since", "until"):
        if params.get(name):
            values[name] = parse_time(params[name], name)
    limit = params.get("limit")
    if limit:
        try:
            values["limit"] = int(limit)
        except ValueError:
            raise BadQuery(f"limit: a number, not {limit[:20]!r}") from None
    else:
        values["limit"] = default_limit
    if params.get("cursor"):
        values["cursor"] = Cursor.decode(params["cursor"])
    filters = {k: v for k, v in params.items() if k in FILTERS and v}
    return Query(**values, filters=filters)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Found:
    """What a lookup found and by which: id (the local id), reply_id, upstream_id, message_id, recipient or
    sender. `records` is newest first; one record for a local id."""

    by: str
    records: list[Record]
    more: bool = False  # more than the limit matched


async def lookup(store: LedgerStore, text: str, limit: int = 20) -> Found | None:
    """The messages `text` names: a local id, else the id a 250 named, an upstream id (a DMDS batch's eeid
    may name several), a Message-ID, a recipient, a sender, in that order. None: nothing."""
    text = text.strip()
    if not text:
        return None
    if LOCAL_ID.fullmatch(text):
        record = await store.get(text)
        if record is not None:
            return Found("id", [record])
    candidates = ["reply_id", "upstream_id", "message_id"]
    if "@" in text and not text.startswith("<"):
        candidates += ["recipient", "sender"]
    for by in candidates:
        page = await store.find(Query(**{by: text}, limit=limit))  # type: ignore[arg-type]
        if page.records:
            return Found(by, page.records, page.next is not None)
    return None
