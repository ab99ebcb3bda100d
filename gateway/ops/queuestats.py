"""The queue's depth and age as metrics: a collector fed by the server's periodic read of the queue."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.ops.metrics import REGISTRY

QUEUE_STATES = ("queued", "inflight", "dead")


class QueueStats(Collector):
    """The queue's depth and oldest message by state, as last read.

    The queue store is async: a task of the server reads QueueStore.counts every few seconds and stores it
    here; a scrape only reads these numbers (never the database, never blocking the event loop).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counts: Mapping[str, Mapping[str, Any]] | None = None
        self._updated = 0.0

    def update(self, counts: Mapping[str, Mapping[str, Any]]) -> None:
        self._counts = counts
        self._updated = self._clock()

    def clear(self) -> None:
        self._counts = None

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "smtp_gateway_queue_messages",
            "Messages in the queue by state (queued: waiting "
            "for a retry; inflight: being delivered; dead: dead letters)",
            labels=["state"],
        )
        oldest = GaugeMetricFamily(
            "smtp_gateway_queue_oldest_age_seconds",
            "Age of the oldest message in the queue by state (0 when there is none)",
            labels=["state"],
        )
        stale = GaugeMetricFamily(
            "smtp_gateway_queue_stats_age_seconds",
            "Seconds since the queue figures were read (they are refreshed every few seconds)",
        )
        counts = self._counts
        if counts is not None:
            since = self._clock() - self._updated
            for state in QUEUE_STATES:
                row = counts.get(state) or {}
                depth.add_metric([state], float(row.get("count", 0)))
                age = row.get("oldest_age")
                oldest.add_metric([state], float(age) + since if row.get("count") and age is not None else 0.0)
            stale.add_metric([], since)
        yield depth
        yield oldest
        yield stale


QUEUE_STATS = QueueStats()
REGISTRY.register(QUEUE_STATS)
