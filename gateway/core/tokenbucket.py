"""Pure: the one token-bucket algorithm of every rate limit here (GCRA, the "virtual scheduling" form).

A bucket is a single number, its theoretical arrival time (`tat`): when the next call would be due if
calls came at exactly the rate. A call may go `burst - 1` intervals ahead of it. The state fits in a
variable, a dict entry or a database row, so the in-process buckets and the one shared through the queue
store run the same arithmetic. Once `tat` is past, the bucket is full: the same as a new one. After a 429
the interval is doubled and recovers linearly.
"""

from __future__ import annotations

from dataclasses import dataclass

NEW = 0.0  # the `tat` of a bucket never used: full


@dataclass(frozen=True, slots=True)
class Slot:
    wait: float  # seconds from now until the slot is the caller's (0: at once)
    tat: float  # the bucket's `tat` once the slot is taken


def take(tat: float, now: float, interval: float, burst: int) -> Slot:
    """The next slot of a bucket of `burst` calls refilled one per `interval` seconds."""
    due = max(tat, now)
    return Slot(wait=max(0.0, due - (burst - 1) * interval - now), tat=due + interval)


@dataclass(frozen=True, slots=True)
class Slots:
    waits: tuple[float, ...]  # each slot's seconds from now, in the order taken
    tat: float  # the bucket's `tat` once they are all taken


def take_many(tat: float, now: float, interval: float, burst: int, count: int) -> Slots:
    """The next `count` slots at once: the same as `count` calls of `take` at the same moment."""
    waits = []
    for _ in range(count):
        slot = take(tat, now, interval, burst)
        waits.append(slot.wait)
        tat = slot.tat
    return Slots(tuple(waits), tat)


def paused(tat: float, now: float, seconds: float) -> float:
    """The `tat` that gives no slot for `seconds` from now (an upstream's Retry-After)."""
    return max(tat, now + seconds)


def slowed(interval: float, now: float, slow_until: float, recovery: float) -> float:
    """The interval after a 429: doubled when the 429 came (`slow_until` = then + `recovery`), back to
    `interval` linearly by `slow_until`."""
    remaining = slow_until - now
    if remaining <= 0 or recovery <= 0:
        return interval
    return interval / (1.0 - 0.5 * min(1.0, remaining / recovery))
