"""A forward step of this host's wall clock, seen by the SQLite queue (whose leases are on that clock).

SQLite's processes share one machine and so one wall clock: leases, due times and lifetimes are stored in its
epoch seconds (gateway/queue/sqlite.py), as the callers pass them. A forward step of that clock (NTP's makestep,
a VM resumed from a snapshot) by lease_seconds or more makes every live lease look expired at once, before the
heartbeats (every third of the lease) have renewed them under the new time: the first claim after the step
would reap them all, and their messages' calls, still running, would be resent. PostgreSQL's backend measures
the host's clock against the database's instead (gateway/core/dbclock.py).

A step is seen at no cost: the host's wall clock minus its monotonic clock moves by the step (a slewing NTP
moves it by at most 0.5 ms a second). Both are read here, not taken from the caller (whose `now` a test may
move on purpose). The process that sees it renews its own leases at once and does not reap for a while
(`hold`), so that its sibling processes, which see the same step, renew theirs first: by their heartbeat
(renewing to their clock's now, the stepped one) or their own first claim. Pure: both clocks are injectable
(tests step a fake wall clock; nothing sleeps).

The first reading is taken when the store is made (the process starts): a step after it is seen at the next
claim, however long the process has run before its first claim. A step before the process started cannot be
seen by it (it knows no earlier reading): its leases are not yet taken then, and its siblings, running at the
step, each see it themselves. A step whose renewal failed (the queue busy) is not consumed: `again` has the
next reading report it once more, so the renewal is retried at the next claim."""

from __future__ import annotations

import time
from collections.abc import Callable

# Seconds by which the wall clock minus the monotonic clock may move forward between two readings and not count
# as a step: far above a slew (0.5 ms/s) and a thread's preemption between the two reads, far below a
# lease (a step shorter than two thirds of a lease cannot reap a lease a heartbeat renewed). A short lease
# gets a third of itself instead (tolerance()), so a step that could reap it is never tolerated.
STEP_TOLERANCE = 1.0


def tolerance(lease: float) -> float:
    """The forward move not counted as a step for leases of `lease` seconds: STEP_TOLERANCE, or a third of
    the lease when that is less (under the two thirds that a heartbeat-renewed lease has left at worst)."""
    return min(STEP_TOLERANCE, lease / 3)


class WallStep:
    """The wall clock's steps as one process sees them (one per queue store, one per SQLite return store)."""

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall = wall
        self._monotonic = monotonic
        # The wall clock minus the monotonic clock at the last reading; the first at construction, so a step
        # before this process's first claim is seen at that claim.
        self._base: float = wall() - monotonic()
        self._reap_from = float("-inf")  # monotonic time from which this process may reap leases again
        self._stepped_at = float("-inf")  # monotonic time at which the last step was seen

    def seen(self, hold: float = 0.0, tolerance: float = STEP_TOLERANCE) -> float:
        """Read the clocks; returns the wall clock's forward step since the last reading (0.0: none, one of
        `tolerance` seconds or less, or a backward step, which only makes leases last longer). After a step,
        reaping waits `hold` seconds."""
        mono = self._monotonic()
        base = self._wall() - mono
        step = base - self._base
        self._base = base
        if step <= tolerance:
            return 0.0
        self._reap_from = mono + hold
        self._stepped_at = mono
        return step

    def again(self, step: float) -> None:
        """The leases could not be renewed after `step` (seen's answer): the next reading reports it again
        (with any step since), so the renewal is retried then. Reaping stays held meanwhile."""
        self._base -= step

    def may_reap(self, hold: float | None = None) -> bool:
        """Whether expired leases may be taken over now (no step seen within its hold). `hold`: this many
        seconds from the last step seen instead of seen()'s own (a store whose kinds of lease differ in length,
        each held for its own: gateway/ledger/sqlite_returns.py)."""
        mono = self._monotonic()
        return mono >= (self._reap_from if hold is None else self._stepped_at + hold)
