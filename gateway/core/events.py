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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Literal, Protocol

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
EVENT_TYPES: tuple[EventType, ...] = (
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
)
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
    vendor's zone), or epoch seconds (milliseconds when that large). None when it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) / 1000 if value > 1e11 else float(value)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.replace(".", "", 1).isdigit():
        return vendor_time(float(text), tz)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=tz)
    return at.timestamp()
