"""Per-login quotas as metrics: a collector reading the quota tracker's last view of each configured login's
counts (never the queue store: a scrape never waits for a database)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.ops.metrics import REGISTRY

if TYPE_CHECKING:
    from gateway.limits.quotas import QuotaTracker


class QuotaStats(Collector):
    """Each configured login with a quota: its limits, what is used of them in the current clock hour and UTC
    day (as this process last saw the counts every instance shares: after its own last message, or its last
    read at a MAIL), and when each window resets. The logins a provider checks are not listed (unbounded)."""

    def __init__(self) -> None:
        self._tracker: QuotaTracker | None = None

    def track(self, tracker: QuotaTracker | None) -> None:
        self._tracker = tracker

    def collect(self) -> Iterator[Metric]:
        labels = ["account", "login", "window", "unit"]
        limit = GaugeMetricFamily(
            "smtp_gateway_login_quota_limit",
            "A login's quota by window (hour, day) and unit (messages, bytes)",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "smtp_gateway_login_quota_used",
            "What a login used of its quota in the current window, as last seen (shared by every instance)",
            labels=labels,
        )
        resets = GaugeMetricFamily(
            "smtp_gateway_login_quota_resets_timestamp_seconds",
            "When a login's current quota window ends",
            labels=["account", "login", "window"],
        )
        tracker = self._tracker
        if tracker is not None:
            for account, login, quota, view in tracker.views():
                for window in tracker.windows(quota):
                    counts = view.counts.get(window.key) if view is not None else None
                    resets.add_metric([account, login, window.name], float(window.end))
                    for unit, maximum in (("messages", window.max_messages), ("bytes", window.max_bytes)):
                        if maximum:
                            limit.add_metric([account, login, window.name, unit], float(maximum))
                            value = getattr(counts, unit) if counts is not None else 0
                            used.add_metric([account, login, window.name, unit], float(value))
        yield limit
        yield used
        yield resets


QUOTA_STATS = QuotaStats()
REGISTRY.register(QUOTA_STATS)
