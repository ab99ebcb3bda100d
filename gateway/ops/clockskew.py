"""This instance's clock against the shared queue database's. Leases and due times no longer depend on it
(the PostgreSQL queue stores and compares them on the database's clock, measuring the offset in each of its
transactions: gateway/queue/postgres.py), but the ledger's timestamps, the per-login quotas' clock hours and
days, console sessions' lifetimes and the logs are on this host's clock. Measured at every queue-stats poll
(every 10 s, the first at start), exported as a gauge, and logged once per episode beyond the bound: the
operator learns of a broken NTP before the timeline and the quota windows drift."""

from __future__ import annotations

import structlog
from prometheus_client import Gauge

from gateway.core.episode import Episode
from gateway.ops.metrics import REGISTRY

log = structlog.get_logger("gateway.ops.clockskew")

# A skew past this is a broken NTP: timestamps and quota windows seconds off another instance's.
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
                    action="synchronise this host's clock (NTP): queue leases and due times and the return "
                    "path's leases are on the database's clock and unaffected, but ledger timestamps, webhook "
                    "retries' due times, quota hours and days, console sessions, acceptance times and log "
                    "times are on this host's",
                )
        elif (over := self._skewed.ended()) is not None:
            log.info("queue_clock_skew_over", offset=round(offset, 1), lasted=over.lasted)
