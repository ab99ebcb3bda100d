"""How many bytes of large messages one process holds at once (limits.max_large_bytes).

A message counts once it grows past `threshold` (small mail never waits for anything), with its whole
size, from its DATA until its first delivery attempt has ended (delivered, refused, or stored in the
queue). A message that would go past the limit is read to its end and refused with 452 4.3.1, so many
scans at once cannot exhaust memory; the client sends it again later, as SMTP clients do after a 4xx.

A plain-text body is charged by what it becomes: the parser grows the message's share by what escaping its
text for the HTML body adds (gateway/mime/bodies.py), on its thread, before it builds that HTML.
"""

from __future__ import annotations

import threading

from gateway.ops.metrics import LARGE_BYTES, LARGE_REFUSED


class ByteBudget:
    def __init__(self, limit: int, threshold: int) -> None:
        self.limit = limit
        self.threshold = threshold
        self.used = 0
        # The sessions grow their shares on the event loop, a parser thread grows a text body's: `used` is
        # read and written under this lock (held for a few operations, never across an await).
        self.lock = threading.Lock()

    def free(self) -> int:
        return self.limit - self.used

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One message's share of the budget; released once (idempotent), and never grown again after."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0
        # Released for good: a parser thread still at work when its message's task was cancelled (and the
        # share released) must not take a share that nobody would release.
        self._released = False

    def grow(self, size: int) -> bool:
        """The message is `size` bytes now: reserve them if it is large. False: over the limit."""
        budget = self._budget
        if size <= budget.threshold or size <= self.held:
            return True
        with budget.lock:
            if self._released:
                return False
            more = size - self.held
            if budget.used + more > budget.limit:
                LARGE_REFUSED.inc()
                return False
            budget.used += more
            self.held = size
            LARGE_BYTES.set(budget.used)
        return True

    def fits(self, size: int) -> bool:
        """Whether a message charged `size` bytes could ever be held (the whole budget free)."""
        return size <= self._budget.limit

    def release(self) -> None:
        budget = self._budget
        with budget.lock:
            budget.used -= self.held
            self.held = 0
            self._released = True
            LARGE_BYTES.set(budget.used)
