"""Whether the queue can take new messages now, for /readyz: a recent failure to store one (or to read
the queue at all), or the disk reserve in use because the disk is full."""

from __future__ import annotations

import time
from collections.abc import Callable

# A failure is news for this long unless a later success of the same kind clears it sooner: a gateway that
# turned unready gets no traffic, so no new message would ever prove the queue writable again.
RECENT = 60.0


class QueueHealth:
    def __init__(self, clock: Callable[[], float] = time.monotonic, recent: float = RECENT) -> None:
        self._clock = clock
        self._recent = recent
        self._failures: dict[str, tuple[float, str]] = {}  # kind ("insert", "read") -> (when, why)
        self.reserve_released = False

    def record(self, kind: str, error: str | None) -> None:
        """The outcome of one queue operation of `kind`: None for success."""
        if error is None:
            self._failures.pop(kind, None)
        else:
            self._failures[kind] = (self._clock(), error)

    def problems(self) -> list[str]:
        now = self._clock()
        found = [
            f"queue: {'cannot store new messages' if kind == 'insert' else 'cannot be read'} "
            f"({round(now - when)} s ago: {error})"
            for kind, (when, error) in sorted(self._failures.items())
            if now - when < self._recent
        ]
        if self.reserve_released:
            found.append(
                "queue: the disk is full (its reserve is in use to drain the queue); new messages get 452 4.3.1"
            )
        return found
