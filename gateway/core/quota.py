"""Pure: a login's quotas in fixed windows (clock hours and days, UTC): the windows a moment is in, whether a
message fits them, and when a full one resets. The in-process counts and the ones every instance shares through
the queue store (gateway/queue/) run this same arithmetic."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

HOUR = 3600
DAY = 86400
# How long a window's shared count outlives its end before it is dropped: instances on one queue compute their
# windows with their own clocks, and one behind by less than this still finds the count of its current window.
KEEP_AFTER_END = float(HOUR)
Unit = Literal["messages", "bytes"]


@dataclass(frozen=True, slots=True)
class Window:
    """One window of a login's quota: [start, end) in epoch seconds and its limits (0: none)."""

    name: Literal["hour", "day"]
    start: int
    max_messages: int = 0
    max_bytes: int = 0

    @property
    def end(self) -> int:
        return self.start + (HOUR if self.name == "hour" else DAY)

    @property
    def key(self) -> str:
        """How the window's counts are stored: its kind and start ("hour:1796562000")."""
        return f"{self.name}:{self.start}"


@dataclass(frozen=True, slots=True)
class Counts:
    messages: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a message fits. When not: the full window, in which unit, and whether it can never fit there
    (`too_big`: the message alone is larger than the window's byte limit)."""

    window: Window | None = None
    unit: Unit | None = None
    too_big: bool = False

    @property
    def ok(self) -> bool:
        return self.window is None


OK = Verdict()


def windows(now: float, per_hour: tuple[int, int], per_day: tuple[int, int]) -> tuple[Window, ...]:
    """The windows `now` is in that have a limit: `per_hour` and `per_day` are (messages, bytes), 0: none."""
    second = int(now)
    out = []
    if any(per_hour):
        out.append(Window("hour", second - second % HOUR, *per_hour))
    if any(per_day):
        out.append(Window("day", second - second % DAY, *per_day))
    return tuple(out)


def decide(windows: Sequence[Window], counts: Mapping[str, Counts], messages: int, size: int) -> Verdict:
    """Whether `messages` more messages of `size` bytes in all fit every window, given its counts so far."""
    for window in windows:
        if window.max_bytes and size > window.max_bytes:
            return Verdict(window, "bytes", too_big=True)
    for window in windows:
        now = counts.get(window.key, Counts())
        if window.max_messages and messages and now.messages + messages > window.max_messages:
            return Verdict(window, "messages")
        if window.max_bytes and size and now.bytes + size > window.max_bytes:
            return Verdict(window, "bytes")
    return OK


def added(counts: Counts, messages: int, size: int) -> Counts:
    return Counts(max(0, counts.messages + messages), max(0, counts.bytes + size))
