"""A queue write whose COMMIT's answer was lost (queue3 F2). On PostgreSQL the connection can be cut after the
server committed and before its answer came back (a failover, a pgbouncer restart, a network cut): the store
raises CommitUnknown, not the failure of a write that never landed, and the owner asks the queue whether the
message is there before it answers: found, the 250 of a stored message; not there, 452; the queue not
answering, 452 and the message withdrawn once it answers, so a message answered 452 is never delivered
(docs/operations/queue.md: its resend is not a duplicate). The owner's side is backend-agnostic and tested on
the default SQLite queue with the lost answer injected after a real insert."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.core.errors import SpoolUnavailable
from gateway.ops.metrics import REGISTRY
from gateway.queue.postgres import PostgresQueue
from gateway.queue.store import CommitUnknown, NewMessage
from tests.harness import Running
from tests.pgserver import PgCluster
from tests.queue_contract import new
from tests.spool_helpers import send, wait_for


class CommitCutter:
    """A proxy in front of the cluster's socket: passes everything through and, once armed, forwards a COMMIT,
    waits for the server's answer (so the server has committed) and closes the client's side instead."""

    def __init__(self, real_socket: str) -> None:
        self.real = real_socket
        self.armed = False
        self.cut = 0
        self.dir = Path(tempfile.mkdtemp(prefix="gwpx-"))

    async def start(self) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self.serve, str(self.dir / ".s.PGSQL.5432"))

    async def serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_unix_connection(self.real)
        commit_sent = asyncio.Event()

        async def up() -> None:
            while data := await c_reader.read(65536):
                s_writer.write(data)
                await s_writer.drain()
                if self.armed and b"COMMIT" in data:
                    commit_sent.set()
                    return

        async def down() -> None:
            while data := await s_reader.read(65536):
                if commit_sent.is_set():  # the server's answer to the COMMIT: it committed. Dropped.
                    self.cut += 1
                    self.armed = False
                    return
                c_writer.write(data)
                await c_writer.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if commit_sent.is_set():
            await tasks[1]
        for t in tasks:
            t.cancel()
        for w in (c_writer, s_writer):
            with contextlib.suppress(Exception):
                w.close()


@pytest.mark.asyncio
async def test_a_commit_whose_answer_is_lost_is_told_from_a_failure_and_found(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    proxy = CommitCutter(str(pg_cluster.dir / ".s.PGSQL.5432"))
    server = await proxy.start()
    via_proxy = url.replace(f"host={pg_cluster.dir}", f"host={proxy.dir}")
    queue, direct = PostgresQueue(via_proxy), PostgresQueue(url)
    try:
        await queue.open()
        await direct.open()
        proxy.armed = True
        with pytest.raises(CommitUnknown):  # not a plain failure: the insert may have landed
            await queue.insert(new("0123456789ABCDEF"))
        assert proxy.cut == 1
        # It did: what the owner's check sees (queued, never claimed: token 0), and what a withdraw removes.
        assert await direct.token_of("0123456789ABCDEF") == 0
        assert await direct.withdraw("0123456789ABCDEF", 1) == "claimed"  # another token: left alone
        assert await direct.withdraw("0123456789ABCDEF", 0) == "withdrawn"
        assert await direct.show("0123456789ABCDEF") is None
        assert await direct.withdraw("0123456789ABCDEF", 0) == "absent"
    finally:
        await queue.close()
        await direct.close()
        server.close()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def _commit_answer_lost(gw: Running) -> None:
    """Every insert lands and then raises CommitUnknown, as on PostgreSQL when the COMMIT's answer is cut."""
    store: Any = gw.app.store
    real = store.insert

    async def insert(message: NewMessage) -> int:
        await real(message)
        raise CommitUnknown("queue: database unreachable (connection cut); the COMMIT's answer was lost")

    store.insert = insert


def _queue_silent_until(gw: Running, back: threading.Event) -> None:
    """The queue does not answer the owner's questions about a message (token_of, withdraw) until `back`."""
    store: Any = gw.app.store
    for name in ("token_of", "withdraw"):
        real = getattr(store, name)

        def silent(real: Callable[..., Any]) -> Callable[..., Any]:
            async def call(*args: Any) -> Any:
                if not back.is_set():
                    raise SpoolUnavailable("queue: database unreachable; probing it")
                return await real(*args)

            return call

        setattr(store, name, silent(real))


FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2}


def test_a_message_whose_commit_answer_was_lost_but_is_stored_is_answered_250_and_sent_once(
    gateway_factory: Callable[..., Running],
) -> None:
    gw = gateway_factory(delivery={**FAST, "inline_budget": 2.0})
    stored = metric("smtp_gateway_queue_commit_unknown_total", result="stored")
    _commit_answer_lost(gw)
    with structlog.testing.capture_logs() as logs:
        gw.fault(status=503, count=1)  # queued after the inline attempt: the insert's answer is lost
        code, text = send(gw.port(), "commit answer lost")
        assert code == 250, text  # it is in the queue: the client must not resend it
        wait_for(lambda: events(logs, "message_delivered") or None, 20, "the retry")
    assert [e["result"] for e in events(logs, "queue_commit_unknown")] == ["stored"]
    assert metric("smtp_gateway_queue_commit_unknown_total", result="stored") == stored + 1
    assert len([r for r in gw.sent if "commit answer lost" in str(r["body"])]) == 1


def test_a_message_answered_452_while_its_commit_is_unknown_is_withdrawn_once_the_queue_answers(
    gateway_factory: Callable[..., Running],
) -> None:
    # Its first retry later than the queue's silence: nobody claims it before it is withdrawn.
    gw = gateway_factory(delivery={**FAST, "inline_budget": 2.0, "retry_schedule": [60.0]})
    withdrawn = metric("smtp_gateway_queue_commit_unknown_total", result="withdrawn")
    back = threading.Event()
    _commit_answer_lost(gw)
    _queue_silent_until(gw, back)
    with structlog.testing.capture_logs() as logs:
        gw.fault(status=503, count=1)
        code, text = send(gw.port(), "commit unknown")
        assert code == 452, text  # not known to be stored: the client keeps it and resends
        [unknown] = events(logs, "queue_commit_unknown")
        assert unknown["result"] == "unknown"
        back.set()
        wait_for(lambda: events(logs, "queue_commit_withdrawn") or None, 20, "the message withdrawn")
    assert events(logs, "queue_commit_withdrawn")[0]["found"] is True  # it had landed: left, it was delivered
    assert metric("smtp_gateway_queue_commit_unknown_total", result="withdrawn") == withdrawn + 1
    assert gw.loop.run(gw.app.store.show(unknown["queue_id"])) is None
    assert not [r for r in gw.sent if "commit unknown" in str(r["body"])]


def test_a_delivered_settle_whose_commit_answer_was_lost_is_not_called_fenced(
    gateway_factory: Callable[..., Running],
) -> None:
    """The retried settle of a delivered message finds it gone (the lost COMMIT deleted it): settled, not
    `settle_fenced` ("another owner claimed the message"), which sent operators looking for a duplicate."""
    gw = gateway_factory(delivery={**FAST, "inline_budget": 2.0})
    store: Any = gw.app.store
    real = store.settle
    cut: list[str] = []

    async def settle(msg_id: str, token: int, decision: Any, now: float) -> bool:
        done = await real(msg_id, token, decision, now)
        if not cut:
            cut.append(msg_id)
            raise CommitUnknown("queue: database unreachable (connection cut); the COMMIT's answer was lost")
        return bool(done)

    store.settle = settle
    with structlog.testing.capture_logs() as logs:
        gw.fault(status=503, count=1)
        assert send(gw.port(), "settle answer lost")[0] == 250
        wait_for(lambda: events(logs, "queue_settle_recorded") or None, 20, "the settle tried again")
    assert cut and events(logs, "queue_settle_recorded")[0]["stored"] is True
    assert events(logs, "message_delivered") and not events(logs, "settle_fenced")


def test_a_message_stored_in_flight_whose_commit_is_unknown_is_withdrawn_and_not_sent_again(
    gateway_factory: Callable[..., Running],
) -> None:
    """Past the inline budget the message is stored in flight (its call marked sending): that insert's COMMIT
    answer lost and the queue silent, the reply is the call's own (here delivered: 250, as when the queue
    cannot store), and the row, leased to this process meanwhile, is withdrawn once the queue answers: left,
    its lease would run out and the call be resent (lease_expired)."""
    gw = gateway_factory(delivery={**FAST, "inline_budget": 0.3, "lease_seconds": 30.0})
    back = threading.Event()
    _commit_answer_lost(gw)
    _queue_silent_until(gw, back)
    with structlog.testing.capture_logs() as logs:
        gw.fault(delay=1.0, count=1, kind="send")  # answers after the budget, while the insert is unknown
        code, text = send(gw.port(), "in flight, commit unknown")
        assert code == 250, text  # the call's own answer: delivered
        [unknown] = events(logs, "queue_commit_unknown")
        assert unknown["result"] == "unknown"
        assert gw.loop.run(gw.app.store.show(unknown["queue_id"])) is not None  # it had landed, leased to us
        back.set()
        wait_for(lambda: events(logs, "queue_commit_withdrawn") or None, 20, "the message withdrawn")
    assert events(logs, "queue_commit_withdrawn")[0]["found"] is True
    assert gw.loop.run(gw.app.store.show(unknown["queue_id"])) is None
    assert len([r for r in gw.sent if "in flight, commit unknown" in str(r["body"])]) == 1


# review today8a F2: a withdraw that finds the message claimed by this process's own retry worker (it had landed,
# queued, its first retry due while the owner asked) must not drop that attempt's `held` entry: the heartbeat
# would stop renewing the running attempt's lease, and the message could be reaped and sent again.
def test_a_withdraw_that_finds_the_message_claimed_leaves_the_claimed_attempts_entry_alone(
    gateway_factory: Callable[..., Running],
) -> None:
    gw = gateway_factory(
        delivery={
            "retry_schedule": [0.3],
            "retry_jitter": 0.0,
            "poll_interval": 0.2,
            "probe_interval": 0.3,
            "inline_budget": 2.0,
        }
    )
    back = threading.Event()
    _commit_answer_lost(gw)
    _queue_silent_until(gw, back)
    owner: Any = gw.app.owner
    with structlog.testing.capture_logs() as logs:
        gw.fault(status=503, count=1, kind="send")  # the inline attempt: queued (its insert's answer lost)
        gw.fault(delay=4.0, count=1, kind="send")  # the retry worker's attempt: its call takes 4 s
        code, text = send(gw.port(), "withdraw meets claim")
        assert code == 452, text
        [unknown] = events(logs, "queue_commit_unknown")
        msg_id = unknown["queue_id"]
        # The message had landed (queued, due in 0.3 s): this process's worker claimed it while _landed asked.
        wait_for(lambda: owner.held.get(msg_id) == 1 or None, 20, "the claimed attempt (token 1)")
        back.set()  # the queue answers the withdraw: "claimed" (another token), left alone
        [left] = wait_for(lambda: events(logs, "queue_commit_unknown_left") or None, 20, "the withdraw's answer")
        held_after = dict(owner.held)
        running = not events(logs, "message_delivered")
    assert left["result"] == "claimed"
    assert running, "the claimed attempt ended before the withdraw answered: no evidence either way"
    assert held_after.get(msg_id) == 1, "the withdraw dropped the running claimed attempt's `held` entry"
