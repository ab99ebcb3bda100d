"""PostgreSQL down and back, with the real private cluster stopped and started under a running gateway: while
it is known down, messages that need the queue get 452 from the circuit without waiting for a connection,
inline delivery goes on, idempotency keys are kept in memory and recorded once the database is back, and the
queue takes messages again as soon as it answers."""

from __future__ import annotations

import contextlib
import re
import smtplib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import structlog

from gateway.core.errors import QueueBusy, SpoolUnavailable
from gateway.delivery import owner as owner_module
from gateway.delivery.idempotency import KeyBacklog, LateKey
from gateway.ops.metrics import REGISTRY
from gateway.queue import postgres
from tests.harness import DENGAGE_ACCOUNT, DENGAGE_SENDER, DENGAGE_USER, PASSWORD, Running
from tests.pgserver import PgCluster, new_cluster
from tests.queue_contract import new
from tests.spool_helpers import send, wait_for

FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 2.0}
KEY = "X-Gateway-Idempotency-Key: invoice-2024-7\r\n"


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    """A cluster of this test's own: it is stopped and started, which the session's shared one must not be."""
    cluster = new_cluster()
    cluster.start()
    yield cluster
    cluster.stop()


def _queue_full(gw: Running) -> None:
    """The queue refuses every new message from now on (a full disk), the rest of the gateway untouched."""
    store: Any = gw.app.store

    async def insert(message: Any) -> int:
        raise SpoolUnavailable("database or disk is full")

    store.insert = insert


def _send_to_two(gw: Running) -> int:
    """One dEngage message to two recipients (a call each); the reply's code."""
    raw = f"From: {DENGAGE_SENDER}\r\nTo: a@example.com, b@example.com\r\nSubject: partial\r\n\r\nhello\r\n"
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
        client.login(DENGAGE_USER, PASSWORD)
        client.mail(DENGAGE_SENDER)
        client.rcpt("a@example.com")
        client.rcpt("b@example.com")
        return client.data(raw.encode())[0]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_postgresql_down_fails_fast_records_keys_late_and_is_back_at_once(
    gateway_factory: Callable[..., Running], own_cluster: PgCluster
) -> None:
    url = own_cluster.new_database()
    gw = gateway_factory(delivery={**FAST, "queue_url": url})
    assert send(gw.port(), "before")[0] == 250
    unchecked = metric("smtp_gateway_idempotency_keys_late_total", account="acme", result="unchecked")
    recorded = metric("smtp_gateway_idempotency_keys_late_total", account="acme", result="recorded")
    with structlog.testing.capture_logs() as logs:
        own_cluster.halt()
        gw.fault(status=503, count=None)  # every message now needs the queue
        refused = [send(gw.port(), f"needs the queue {i}") for i in range(4)]
        assert [code for code, _ in refused] == [452] * 4
        # One outage, found once; every message after the first was refused by the circuit, at once.
        assert len(events(logs, "queue_database_unreachable")) == 1
        deferred = [e["reason"] for e in events(logs, "message_deferred")]
        assert len(deferred) == 4 and all("database unreachable (" in r and "probing it" in r for r in deferred[1:])
        assert not any("PoolTimeout" in r for r in deferred)  # no caller waited out the pool

        # Inline delivery needs no queue: a keyed message goes, its key kept in this process's memory ...
        gw.clear_faults()
        first = send(gw.port(), "keyed during the outage", extra=KEY)
        again = send(gw.port(), "keyed during the outage", extra=KEY)
        assert first[0] == 250 and again == first  # ... which answers a resend reaching this process
        assert [r["body"]["asunto"] for r in gw.sent].count("keyed during the outage") == 1
        assert metric("smtp_gateway_idempotency_keys_late_total", account="acme", result="unchecked") == unchecked + 1

        own_cluster.resume()
        wait_for(lambda: events(logs, "queue_database_back") or None, 10, "the probe finding the database back")
        wait_for(lambda: events(logs, "idempotency_keys_recorded") or None, 10, "the late key recorded")
        # The first message that needs the queue after that is stored: no stale pool connection, no backoff.
        gw.fault(status=503, count=1)
        stored = send(gw.port(), "queued again")
        assert stored[0] == 250 and len(stored[1].rsplit(" ", 1)[1]) == 16, stored
    [back] = events(logs, "queue_database_back")
    assert back["refused"] >= 3 and back["down_for"] > 0
    [late] = events(logs, "idempotency_keys_recorded")
    assert (late["recorded"], late["dropped"]) == (1, 0)
    assert metric("smtp_gateway_idempotency_keys_late_total", account="acme", result="recorded") == recorded + 1
    # Recorded in the queue: a resend to another instance is recognised too, and not sent again.
    other = gateway_factory(sandbox=gw.sandbox, delivery={**FAST, "queue_url": url})
    assert send(other.port(), "keyed during the outage", extra=KEY) == first
    assert [r["body"]["asunto"] for r in gw.sent].count("keyed during the outage") == 1


def test_the_late_key_backlog_is_bounded_oldest_first() -> None:
    backlog = KeyBacklog(limit=2)
    keys = [LateKey("acme", f"k{n}", f"M{n}", 0.0, 100.0, None) for n in range(3)]
    assert backlog.add(keys[0]) is None and backlog.add(keys[1]) is None
    assert backlog.add(keys[2]) is keys[0]  # given up (and counted as dropped by its owner)
    assert len(backlog) == 2 and backlog.get("acme", "k0") is None and backlog.answered() == []
    keys[1].reply_id = "eeid-1"
    assert backlog.answered() == [keys[1]]


def test_a_partly_delivered_message_the_queue_cannot_take_is_452_and_counted(
    gateway_factory: Callable[..., Running],
) -> None:
    """One recipient's call delivered inline, the other's failed, and the queue refuses the rest: no reply is
    right (452 makes the client resend the whole message, a second copy for the delivered recipient), so the
    window is counted in smtp_gateway_ambiguous_calls_total{cause="partial_unqueued"} and logged with its id."""
    gw = gateway_factory(delivery=FAST, dengage={})
    _queue_full(gw)
    gw.fault(status=503, count=1, kind="send")  # one of the two recipients' calls fails (temporary)
    before = metric("smtp_gateway_ambiguous_calls_total", account=DENGAGE_ACCOUNT, cause="partial_unqueued")
    with structlog.testing.capture_logs() as logs:
        code = _send_to_two(gw)
    delivered = gw.calls("send", status=200)
    assert code == 452 and len(delivered) == 1
    assert metric("smtp_gateway_ambiguous_calls_total", account=DENGAGE_ACCOUNT, cause="partial_unqueued") == before + 1
    [line] = [e for e in events(logs, "delivery_ambiguous") if e["cause"] == "partial_unqueued"]
    assert line["calls"] == [delivered[0]["to"]] and len(line["upstream_ids"]) == 1


def test_a_refusal_after_the_budget_while_the_queue_cannot_store_is_the_refusals_5xx(
    gateway_factory: Callable[..., Running],
) -> None:
    """The budget runs out, the queue cannot store the message in flight, then the upstream refuses it for
    good: the client gets the refusal's 5xx, as within the budget (it was 452 4.3.1: the client resent, at every
    resend while the queue was down, a message refused for good, and never saw why)."""
    gw = gateway_factory(delivery={**FAST, "inline_budget": 0.5})
    _queue_full(gw)
    gw.fault(status=400, count=1, kind="send", reason="invalid sender")
    quick = send(gw.port(), "refused quickly")
    gw.fault(status=400, delay=1.5, count=1, kind="send", reason="invalid sender")  # answers after the budget
    late = send(gw.port(), "refused late")
    assert late == quick and late[0] >= 500 and "invalid sender" in late[1], (quick, late)


def test_a_partial_refusal_after_the_budget_while_the_queue_cannot_store_is_250_and_logged(
    gateway_factory: Callable[..., Running],
) -> None:
    """One recipient delivered, the other refused for good after the budget ran out, the queue unable to keep
    the dead letter: nothing is left to send, so the client gets the 250 (a 452 had it resend to the delivered
    recipient too); the refusal is logged and counted as the dead letter it would be, with stored=False."""
    gw = gateway_factory(delivery={**FAST, "inline_budget": 0.5}, dengage={})
    _queue_full(gw)
    gw.fault(status=400, delay=1.5, count=1, kind="send", reason="invalid recipient")
    before = metric("smtp_gateway_dead_letters_total", cause="refused")
    with structlog.testing.capture_logs() as logs:
        code = _send_to_two(gw)
    assert code == 250 and len(gw.calls("send", status=200)) == 1
    [dead] = events(logs, "message_dead_lettered")
    assert dead["stored"] is False and "invalid recipient" in dead["reason"]
    assert metric("smtp_gateway_dead_letters_total", cause="refused") == before + 1
    assert not [e for e in events(logs, "delivery_ambiguous") if e["cause"] == "partial_unqueued"]


def _health(gw: Running, path: str) -> httpx.Response:
    assert gw.app.operator is not None
    return httpx.get(f"http://127.0.0.1:{gw.app.operator.port}{path}", timeout=5)


def _without_ages(faults: list[str]) -> list[str]:
    return [re.sub(r"\(\d+ s ago: ", "(N s ago: ", fault) for fault in faults]


def test_a_shared_queue_outage_leaves_the_fleet_ready_and_says_it_degraded(
    gateway_factory: Callable[..., Running], own_cluster: PgCluster
) -> None:
    """Every instance on the queue has the outage at once: were each unready, a balancer acting on /readyz
    (config/haproxy.cfg) would have no server left, while each still delivers inline with a 250. So /readyz
    stays 200 and names the outage under `degraded` (so does /healthz); draining is still 503."""
    url = own_cluster.new_database()
    one = gateway_factory(delivery={**FAST, "queue_url": url}, http={"port": 0})
    two = gateway_factory(sandbox=one.sandbox, delivery={**FAST, "queue_url": url}, http={"port": 0})
    assert _health(one, "/readyz").json() == {"ready": True}
    own_cluster.halt()
    try:
        # No client traffic at all: each instance's own queue-stats poll finds the outage.
        for gw in (one, two):
            wait_for(lambda gw=gw: "degraded" in _health(gw, "/readyz").json() or None, 25, "degraded")
            ready = _health(gw, "/readyz")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            assert "queue: cannot be read" in ready.json()["degraded"][0]
            # The same faults; their ages ("3 s ago") may have ticked between the two reads.
            assert _without_ages(_health(gw, "/healthz").json()["degraded"]) == _without_ages(ready.json()["degraded"])
        assert send(one.port(), "inline during the outage")[0] == 250
        assert send(two.port(), "inline during the outage 2")[0] == 250
        # What really stops an instance still makes it unready (the flag a stop clears: test_operator_http).
        assert one.app.operator is not None
        one.app.operator.is_ready = False
        drained = _health(one, "/readyz")
        assert drained.status_code == 503 and drained.json()["problems"] == ["starting or draining"]
        one.app.operator.is_ready = True
    finally:
        own_cluster.resume()
    wait_for(lambda: _health(two, "/readyz").json() == {"ready": True} or None, 25, "not degraded once back")


async def test_an_outage_after_an_exhausted_pool_is_degraded_not_unready(
    own_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that stalls (every pooled connection stuck: this instance's pool exhausted, unready) and then
    goes away (a failover, a crash): the outage is every instance's, so degraded, not unready, although no
    connection was had to end the exhaustion episode (the whole fleet would otherwise go unready at once)."""
    monkeypatch.setattr(postgres, "POOL_WAIT", 1.0)  # the wait for a pooled connection, shortened
    queue = postgres.PostgresQueue(own_cluster.new_database(), max_connections=1)
    await queue.open()
    try:
        with contextlib.suppress(SpoolUnavailable):
            async with queue._tx():  # the only pooled connection, stuck on the stalled database
                with pytest.raises(QueueBusy, match="pooled connections in use"):
                    await queue.insert(new("0" * 16))
                assert queue.health.problems()  # the exhaustion alone: this instance's own, unready
                own_cluster.halt()  # ... and then the database goes away
                with pytest.raises(SpoolUnavailable) as down:
                    await queue.insert(new("1" * 16))
                assert not isinstance(down.value, QueueBusy), down.value
        with pytest.raises(SpoolUnavailable):  # refused at once by the open circuit
            await queue.insert(new("2" * 16))
        assert queue.health.problems() == []
        assert queue.health.degraded()
    finally:
        own_cluster.resume()
        await queue.close()


def test_an_answer_the_queue_cannot_take_waits_for_it_under_a_renewed_lease_and_is_sent_once(
    gateway_factory: Callable[..., Running], own_cluster: PgCluster
) -> None:
    """A short outage while a call stored in flight is on the wire: the owner holds the answer and its lease,
    offers it again until the queue is back, and the message is sent once (it gave up after ~3 s, stopped
    renewing, and the message was resent after its lease as lease_expired: queue3 F1)."""
    url = own_cluster.new_database()
    delivery = {**FAST, "queue_url": url, "inline_budget": 0.5, "lease_seconds": 10.0, "retry_schedule": [0.5]}
    gw = gateway_factory(delivery=delivery)
    lost = metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="lease_expired")
    with structlog.testing.capture_logs() as logs:
        gw.fault(delay=4.0, count=1, kind="send")  # the call is on the wire for 4 s
        code, text = send(gw.port(), "outage during the call")
        assert code == 250, text  # stored in flight after the inline budget, leased to this process
        own_cluster.halt()
        wait_for(lambda: events(logs, "queue_settle_failed") or None, 20, "the answer, not recorded")
        # Longer than the ~3 s the owner used to try for, shorter than the lease.
        wait_for(lambda: len(events(logs, "queue_lease_renew_failed")) or None, 20, "a heartbeat failing")
        own_cluster.resume()
        wait_for(lambda: events(logs, "queue_settle_recorded") or None, 30, "the answer recorded once back")
    assert len(events(logs, "queue_settle_failed")) == 1  # once for the message, not once per try
    [recorded] = events(logs, "queue_settle_recorded")
    assert recorded["stored"] is True and recorded["tries"] >= 2, recorded
    assert events(logs, "message_delivered")
    assert not [e for e in events(logs, "delivery_ambiguous") if e.get("cause") == "lease_expired"]
    assert metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="lease_expired") == lost
    copies = [r for r in gw.sent if "outage during the call" in str(r["body"])]
    assert len(copies) == 1


def test_a_retry_whose_answer_the_queue_refuses_for_a_while_is_recorded_once_it_takes_it(
    gateway_factory: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry worker's path (run_claimed) alike: the settle refused more times than the owner used to try
    (5), then taken; the message stays held (its lease renewed) and its answer is recorded, not left to the
    lease (the waits between tries made short for the test)."""
    monkeypatch.setattr(owner_module, "SETTLE_FIRST_WAIT", 0.01)
    monkeypatch.setattr(owner_module, "SETTLE_MAX_WAIT", 0.05)
    gw = gateway_factory(delivery=FAST)
    store: Any = gw.app.store
    real = store.settle
    refused: list[str] = []

    async def settle(msg_id: str, token: int, decision: Any, now: float) -> bool:
        if len(refused) < 8:
            refused.append(msg_id)
            raise SpoolUnavailable("database or disk is full")
        return bool(await real(msg_id, token, decision, now))

    store.settle = settle  # the inline attempt stores its message with an insert: only the retry settles
    with structlog.testing.capture_logs() as logs:
        gw.fault(status=503, count=1)  # queued inline, then delivered by the retry worker
        assert send(gw.port(), "retry outage")[0] == 250
        wait_for(lambda: events(logs, "queue_settle_recorded") or None, 20, "the retry's answer recorded")
    assert len(events(logs, "queue_settle_failed")) == 1
    [recorded] = events(logs, "queue_settle_recorded")
    assert recorded["stored"] is True and recorded["tries"] == 9
    assert events(logs, "message_delivered")
    assert len([r for r in gw.sent if "retry outage" in str(r["body"])]) == 1


# review today8a F3: a settle retried through an outage longer than the lease comes back fenced after this
# process's worker re-claimed the message (token 2); the old attempt must leave the new attempt's `held` entry
# (and so its lease renewals) alone.
def test_a_fenced_settle_leaves_the_new_attempts_held_entry(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(
        delivery={
            "inline_budget": 0.5,
            "lease_seconds": 1.5,
            "retry_schedule": [0.3],
            "retry_jitter": 0.0,
            "poll_interval": 0.2,
            "probe_interval": 0.3,
        }
    )
    store: Any = gw.app.store
    owner: Any = gw.app.owner
    out = threading.Event()
    for name in ("settle", "renew"):
        real = getattr(store, name)

        def failing(real: Callable[..., Any]) -> Callable[..., Any]:
            async def call(*args: Any) -> Any:
                if out.is_set():
                    raise SpoolUnavailable("queue: database unreachable")
                return await real(*args)

            return call

        setattr(store, name, failing(real))
    with structlog.testing.capture_logs() as logs:
        gw.fault(delay=1.2, count=1, kind="send")  # past the inline budget: stored in flight, 250
        code, text = send(gw.port(), "settle outlives lease")
        assert code == 250, text
        out.set()  # the queue goes away before the call's answer can be settled
        gw.fault(delay=4.5, count=1, kind="send")  # the re-claimed attempt's call takes a while
        wait_for(lambda: events(logs, "queue_settle_failed") or None, 20, "the settle failing")
        [spooled] = events(logs, "message_spooled")
        msg_id = spooled["queue_id"]
        # The lease runs out (renewals fail); this process's worker reaps the message: a new attempt, token 2.
        wait_for(lambda: owner.held.get(msg_id) == 2 or None, 20, "the message reaped by this process (token 2)")
        out.clear()  # the queue is back: the old attempt's settle is fenced (token 1)
        wait_for(lambda: events(logs, "settle_fenced") or None, 20, "the old settle fenced")
        held_after = dict(owner.held)
        running = not events(logs, "message_delivered")
    assert running, "the new attempt ended before the old settle came back: no evidence either way"
    assert held_after.get(msg_id) == 2, "the fenced old attempt dropped the new attempt's `held` entry"
