"""This instance's clock against the shared PostgreSQL queue's: measured at every queue-stats poll, exported
as a gauge, logged once when it passes the bound (a skewed instance takes over its siblings' live leases)."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import structlog

from gateway.ops.clockskew import CLOCK_OFFSET, ClockWatch
from gateway.ops.metrics import REGISTRY
from tests.harness import Running
from tests.pgserver import PgCluster
from tests.spool_helpers import wait_for


def offset_gauge() -> float | None:
    return REGISTRY.get_sample_value("smtp_gateway_queue_clock_offset_seconds")


def test_a_skew_is_said_once_when_it_begins_and_once_when_it_ends() -> None:
    watch = ClockWatch(bound=10.0)
    with structlog.testing.capture_logs() as logs:
        for offset in (0.2, -0.3, 120.0, 121.0, 119.5, 0.4, -0.1):
            watch.observe(offset)
    assert [(e["event"], e["log_level"], e["offset"]) for e in logs] == [
        ("queue_clock_skew", "error", 120.0),
        ("queue_clock_skew_over", "info", 0.4),
    ]
    assert offset_gauge() == -0.1
    with structlog.testing.capture_logs() as logs:
        watch.observe(-30.0)  # behind counts too: its leases are the ones taken over
    assert [e["event"] for e in logs] == ["queue_clock_skew"]


def test_a_gateway_measures_its_clock_against_the_queue_database(
    gateway_factory: Callable[..., Running], pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.app.QUEUE_STATS_EVERY", 0.1)
    CLOCK_OFFSET.set(float("nan"))  # not an earlier test's figure
    gateway_factory(delivery={"queue_url": pg_cluster.new_database()})
    # Same host, same clock: within the round trip (far under a second).
    wait_for(lambda: ((g := offset_gauge()) is not None and abs(g) < 1.0) or None, 10, "a measured offset")
    with structlog.testing.capture_logs() as logs:
        # This host's clock 2 minutes ahead, as the queue backend reads it (through gateway/core/dbclock.py,
        # its only use of time.time).
        monkeypatch.setattr(
            "gateway.core.dbclock.time", SimpleNamespace(time=lambda: time.time() + 120.0, monotonic=time.monotonic)
        )
        wait_for(lambda: any(e["event"] == "queue_clock_skew" for e in logs) or None, 10, "the skew logged")
    assert 119.0 < (offset_gauge() or 0.0) < 121.0
    [skew] = [e for e in logs if e["event"] == "queue_clock_skew"]
    assert skew["log_level"] == "error" and 119.0 < skew["offset"] < 121.0 and skew["bound"] == 10.0
