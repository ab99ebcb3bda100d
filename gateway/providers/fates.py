"""The sandbox upstream's recipients' fates and the events it reports about them (both vendors' event APIs
read these): what becomes of each address a send names, by its local part or as an operator set it.

    bounce-hard[+anything]@...  a hard bounce (DMDS `rebote-hard`, dEngage `Bounced`); DMDS then lists the
                                address among its invalid contacts (unless whitelisted)
    bounce-soft[+anything]@...  a soft bounce (DMDS `rebote-soft`, dEngage `SoftBounce`)
    not-sent[+anything]@...     not sent (DMDS `Not-Sent`, and `sent` counts it out; dEngage `NotSent`); DMDS
                                lists it among its invalid contacts, as it sends nothing to those
    anything else               delivered (DMDS `envio`, dEngage `Delivered`)

`POST /_sandbox/fate {"address": ..., "fate": ...}` gives one address a fate whatever its local part
(`deliver` undoes it); `{"delay": seconds}` makes events appear that long after their send (for demos:
tests see them at once). A DMDS address on the invalid list is not sent whatever its fate (`Not-Sent`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

FATES = ("deliver", "bounce-hard", "bounce-soft", "not-sent")
# The vendors' event names for each fate, in the order they happen.
EVENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "dmds": {
        "deliver": ("envio",),
        "bounce-hard": ("envio", "rebote-hard"),
        "bounce-soft": ("envio", "rebote-soft"),
        "not-sent": ("Not-Sent",),
    },
    "dengage": {
        "deliver": ("Delivered",),
        "bounce-hard": ("Bounced",),
        "bounce-soft": ("SoftBounce",),
        "not-sent": ("NotSent",),
    },
}
DETAIL = {
    "rebote-hard": "550 5.1.1 <{address}>: Recipient address rejected: User unknown",
    "Bounced": "550 5.1.1 <{address}>: Recipient address rejected: User unknown",
    "rebote-soft": "452 4.2.2 <{address}>: Mailbox full",
    "SoftBounce": "452 4.2.2 <{address}>: Mailbox full",
}


class FateError(ValueError):
    """A fate request the sandbox cannot follow; the text says why."""


def fate_by_local_part(address: str) -> str:
    """The fate an address's local part names (before any `+tag`), else `deliver`."""
    local = address.rpartition("@")[0].split("+", 1)[0].lower()
    return local if local in FATES else "deliver"


@dataclass(frozen=True, slots=True)
class Recorded:
    """One event the sandbox reports."""

    seq: int
    provider: str
    name: str  # the vendor's event name
    address: str
    upstream_id: str
    at: float
    visible: float  # when it appears in the event APIs
    tags: tuple[str, ...] = ()
    detail: str | None = None


@dataclass
class Fates:
    chosen: dict[str, str] = field(default_factory=dict)  # address (lower case) -> fate
    delay: float = 0.0
    events: list[Recorded] = field(default_factory=list)
    invalid: dict[str, float] = field(default_factory=dict)  # DMDS: address -> when it was invalidated
    whitelist: set[str] = field(default_factory=set)  # DMDS: never invalidated
    clock: Callable[[], float] = time.time
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def fate(self, address: str) -> str:
        return self.chosen.get(address.lower()) or fate_by_local_part(address)

    def choose(self, spec: dict[str, Any]) -> None:
        """Apply a POST /_sandbox/fate body: {address, fate} and/or {delay}."""
        if "delay" in spec:
            try:
                self.delay = max(0.0, float(spec["delay"]))
            except (TypeError, ValueError):
                raise FateError("delay: seconds, a number") from None
        if "address" in spec or "fate" in spec:
            address, fate = str(spec.get("address") or "").strip().lower(), spec.get("fate")
            if "@" not in address:
                raise FateError("address: an email address")
            if fate not in FATES:
                raise FateError(f"fate: one of {', '.join(FATES)}")
            if fate == "deliver":
                self.chosen.pop(address, None)
            else:
                self.chosen[address] = fate
        if not {"delay", "address", "fate"} & set(spec):
            raise FateError('give {"address": ..., "fate": ...} and/or {"delay": seconds}')

    def settings(self) -> dict[str, Any]:
        return {
            "fates": dict(sorted(self.chosen.items())),
            "delay": self.delay,
            "events": len(self.events),
            "invalid": sorted(self.invalid),
            "whitelist": sorted(self.whitelist),
        }

    def sent(self, provider: str, upstream_id: str, addresses: Iterable[str], tags: Iterable[str] = ()) -> set[str]:
        """Record the events of one send; returns the addresses not sent (DMDS counts them out of `sent`)."""
        now = self.clock()
        unsent: set[str] = set()
        for address in addresses:
            fate = self.fate(address)
            if provider == "dmds" and address.lower() in self.invalid:
                fate = "not-sent"  # DMDS: "any attempt to send them an email ... will trigger a Not-Sent event"
            if fate == "not-sent":
                unsent.add(address.lower())
            for name in EVENTS[provider][fate]:
                detail = DETAIL.get(name)
                self.events.append(
                    Recorded(
                        next(self._seq),
                        provider,
                        name,
                        address,
                        upstream_id,
                        now,
                        now + self.delay,
                        tuple(tags),
                        detail.format(address=address) if detail else None,
                    )
                )
            if provider == "dmds" and fate in ("bounce-hard", "not-sent") and address.lower() not in self.whitelist:
                # Not-Sent is DMDS' answer for a contact it holds invalid: a `not-sent` address is on its list.
                self.invalid.setdefault(address.lower(), now)
        return unsent

    def window(self, provider: str, since: float, until: float, tag: str | None = None) -> list[Recorded]:
        """The provider's events visible now whose time (whole seconds, as the vendors write it) is within
        [since, until], oldest first; with `tag`, only those of sends that carried it."""
        now = self.clock()
        return [
            e
            for e in self.events
            if e.provider == provider
            and e.visible <= now
            and since <= int(e.at) <= until
            and (tag is None or tag in e.tags)
        ]

    def of_batch(self, upstream_id: str) -> list[Recorded]:
        now = self.clock()
        return [e for e in self.events if e.upstream_id == upstream_id and e.visible <= now]
