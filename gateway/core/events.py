"""Pure: what an upstream's event API reports about the messages the gateway sent, in the gateway's words, and
what a provider offers to read it (EventSource; DMDS also its invalid contacts and whitelist: Contacts).

Each provider maps its vendor's event names to these types in its own wire table; the return path
(gateway/returnpath/) turns them into recipient states, timeline events, suppressions, notices and webhooks.

    sent          the vendor sent it (DMDS `envio`)
    delivered     the receiving server took it (dEngage `Delivered`)
    bounced       a hard bounce: the address does not take mail
    soft_bounced  a temporary bounce (the vendor may try again): an event only, the state stays
    not_sent      the vendor did not send it (DMDS `Not-Sent`: an invalid contact)
    opened, clicked, unsubscribed, complained, invalidated, revalidated: events only
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal, Protocol, get_args

EventType = Literal[
    "sent",
    "delivered",
    "bounced",
    "soft_bounced",
    "not_sent",
    "opened",
    "clicked",
    "unsubscribed",
    "complained",
    "invalidated",
    "revalidated",
]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)
# The recipient state an event type moves a recipient to (the ledger keeps the furthest state: a `sent`
# read back after `bounced` changes nothing); the other types leave the state as it is.
STATE_OF: Mapping[str, str] = {"sent": "sent", "delivered": "delivered", "bounced": "bounced", "not_sent": "not_sent"}
# Event types that put the address on the account's suppression list, with the reason a client is told.
SUPPRESSES: Mapping[str, str] = {
    "bounced": "hard bounce",
    "not_sent": "the upstream did not send to it (invalid contact)",
    "complained": "spam complaint",
    "invalidated": "invalidated at the upstream",
}


@dataclass(frozen=True, slots=True)
class VendorEvent:
    """One event as a provider read it. `id` is stable: the same event read twice (overlapping windows, a page
    read again after a restart) has the same id. `upstream_id` is the id the send call returned for the
    recipient (the DMDS eeid, dEngage's transactional id), when the vendor names it."""

    id: str
    type: EventType
    raw_type: str
    address: str
    at: float
    upstream_id: str | None = None
    detail: str | None = None


@dataclass
class EventPage:
    """One page of a time window: the events read, whether another page follows, the rows that could not be
    read (no address, no time, not an object) and the vendor's event names no table maps (name -> count)."""

    events: list[VendorEvent] = field(default_factory=list)
    more: bool = False
    unreadable: int = 0
    unknown: dict[str, int] = field(default_factory=dict)
    # A stable id of each row counted in `unreadable` and `unknown` (name, id), so that a window read again
    # (the polls overlap) does not count the same rows again: the metrics count rows, not reads.
    unreadable_ids: list[str] = field(default_factory=list)
    unknown_ids: list[tuple[str, str]] = field(default_factory=list)


def add_unreadable(page: EventPage, account: str, row: object) -> None:
    """A row that is not an event (not an object, no type, address or time), counted in `page`."""
    page.unreadable += 1
    page.unreadable_ids.append(event_id(account, "unreadable", repr(row)))


class EventSource(Protocol):
    """An account's event API, read by time window in pages (gateway/returnpath/poller.py)."""

    @property
    def max_window(self) -> float:
        """The longest window one query may span, in seconds (dEngage: 7 days)."""
        ...

    async def page(self, since: float, until: float, number: int) -> EventPage:
        """Page `number` (from 0) of the events between `since` and `until` (epoch seconds). Raises
        gateway.core.errors.Deferred when the API cannot answer now."""
        ...


class Contacts(Protocol):
    """An account's own list of addresses it will not send to (DMDS: invalid contacts) and its whitelist."""

    async def invalid(self) -> list[str]:
        """Every address the vendor holds invalid now. Raises Deferred."""
        ...

    async def whitelisted(self, address: str) -> bool:
        """Whether the vendor's whitelist protects `address` (never suppressed). Raises Deferred."""
        ...


def event_id(account: str, *parts: object) -> str:
    """A stable event id from what identifies an event: the vendor's own id when it gives one, else its fields
    (upstream id, address, type, timestamp as written). The same event read twice gets the same id."""
    text = "\x1f".join([account, *("" if p is None else str(p) for p in parts)])
    return "u" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:31]


def add_event(
    page: EventPage,
    account: str,
    fields: Mapping[str, Any],
    types: Mapping[str, EventType],
    tz: tzinfo,
    upstream_field: str,
    type_key: Callable[[str], str] = str.lower,
) -> None:
    """One event row, its fields read from the provider's wire table (`type`, `address`, `time`, `id`,
    `detail` and `upstream_field`), added to `page`: unreadable without a type, an address and a time; a name
    `types` does not map (after `type_key`) counted as unknown; its id the vendor's own when it gives one."""
    raw_type = str(fields.get("type") or "").strip()
    address = str(fields.get("address") or "").strip()
    at = vendor_time(fields.get("time"), tz)
    if not raw_type or "@" not in address or at is None:
        add_unreadable(page, account, sorted(fields.items(), key=repr))
        return
    upstream = str(fields[upstream_field]) if fields.get(upstream_field) else None
    vendor_id = fields.get("id")
    ident = (
        event_id(account, "id", vendor_id)
        if vendor_id
        else event_id(account, upstream, address.lower(), raw_type.lower(), fields.get("time"))
    )
    kind = types.get(type_key(raw_type))
    if kind is None:
        page.unknown[raw_type] = page.unknown.get(raw_type, 0) + 1
        page.unknown_ids.append((raw_type, ident))
        return
    detail = str(fields["detail"])[:500] if fields.get("detail") else None
    page.events.append(VendorEvent(ident, kind, raw_type, address, at, upstream, detail))


def zone(name: str) -> tzinfo:
    """The vendor's time zone by IANA name ("UTC" needs no time zone database)."""
    if name.upper() == "UTC":
        return UTC
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def vendor_stamp(at: float, tz: tzinfo, fmt: str) -> str:
    """An epoch time as the vendor writes date-times (`fmt`, strftime) in its zone."""
    return datetime.fromtimestamp(at, tz).strftime(fmt)


def vendor_time(value: object, tz: tzinfo) -> float | None:
    """An event's time as vendors write it: ISO 8601 with `T` or a space, fractions and a zone or not (none: the
    vendor's zone), or epoch seconds (milliseconds when that large). None when it is none of these, or a time
    no date can hold (epoch microseconds, year 0001 east of UTC): that one row is unreadable, the rest of its
    page is read (a time that raised later, at the ledger, would fail the whole page at every poll)."""
    at = _vendor_time(value, tz)
    if at is None:
        return None
    try:
        datetime.fromtimestamp(at, UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return at


def _vendor_time(value: object, tz: tzinfo) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            return None
        return seconds / 1000 if seconds > 1e11 else seconds
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.replace(".", "", 1).isdigit():
        return _vendor_time(float(text), tz)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=tz)
    try:
        return at.timestamp()
    except (ValueError, OverflowError):
        return None
