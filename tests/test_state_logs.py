"""A condition that lasts is logged once when it begins and once when it ends, with counts, never once per
attempt while it lasts: an upstream's outage and its credential refusals (AccountHealth), dead processes'
leases (the retry worker)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from gateway.config import DeliverySettings
from gateway.core.errors import UpstreamAuthFailed, UpstreamUnavailable
from gateway.delivery.health import AccountHealth
from gateway.delivery.leaseowners import place
from gateway.delivery.owner import DeliveryOwner
from gateway.delivery.worker import RetryWorker
from gateway.queue.sqlite import SqliteQueue
from tests.queue_contract import new


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events(logs: list[dict[str, object]], *names: str) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] in names]


def test_an_outage_is_one_line_when_it_begins_and_one_when_it_ends() -> None:
    clock = Clock()
    health = AccountHealth(["acme"], clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(30):  # 30 failed calls over 15 s, nothing succeeding
            health.failed("acme", UpstreamUnavailable("DMDS answered 503"))
            clock.now += 0.5
        assert health.succeeded("acme")
    down, recovered = events(logs, "upstream_down", "upstream_recovered")
    assert (down["event"], down["failures"]) == ("upstream_down", 5)  # 3 in a row, over 2 s
    assert (recovered["event"], recovered["failures"], recovered["down_for"]) == ("upstream_recovered", 30, 15.0)


def test_an_upstream_failing_now_and_then_is_no_outage() -> None:
    clock = Clock()
    health = AccountHealth(["acme"], clock)
    with structlog.testing.capture_logs() as logs:
        for n in range(300):  # one call in three answers 503, for five minutes
            if n % 3 == 0:
                health.failed("acme", UpstreamUnavailable("DMDS answered 503"))
            else:
                health.succeeded("acme")
            clock.now += 1.0
    assert events(logs, "upstream_down", "upstream_recovered") == []


def test_refused_credentials_are_one_line_for_the_whole_refusal() -> None:
    clock = Clock()
    health = AccountHealth(["acme"], clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(200):  # three minutes of refusals
            health.failed("acme", UpstreamAuthFailed("DMDS refused the APIKEY (403)"))
            clock.now += 1.0
        assert health.degraded() == ["acme: upstream refuses the gateway's credentials (DMDS refused the APIKEY (403))"]
        health.succeeded("acme")
    refused, recovered = events(logs, "upstream_refused_credentials", "upstream_recovered")
    assert refused["event"] == "upstream_refused_credentials" and refused["log_level"] == "error"
    assert (recovered["refusals"], recovered["refused_for"]) == (200, 200.0)
    assert health.degraded() == []


async def test_dead_processes_leases_are_logged_once_not_at_every_look(tmp_path: Path) -> None:
    """A dead sibling's leases are ended once; while its messages wait to be claimed (here: their account is
    not this worker's), the next looks find nothing new to say."""
    store = SqliteQueue(tmp_path / "queue.sqlite3")
    settings = DeliverySettings(spool_path=tmp_path / "queue.sqlite3", instance_name="host1")
    owner = DeliveryOwner({}, store, settings, AccountHealth([]), owner=f"host1:{os.getpid()}:{place()}-aaaa")
    worker = RetryWorker(owner, [], 4, 1.0, 15.0)
    dead = f"host1:999999999:{place()}-bbbb"  # no such process, here
    try:
        await store.insert(new("M1", time.time(), owner=dead))
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                await worker._expire_dead_local_owners()
        assert [(e["event"], e["owners"], e["messages"]) for e in logs] == [("queue_dead_owners_expired", [dead], 1)]
    finally:
        await store.close()
