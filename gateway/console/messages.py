"""The Messages pages: a search of the ledger (the same filters as GET /api/v1/messages) with paging, and one
message's record with its timeline, the request sent upstream (secrets removed) and where it is in the queue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.console.runtime import Gateway
from gateway.core.errors import SpoolUnavailable
from gateway.ledger.model import STATES, BadQuery, Record
from gateway.ledger.query import FILTERS, lookup, parse_query
from gateway.ledger.store import LedgerUnavailable

PAGE = 50
# The search form's fields, in order (the free-text box finds by id, Message-ID or address as `status` does).
FIELDS = ("q", *FILTERS)
# How the gateway's own timeline kinds read; any other kind (upstream events, DSNs, webhooks) is shown by name.
KINDS = {
    "accepted": "accepted (250)",
    "attempt": "upstream call",
    "inflight": "in flight (inline budget spent)",
    "queued": "queued for a retry",
    "ambiguous": "ambiguous (owner died mid-call)",
    "dead_lettered": "dead letter",
    "resend": "resend answered",
    "retried": "retry now (operator)",
    "requeued": "requeued (operator)",
    "deleted": "deleted (operator)",
    "test_mode": "test mode",
}


def _clean(params: Mapping[str, str]) -> dict[str, str]:
    return {k: v.strip() for k, v in params.items() if k in (*FIELDS, "limit", "cursor") and v.strip()}


async def search(gw: Gateway, params: Mapping[str, str]) -> dict[str, Any]:
    given = _clean(params)
    out: dict[str, Any] = {"given": given, "states": STATES, "records": [], "next": None, "error": None, "by": None}
    if gw.ledger is None:
        out["error"] = "the message ledger is not open"
        return out
    try:
        filters = dict(given)
        text = filters.pop("q", "")
        if text:
            # What the box names (an id, a Message-ID, an address, ...) becomes one more filter: the others
            # still apply, and the results page like any search.
            found = await lookup(gw.ledger, text, limit=1)
            if found is None:
                return out
            out["by"] = found.by.replace("_", " ")
            if filters.get(found.by, text) != text:
                raise BadQuery(f"Find names a {out['by']}, and its own field asks for another: clear one of them")
            filters[found.by] = text
        query = parse_query(filters, default_limit=PAGE)
        page = await gw.ledger.find(query)
        out["records"] = page.records
        if page.next is not None:
            out["next"] = {**{k: v for k, v in given.items() if k != "cursor"}, "cursor": page.next.encode()}
    except BadQuery as exc:
        out["error"] = str(exc)
    except LedgerUnavailable as exc:
        out["error"] = f"the message ledger cannot be read now: {exc.reason}"
    return out


async def one(gw: Gateway, ident: str) -> dict[str, Any]:
    """The record `ident` names (a local id, the id a 250 gave, an upstream id, a Message-ID); several
    records: the list, to pick one."""
    out: dict[str, Any] = {"ident": ident, "record": None, "records": [], "queue": None, "error": None}
    if gw.ledger is None:
        return {**out, "error": "the message ledger is not open"}
    try:
        found = await lookup(gw.ledger, ident)
        if found is not None and len(found.records) == 1:
            record = found.records[0]
            # A search result carries no timeline: read the whole record.
            out["record"] = await gw.ledger.get(record.id) or record
        elif found is not None:
            out["records"] = found.records
    except LedgerUnavailable as exc:
        return {**out, "error": f"the message ledger cannot be read now: {exc.reason}"}
    record = out["record"]
    if record is not None and gw.store is not None:
        try:
            out["queue"] = await gw.store.show(record.id)
        except SpoolUnavailable:
            out["queue"] = None
    if record is not None:
        out["timeline"] = timeline(record)
        out["upstream_request"] = pretty(record.request) if record.request is not None else None
    return out


def timeline(record: Record) -> list[dict[str, Any]]:
    """Every event, whatever its kind: known kinds with a readable name, others as they are named."""
    rows = []
    for e in record.events:
        rows.append(
            {
                "at": e.at,
                "kind": e.kind,
                "label": KINDS.get(e.kind, e.kind.replace("_", " ")),
                "recipient": e.recipient,
                "call": e.call,
                "outcome": e.outcome,
                "upstream_id": e.upstream_id,
                "detail": e.detail,
                "actor": e.actor,
                "data": sorted((str(k), _short(v)) for k, v in (e.data or {}).items()),
            }
        )
    return rows


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= 300 else text[:300] + "…"


def pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS, default=str).decode()
