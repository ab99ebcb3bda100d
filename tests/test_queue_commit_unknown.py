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
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import structlog

from gateway.core.errors import SpoolUnavailable
from gateway.delivery.owner import DeliveryOwner
from gateway.ops.metrics import REGISTRY
from gateway.queue.postgres import PostgresQueue
from gateway.queue.store import CommitUnknown, NewMessage, QueueDataRefused
from tests.harness import Running
from tests.pgserver import PgCluster, new_cluster
from tests.queue_contract import new
from tests.spool_helpers import send, wait_for


class CommitCutter:
    """A proxy in front of the cluster's socket: passes everything through and, once armed, forwards a COMMIT,
    waits for the server's answer (so the server has committed) and closes the client's side instead."""

    def __init__(self, real_socket: str, *, await_answer: bool = True) -> None:
        self.real = real_socket
        self.await_answer = await_answer  # False: the client's side is cut as soon as the COMMIT went
        self.armed = False
        self.cut = 0
        self.dir = Path(tempfile.mkdtemp(prefix="gwpx-"))
        # Every connection's two sides and its serving task: closed by close(), in the test's own loop (a side
        # left to the garbage collector warns in whichever later test collects it, which then fails).
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> asyncio.AbstractServer:
        self.server = await asyncio.start_unix_server(self.serve, str(self.dir / ".s.PGSQL.5432"))
        return self.server

    async def close(self) -> None:
        """Stop accepting, close every side of every connection, and wait for the serving tasks to end."""
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        self.writers.append(c_writer)
        s_reader, s_writer = await asyncio.open_unix_connection(self.real)
        self.writers.append(s_writer)
        commit_sent = asyncio.Event()

        async def up() -> None:
            while data := await c_reader.read(65536):
                s_writer.write(data)
                await s_writer.drain()
                if self.armed and b"COMMIT" in data:
                    commit_sent.set()
                    if not self.await_answer:  # the server finishes the COMMIT whenever it does, unheard
                        self.cut += 1
                        self.armed = False
                        c_writer.close()
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
        self.tasks.update(tasks)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if commit_sent.is_set() and self.await_answer:
            await tasks[1]
        for t in tasks:
            t.cancel()
        # Without awaiting the answer, the server's side stays open until close(): its backend is still in
        # the COMMIT.
        for w in (c_writer, s_writer) if self.await_answer else (c_writer,):
            with contextlib.suppress(Exception):
                w.close()


@pytest.mark.asyncio
async def test_a_commit_whose_answer_is_lost_is_told_from_a_failure_and_found(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    proxy = CommitCutter(str(pg_cluster.dir / ".s.PGSQL.5432"))
    await proxy.start()
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
        await proxy.close()


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


async def _reconfigured(url: str, change: str, expected: str) -> None:
    """ALTER SYSTEM `change`, reloaded, and waited for until the server shows `expected`."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(change)
        await conn.execute("SELECT pg_reload_conf()")
        for _ in range(200):
            row = await (await conn.execute("SHOW synchronous_standby_names")).fetchone()
            if row is not None and row[0] == expected:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"synchronous_standby_names never became {expected!r}")


@pytest.mark.asyncio
async def test_a_commit_still_finishing_after_its_answer_was_lost_is_in_progress_not_absent() -> None:
    """Review today8a F1: the COMMIT went, its answer was lost, and the server has not finished it (waiting for
    a synchronous standby; also a slow WAL flush). Its row is invisible to every other session and FOR UPDATE
    does not wait for a row it cannot see, so the row alone says "absent" (once answered 452, final) and the
    message lands after. The insert's transaction id (CommitUnknown.xid) tells: in progress, then committed."""
    cluster = new_cluster()  # its own: synchronous_standby_names is the whole cluster's
    cluster.start()
    server = None
    queue = direct = None
    try:
        url = cluster.new_database()
        proxy = CommitCutter(str(cluster.dir / ".s.PGSQL.5432"), await_answer=False)
        server = await proxy.start()
        queue = PostgresQueue(url.replace(f"host={cluster.dir}", f"host={proxy.dir}"))
        direct = PostgresQueue(url)
        await queue.open()
        await direct.open()
        # A synchronous standby that is not there (yet): a COMMIT waits for it, its rows unseen meanwhile.
        await _reconfigured(url, "ALTER SYSTEM SET synchronous_standby_names = 'standby1'", "standby1")
        proxy.armed = True
        with pytest.raises(CommitUnknown) as lost:
            await asyncio.wait_for(queue.insert(new("0123456789ABCDEF")), 10)
        assert proxy.cut == 1
        xid = lost.value.xid
        assert xid is not None
        assert await direct.token_of("0123456789ABCDEF") is None  # the row alone: "absent", which it is not
        assert await direct.commit_state(xid) == "in progress"
        # The standby catches up (or the operator drops synchronous mode): the waiting COMMIT completes.
        await _reconfigured(url, "ALTER SYSTEM RESET synchronous_standby_names", "")
        state = None
        for _ in range(200):
            if (state := await direct.commit_state(xid)) != "in progress":
                break
            await asyncio.sleep(0.05)
        assert state == "committed"
        assert await direct.token_of("0123456789ABCDEF") == 0  # committed: seen by every statement from now
        # A transaction rolled back is "aborted": nothing it wrote exists, for good.
        async with await psycopg.AsyncConnection.connect(url) as conn:
            row = await (await conn.execute("SELECT txid_current()")).fetchone()
            assert row is not None
            await conn.rollback()
        assert await direct.commit_state(int(row[0])) == "aborted"
    finally:
        for q in (queue, direct):
            if q is not None:
                with contextlib.suppress(Exception):
                    await q.close()
        if server is not None:
            await proxy.close()
        cluster.stop()


def test_a_message_whose_commit_is_still_finishing_is_answered_452_and_withdrawn_not_taken_for_absent(
    gateway_factory: Callable[..., Running],
) -> None:
    """Review today8a F1, the owner's side: while the queue says the insert's transaction is still in progress
    (its row unseen), the message is not "absent" (a final 452 for a message that then lands and is sent, its
    resend a duplicate): 452 as for a queue that does not answer, and withdrawn once the COMMIT has ended."""
    gw = gateway_factory(delivery={**FAST, "inline_budget": 2.0, "retry_schedule": [60.0]})
    store: Any = gw.app.store
    real_insert = store.insert
    finishing: list[NewMessage] = []
    ended = threading.Event()

    async def insert(message: NewMessage) -> int:
        finishing.append(message)  # the COMMIT went and waits for a synchronous standby: nothing seen yet
        raise CommitUnknown("queue: database unreachable (connection cut); the COMMIT's answer was lost", xid=7)

    async def commit_state(xid: int) -> str | None:
        assert xid == 7
        if not ended.is_set():
            return "in progress"
        while finishing:  # the standby answered: the row is there, seen from now on
            await real_insert(finishing.pop())
        return "committed"

    store.insert = insert
    store.commit_state = commit_state
    with structlog.testing.capture_logs() as logs:
        gw.fault(status=503, count=1)  # queued after the inline attempt: its insert's answer is lost
        code, text = send(gw.port(), "commit still finishing")
        assert code == 452, text
        [unknown] = events(logs, "queue_commit_unknown")
        assert unknown["result"] == "unknown"  # not "absent": the COMMIT may yet land
        ended.set()
        wait_for(lambda: events(logs, "queue_commit_withdrawn") or None, 20, "the message withdrawn")
    assert events(logs, "queue_commit_withdrawn")[0]["found"] is True
    assert gw.loop.run(store.show(unknown["queue_id"])) is None
    assert not [r for r in gw.sent if "commit still finishing" in str(r["body"])]


# Review today9 F1: after a failover to an asynchronous standby that never got the insert's WAL, the insert's
# transaction id is past the new primary's next one, and txid_status() raises "transaction ID ... is in the
# future" (SQLSTATE 22023). That server does not know the transaction: None (the row decides), not a refusal.
@pytest.mark.asyncio
async def test_the_commit_state_of_an_xid_the_server_has_not_reached_is_not_known(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    async with await psycopg.AsyncConnection.connect(url) as conn:
        row = await (await conn.execute("SELECT txid_current()")).fetchone()
        assert row is not None
        now = int(row[0])
    queue = PostgresQueue(url)
    await queue.open()
    try:
        assert await queue.commit_state(now + 1000) is None  # the old primary's id, not handed out here yet
    finally:
        await queue.close()


# Review today9 F2: a transaction id means something only on the server that gave it: a standby promoted before
# the insert's WAL reached it hands the same id to transactions of its own, and txid_status answers for those.
# Simulated on one cluster: the insert's id is one the server gives an unrelated, committed transaction, and the
# message's row does not exist. "Committed" without the row is not "stored" (a 250 for a message that is nowhere).
@pytest.mark.asyncio
async def test_a_reused_xid_is_not_taken_for_the_insert_having_landed(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    queue = PostgresQueue(url)
    await queue.open()
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            row = await (await conn.execute("SELECT txid_current()")).fetchone()
            assert row is not None
            lost_xid = int(row[0]) + 5  # the old primary's id for the insert, never replicated
            for _ in range(10):  # the promoted server's own traffic hands that id out again
                await conn.execute("SELECT txid_current()")
        assert await queue.commit_state(lost_xid) == "committed"  # someone else's transaction
        assert await queue.token_of("0123456789ABCDEF") is None  # the message is not there
        owner: Any = SimpleNamespace(store=queue)
        # Not known (None): 452, and the message withdrawn should it land after all.
        assert await DeliveryOwner._landed(owner, "0123456789ABCDEF", lost_xid) is None
        await queue.insert(new("0123456789ABCDEF"))  # its row there, "committed" is confirmed
        assert await DeliveryOwner._landed(owner, "0123456789ABCDEF", lost_xid) is True
    finally:
        await queue.close()


def test_an_error_asking_the_commit_state_is_not_known_not_a_451_with_the_call_going_on(
    gateway_factory: Callable[..., Running],
) -> None:
    """Review today9 F1, the owner's side: an error the owner does not expect while asking what became of an
    in-flight insert whose COMMIT's answer was lost (here QueueDataRefused, what txid_status's "in the future"
    was before commit_state knew it) is logged once with its traceback and taken for "not known": the call's
    own answer (delivered: 250), and the row withdrawn. It was a 451 (delivery_internal_error) while the call
    went on and delivered (the resend a duplicate), and a withdraw already running died unretrieved."""
    gw = gateway_factory(delivery={**FAST, "inline_budget": 0.3, "lease_seconds": 30.0, "retry_schedule": [60.0]})
    store: Any = gw.app.store
    real_insert = store.insert
    internal = metric("smtp_gateway_internal_errors_total", where="queue_commit_unknown")

    async def insert(message: NewMessage) -> int:  # it lands, and the COMMIT's answer is lost
        await real_insert(message)
        raise CommitUnknown("queue: database unreachable (connection cut); the COMMIT's answer was lost", xid=7)

    async def commit_state(xid: int) -> str | None:
        raise QueueDataRefused("queue: InvalidParameterValue: transaction ID 7 is in the future")

    store.insert = insert
    store.commit_state = commit_state
    with structlog.testing.capture_logs() as logs:
        gw.fault(delay=1.0, count=1, kind="send")  # answers after the budget: stored in flight
        code, text = send(gw.port(), "in flight, state refused")
        assert code == 250, text  # the call's own answer: delivered
        wait_for(lambda: events(logs, "queue_commit_withdrawn") or None, 20, "the message withdrawn")
    assert not events(logs, "delivery_internal_error")
    assert [e["result"] for e in events(logs, "queue_commit_unknown")] == ["unknown"]
    failed = events(logs, "queue_commit_check_failed")
    assert [e["step"] for e in failed] == ["landed", "withdraw"] and all(e["exc_info"] for e in failed)
    assert metric("smtp_gateway_internal_errors_total", where="queue_commit_unknown") == internal + 2
    assert events(logs, "queue_commit_withdrawn")[0]["found"] is True
    assert len([r for r in gw.sent if "in flight, state refused" in str(r["body"])]) == 1
