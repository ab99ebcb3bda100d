"""A shared database's clock measured against this host's: the offset that moves a caller's time onto it.

Instances on several machines share one PostgreSQL database (the queue, the ledger's return path). A lease one
instance wrote must end at the same moment for every other, so leases are stored and compared on the one clock
they all see, the database's; callers pass and get times on their own. `DbClock.shift` is that offset (the
database's clock minus this host's), read in the caller's transaction: once, then again in the first
transaction after SHIFT_REFRESH seconds (no round trip per call), and at once in the first one after this
host's clock was stepped (NTP's makestep, a VM resumed), which is seen at no cost as the host's clock minus the
monotonic clock having moved. Pure: the database is read through the callable the backend passes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

# Seconds by which a new reading of the database's clock against this host's may miss the last offset, and the
# last is kept: a scheduler's hiccup between the readings, not a clock that moved.
SHIFT_SLACK = 0.05

# Seconds a reading of the offset serves before the next transaction reads it again: a host's offset drifts by
# milliseconds a day; only a stepped clock moves it, and leases are 60 s. This host's clock stepped is seen at
# once (its difference from time.monotonic() moved by more than SHIFT_SLACK); this bound is for the database's
# clock stepped, which only a reading shows.
SHIFT_REFRESH = 5.0


class DbClock:
    """This host's clock against one database's, as last read (one per store: the offset is the host's)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        # This host's clock, the one the callers' times are on (tests give a skewed one); None: time.time,
        # looked up at each reading.
        self._clock = clock
        self._last_shift: float | None = None  # the database's clock minus this host's, as last read
        self._shift_read = 0.0  # time.monotonic() of that reading
        # This host's clock minus time.monotonic() at that reading: a step of the host's clock moves it (a
        # slewing NTP by microseconds a second), so a cached offset is never used across a step.
        self._host_base = 0.0

    def host_time(self) -> float:
        return time.time() if self._clock is None else self._clock()

    async def shift(self, read: Callable[[], Awaitable[float]], fresh: bool = False) -> float:
        """The database's clock minus this host's; `read` reads the database's clock in epoch seconds, in the
        caller's transaction (the round trip is milliseconds), unless the last reading is younger than
        SHIFT_REFRESH and `fresh` is not asked: added to a caller's time it is on the database's clock,
        subtracted to go back.

        The offset lies between the database's clock minus this host's after and before the reading. Within that
        range (give or take SHIFT_SLACK) no offset is taken if none is possible, else the last one is kept: a
        host's offset is steady, so a time passed twice (a release at `now`, then a claim at that `now`, on this
        instance or another on an agreeing clock) is moved alike and compares as on SQLite, not by a reading's
        jitter; a clock stepped by NTP leaves the range and is followed at the next reading, which is this
        transaction's: the step is seen here, before any time is moved, as this host's clock minus the monotonic
        clock having moved since the last reading (two local calls, no round trip)."""
        monotonic = time.monotonic()
        before = self.host_time()
        base = before - monotonic
        if (
            not fresh
            and self._last_shift is not None
            and monotonic - self._shift_read < SHIFT_REFRESH
            and abs(base - self._host_base) <= SHIFT_SLACK
        ):
            return self._last_shift
        database = await read()
        after = self.host_time()
        low, high = database - after, database - before
        if low - SHIFT_SLACK <= 0.0 <= high + SHIFT_SLACK:
            self._last_shift = 0.0
        elif self._last_shift is None or not low - SHIFT_SLACK <= self._last_shift <= high + SHIFT_SLACK:
            self._last_shift = (low + high) / 2
        self._shift_read, self._host_base = monotonic, base
        return self._last_shift
