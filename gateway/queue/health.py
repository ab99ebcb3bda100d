"""Whether the queue can take new messages now, for /readyz: a recent failure to store one (or to read
the queue at all), or the disk reserve in use because the disk is full.

A fault of a queue this instance alone uses (a SQLite file on its own disk) makes it unready: another
instance behind the balancer can still store what this one cannot. A fault of a queue every instance shares
(PostgreSQL) is only *degraded*: every instance has it at the same moment, so turning each of them unready
would leave the balancer no server at all, while each one still delivers inline with a 250."""

from __future__ import annotations

import time
from collections.abc import Callable

# A failure is news for this long unless a later success of the same kind clears it sooner: a gateway that
# turned unready gets no traffic, so no new message would ever prove the queue writable again.
RECENT = 60.0


class QueueHealth:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, recent: float = RECENT, shared: bool = False
    ) -> None:
        self._clock = clock
        self._recent = recent
        # kind ("insert", "read") -> (when, why, this instance's own: not a fault every instance shares)
        self._failures: dict[str, tuple[float, str, bool]] = {}
        self.reserve_released = False
        self.shared = shared  # every instance of the fleet uses this queue (PostgreSQL)
        # The queue (or its ledger) turned out written by a newer version after the start (opened lazily after
        # an outage): why, and who is told (the app, which stops the process as a start would have refused).
        self.too_new: str | None = None
        self.on_too_new: Callable[[str], None] | None = None

    def newer_version(self, reason: str) -> None:
        """The queue's schema is newer than this gateway's: not a failure that passes (this instance stays
        unready for good) and its owner is told once."""
        if self.too_new is not None:
            return
        self.too_new = reason
        if self.on_too_new is not None:
            self.on_too_new(reason)

    def record(self, kind: str, error: str | None, local: bool = False) -> None:
        """The outcome of one queue operation of `kind`: None for success. `local`: a failure of this
        instance's own even on a shared queue (its connection pool all in use), which another can serve."""
        if error is None:
            self._failures.pop(kind, None)
        else:
            self._failures[kind] = (self._clock(), error, local or not self.shared)

    def _failing(self, own: bool) -> list[str]:
        now = self._clock()
        return [
            f"queue: {'cannot store new messages' if kind == 'insert' else 'cannot be read'} "
            f"({round(now - when)} s ago: {error})"
            for kind, (when, error, mine) in sorted(self._failures.items())
            if now - when < self._recent and mine == own
        ]

    def problems(self) -> list[str]:
        """What makes this instance unready: its own queue failing, its own disk full."""
        found = self._failing(own=True)
        if self.too_new is not None:  # this instance's own version is too old: a newer one can serve
            found.append(f"queue: written by a newer version of the gateway ({self.too_new})")
        if self.reserve_released:
            found.append(
                "queue: the disk is full (its reserve is in use to drain the queue); new messages get 452 4.3.1"
            )
        return found

    def degraded(self) -> list[str]:
        """What every instance on a shared queue has at once: said, but the instance stays ready."""
        return self._failing(own=False)
