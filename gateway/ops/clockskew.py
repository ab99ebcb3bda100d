"""This instance's clock against the shared queue database's: instances on one PostgreSQL queue compare
leases and due times in epoch seconds of their own clocks, so one whose clock is ahead by more than a lease
takes over the others' live leases (their calls resent as ambiguous) and sends retries early. Measured at
every queue-stats poll (every 10 s, the first at start), exported as a gauge, and logged once per episode
beyond the bound: the operator learns of a broken NTP before duplicates appear."""

from __future__ import annotations

import structlog
from prometheus_client import Gauge

from gateway.core.episode import Episode
from gateway.ops.metrics import REGISTRY

log = structlog.get_logger("gateway.ops.clockskew")

# Leases are 60 s and renewed every 20 s: a skew well under that costs nothing, one near it takes leases over.
SKEW_BOUND = 10.0

CLOCK_OFFSET = Gauge(
    "smtp_gateway_queue_clock_offset_seconds",
    "This instance's clock minus the PostgreSQL queue database's, as last measured (every 10 s); "
    "0 on SQLite (one host, one clock)",
    registry=REGISTRY,
)


class ClockWatch:
    """The measured offsets of one process: a gauge, and one line when the skew passes the bound and one
    when it is back within it."""

    def __init__(self, bound: float = SKEW_BOUND) -> None:
        self._bound = bound
        self._skewed = Episode()

    def observe(self, offset: float) -> None:
        CLOCK_OFFSET.set(offset)
        if abs(offset) > self._bound:
            if self._skewed.occurred():
                log.error(
                    "queue_clock_skew",
                    offset=round(offset, 1),
                    bound=self._bound,
                    action="synchronise this host's clock (NTP): leases and due times are compared in epoch "
                    "seconds of each instance's clock, so a skewed instance takes over live leases (duplicates) "
                    "or sends retries early",
                )
        elif (over := self._skewed.ended()) is not None:
            log.info("queue_clock_skew_over", offset=round(offset, 1), lasted=over.lasted)
