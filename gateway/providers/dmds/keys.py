"""DMDS campaign apikeys as the gateway last saw them, so a key changed on DMDS's side keeps working for a
grace period (`apikey_grace`) while devices move to the new one."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.cache import ExpiringLru

# How long a campaign's key is remembered after its last lookup: a change is noticed when it is looked up
# again within this time (the login cache asks DMDS again every credential_cache_ttl).
REMEMBERED = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class _Seen:
    current: str
    previous: str | None = None
    previous_until: float = 0.0  # on the clock given


@dataclass(frozen=True, slots=True)
class KeyMatch:
    """Which key a password matched: "current", or "previous" until `expires` (epoch seconds)."""

    which: str
    expires: float | None = None


class CampaignKeys:
    def __init__(
        self,
        grace: float,
        maxsize: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.grace = grace
        self._clock, self._wall = clock, wall
        self._seen: ExpiringLru[int, _Seen] = ExpiringLru(maxsize, clock)

    def match(self, numid: int, key: str, password: str) -> KeyMatch | None:
        """`password` against the campaign's key as DMDS answered it now (`key`) and, within the grace
        period after DMDS first answered a new one, the key it answered before."""
        now = self._clock()
        seen = self._seen.get(numid)
        if seen is None or seen.current != key:
            previous = seen.current if seen is not None and self.grace > 0 else None
            seen = _Seen(key, previous, now + self.grace if previous else 0.0)
        self._seen.put(numid, seen, max(REMEMBERED, self.grace))
        if hmac.compare_digest(key.encode(), password.encode()):
            return KeyMatch("current")
        previous = seen.previous if now < seen.previous_until else None
        if previous is not None and hmac.compare_digest(previous.encode(), password.encode()):
            return KeyMatch("previous", self._wall() + (seen.previous_until - now))
        return None
