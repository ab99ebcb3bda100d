"""Pure: a condition that lasts (an outage, a refusal, a disk full): logged once when it begins and once when
it ends, with what happened meanwhile, never once per attempt while it lasts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ended:
    """An episode that ended: how long it lasted and how often it was seen (the first time included)."""

    lasted: float
    seen: int


class Episode:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.since: float | None = None
        self.seen = 0

    @property
    def active(self) -> bool:
        return self.since is not None

    def occurred(self) -> bool:
        """The condition was seen again; True when this begins the episode (the one line to log)."""
        self.seen += 1
        if self.since is not None:
            return False
        self.since = self._clock()
        return True

    def ended(self) -> Ended | None:
        """The condition is over: the episode that ended (the one line to log), or None if none was running."""
        if self.since is None:
            return None
        over = Ended(round(self._clock() - self.since, 1), self.seen)
        self.since, self.seen = None, 0
        return over
