"""The PostgreSQL queue backend: one database shared by gateway instances on several machines.

psycopg 3, async, pooled. Claims lock rows with `FOR UPDATE SKIP LOCKED`, so instances never wait for
each other and never claim one message twice; every write happens in one transaction and is committed
before the call returns (with a synchronous standby, `synchronous_commit` decides when a commit is
acknowledged: docs/operations/instances.md). Changes that make a message due NOTIFY the other
instances (LISTEN/NOTIFY), so they need not poll.

One clock, the database's: every lease end, due time and message lifetime is stored and compared in epoch
seconds of the database's clock (clock_timestamp()), never of an instance's. Callers pass and get times on
their own clock (the store's interface is SQLite's too); each transaction that reads or writes one moves the
caller's times by the database's clock minus this host's (`_shift`: gateway/core/dbclock.py, shared with the
ledger's return path): read in the first such transaction, then again in the first one after SHIFT_REFRESH
seconds (no round trip per message on the accept path), so there is no first measurement to wait for; and at
once in the first transaction after this host's clock was stepped (NTP, a VM resumed), so no transaction passes
a time moved by the offset from before the step (the database's own clock stepped is followed within
SHIFT_REFRESH). A host whose clock is minutes off neither takes over live leases nor sends retries early or
late; only durations (a 60 s lease, a 20 s backoff) come from its clock. The offset is still exported and
logged (gateway/ops/clockskew.py): ledger timestamps and quota windows remain on each instance's clock
(docs/operations/instances.md).

A database that cannot be reached is known down (a circuit): every caller gets SpoolUnavailable at once
instead of waiting for a pooled connection, while one background probe asks the database every second;
the first answer closes the circuit (and drops the pool's dead connections), so the queue is back at once.

A database that answers but does not serve in time is busy, not down: every pooled connection has a
`lock_timeout` and a `statement_timeout` (server-side, so a cancelled statement is a definite rollback; a
client-side cancel of a COMMIT would leave the client not knowing). A lock held by another session (LOCK
TABLE, VACUUM FULL, a migration, an operator's open transaction) makes the store answer 452 after the bound,
as SQLite's busy timeout does, instead of a reply that never comes and a row written after the client left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors
import structlog
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.core import authcount, queueurl, quota, tokenbucket
from gateway.core.authcount import Record, Rules
from gateway.core.dbclock import DbClock
from gateway.core.episode import Episode
from gateway.core.errors import PoolExhausted, QueueBusy, QueueTooNew, QueueUnreachable, SpoolUnavailable
from gateway.core.quota import Counts, Verdict, Window
from gateway.core.records import Decision
from gateway.core.storable import storable_decision
from gateway.core.waits import idle
from gateway.queue import postgres_schema
from gateway.queue.health import QueueHealth
from gateway.queue.sql import FOR_POSTGRES, POSTGRES, UNSHOWN, auth_held_parameters
from gateway.queue.store import (
    AUTH_SWEEP_EVERY,
    SIGNOUT_KEPT_PAST,
    AuthChange,
    Claimed,
    ClaimedRows,
    CommitUnknown,
    KeyHit,
    KeyTakenOver,
    NewMessage,
    QueueDataRefused,
    auth_begin_change,
    auth_end_change,
    auth_lift_change,
    auth_read,
    auth_written,
    chunks,
    message_row,
    storable_message,
    woken_in_batches,
)

log = structlog.get_logger("gateway.queue.postgres")
CHANNEL = "smtp_gateway_queue"
SQL = FOR_POSTGRES
# txid_current() / txid_status() (PostgreSQL 10 and later; pg_current_xact_id() is 13's name for the same):
# the inserting transaction's 64-bit id, and after a lost COMMIT answer what became of it. A transaction in
# the snapshot's running list is not visible yet, even once its commit log says committed (a COMMIT waiting
# for a synchronous standby): `visible` tells that case from one whose rows every new statement sees.
RETURNING_XID = " RETURNING txid_current() AS xid"
COMMIT_STATE = "SELECT txid_status(%s) AS status, txid_visible_in_snapshot(%s, txid_current_snapshot()) AS visible"
# Seconds without a pooled connection before the database itself is asked whether it is there (a busy pool
# goes on waiting, up to POOL_WAIT in all; a database that does not answer opens the circuit).
FAIL_FAST = 1.0
POOL_WAIT = 10.0
PROBE_EVERY = 1.0  # while the database is known down, how often the one probe asks it


# Server-side bounds of every statement on the queue's pooled connections, seconds. A wait for a lock: SQLite's
# busy timeout (gateway/queue/sqlite.py, 10 s), so both backends answer a locked queue with 452 in about the
# same time. A statement in all: longer, so that a lock wait is reported as one (its clock starts with the
# statement's, a little before the lock wait's: with equal bounds statement_timeout would fire first).
LOCK_TIMEOUT = 10.0
STATEMENT_TIMEOUT = 15.0
# Whole-table reads (operators' counts and listings) and large bodies streamed (a claim, a submission) may run
# longer on a large queue: their own statement bound (locks are still waited for LOCK_TIMEOUT). The schema
# migration has none (a DDL statement must not be cut, and it waits for the instances' running transactions).
LONG_READ_TIMEOUT = 300.0


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


# Expired idempotency keys are deleted by the instances' own claim_key transactions (the path every key is
# made on), at most KEY_SWEEP_BATCH rows at a time, once per KEY_SWEEP_EVERY seconds of the database's clock per
# instance, and at each claim while a batch comes back full (a backlog: the table of a queue that swept none).
KEY_SWEEP_EVERY = 60.0
KEY_SWEEP_BATCH = 1000
# The batch: rows another instance's sweep (or a claim of that key) holds are skipped, not waited for, so
# instances sweeping at once never contend; by the expires index.
_KEY_SWEEP = (
    "DELETE FROM idempotency WHERE (account, key) IN (SELECT account, key FROM idempotency WHERE expires<%s"
    " LIMIT %s FOR UPDATE SKIP LOCKED)"
)


# Seconds a first connection may take before the queue is called unreachable (libpq's minimum is 2).
CONNECT_TIMEOUT = 2


async def probe(url: str, password: str | None = None) -> None:
    """One connection, at once: raises QueueUnreachable("cannot connect to HOST:PORT: reason") when the
    server cannot be reached, instead of the pool's retries for seconds on end."""
    kwargs: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT}
    if password:
        kwargs["password"] = password
    try:
        conn = await psycopg.AsyncConnection.connect(url, **kwargs)
    except (psycopg.OperationalError, OSError) as exc:
        raise QueueUnreachable(f"cannot connect to {server_of(url)}: {_why(exc)}") from exc
    await conn.close()


def server_of(url: str) -> str:
    """HOST:PORT the URL points at ("the local socket" when it names no host)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return redacted(url)
    host = str(info.get("host") or "") or "the local socket"
    port = str(info.get("port") or "5432")
    return f"[{host}]:{port}" if ":" in host and not host.startswith("/") else f"{host}:{port}"


def _why(exc: BaseException) -> str:
    """libpq's reason without its preamble: 'connection failed: connection to server at "h", port 1 failed:
    Connection refused' -> 'Connection refused'."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    reason = first.rpartition(" failed: ")[2] if " failed: " in first else first
    return reason.removeprefix("FATAL:").strip()


def redacted(url: str) -> str:
    """The URL as it may be logged (settings refuse a password in it; belt and braces): the user part found as
    the settings find it, never at an '@' of the query (`?application_name=a@b`), a %3A tail cut as a ':' one."""
    return queueurl.shown(url)


# The messages table's columns that hold a time compared there: on the database's clock there, on the caller's
# outside. Not `created`: the accepting instance's label of the message, stored and read back as it wrote it (the
# ledger keys the message's rows by it; a claiming instance or an operator's host moving it onto its own clock
# handed the ledger another acceptance time: gateway/queue/store.py).
_TIME_COLUMNS = ("expires", "next_attempt", "lease_until", "dead_at")


def _on_caller_clock(row: DictRow, shift: float) -> dict[str, Any]:
    """A messages row read back, its times moved from the database's clock to the caller's (`shift`: the
    database's minus this host's, PostgresQueue._shift)."""
    out = dict(row)
    for column in _TIME_COLUMNS:
        if out.get(column) is not None:
            out[column] -= shift
    return out


class PostgresQueue:
    def __init__(
        self,
        url: str,
        password: str | None = None,
        *,
        max_connections: int = 10,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.url = redacted(url)
        # This host's clock against the database's (`clock`: the host's, tests give a skewed one; None: time.time).
        self._clock = DbClock(clock)
        self._conninfo = url
        self._kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        if password:
            self._kwargs["password"] = password
        self._pool = AsyncConnectionPool(
            url,
            connection_class=psycopg.AsyncConnection[DictRow],
            kwargs=self._kwargs,
            min_size=1,
            max_size=max_connections,
            open=False,
            name="smtp-gateway-queue",
            configure=self._configure,
        )
        self._pool_open = False
        self._opened = False  # the pool is open and the schema migrated
        self._found_version = 0
        self.health = QueueHealth(shared=True)  # one database for the fleet: its outage is everyone's
        self._down: str | None = None  # why the database is known down (the circuit is open)
        self._outage = Episode()  # callers refused while it is down
        self._exhausted = Episode()  # callers refused a pooled connection while the database answered
        self._slow = Episode()  # statements the server cancelled (lock_timeout, statement_timeout)
        self._probe: asyncio.Task[None] | None = None
        self._next_sweep = 0.0
        self._next_key_sweep = 0.0  # the database's clock, as _next_sweep

    async def _shift(self, conn: psycopg.AsyncConnection[DictRow], fresh: bool = False) -> float:
        """The database's clock minus this host's, read in the caller's transaction unless the last reading
        serves (gateway/core/dbclock.py): added to a caller's time it is on the database's clock, subtracted
        to go back."""

        async def read() -> float:
            row = await (await conn.execute(SQL.clock)).fetchone()
            assert row is not None
            return float(row["now"])

        return await self._clock.shift(read, fresh)

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[DictRow]) -> None:
        """Each new pooled connection's session bounds (SET, not the URL's `options`, which they would replace)."""
        await conn.execute(f"SET lock_timeout = {_ms(LOCK_TIMEOUT)}")
        await conn.execute(f"SET statement_timeout = {_ms(STATEMENT_TIMEOUT)}")

    @contextlib.asynccontextmanager
    async def _tx(self, statement_timeout: float | None = None) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
        """A pooled connection inside one transaction; backend failures become SpoolUnavailable
        (`statement_timeout`: this transaction's own bound, seconds; 0: none)."""
        if not self._opened:
            await self.open()
        conn = await self._connection()
        committing = False  # the body is done: an error now is the COMMIT's
        try:
            async with conn.transaction():
                if statement_timeout is not None:
                    await conn.execute(f"SET LOCAL statement_timeout = {_ms(statement_timeout)}")
                yield conn
                committing = True
            if self._slow.active:
                self._served()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            # The server cancelled the statement at its bound and rolled the transaction back: nothing written.
            raise self._busy(exc, STATEMENT_TIMEOUT if statement_timeout is None else statement_timeout) from exc
        except psycopg.DataError as exc:
            # The values written, not the database (storable() keeps NULs out of text): retrying cannot help.
            raise QueueDataRefused(f"queue {self.url}: {type(exc).__name__}: {exc}") from exc
        except (psycopg.Error, OSError) as exc:
            if conn.broken:  # the connection went away under the transaction: so did the database
                down = self._unreachable(exc)
                if committing:
                    # The COMMIT went and no answer came back: the server may have committed. An error the
                    # server answered to the COMMIT (a connection still whole) is a definite rollback.
                    raise CommitUnknown(f"{down.reason}; the COMMIT's answer was lost") from exc
                raise down from exc
            raise SpoolUnavailable(f"queue {self.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            await self._pool.putconn(conn)

    async def _connection(self) -> psycopg.AsyncConnection[DictRow]:
        """A pooled connection, or SpoolUnavailable at once while the database is known down; within about a
        second when it has just gone (a pool that waited that long asks the database itself)."""
        if self._down is not None:
            raise self._unreachable(None)
        try:
            try:
                conn = await self._pool.getconn(timeout=FAIL_FAST)
            except PoolTimeout:
                if not await self._reachable():
                    raise
                try:
                    conn = await self._pool.getconn(timeout=POOL_WAIT - FAIL_FAST)
                except PoolTimeout as exc:
                    # The database answered a new connection: every pooled one is in use (slow statements,
                    # a lock they wait for), which is busy, not down; the circuit stays closed.
                    raise self._pool_exhausted(exc) from exc
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            raise self._unreachable(exc) from exc
        if self._exhausted.active:
            over = self._exhausted.ended()
            if over is not None:
                log.info("queue_pool_available", queue=self.url, exhausted_for=over.lasted, refused=over.seen)
        return conn

    def _pool_exhausted(self, exc: PoolTimeout) -> PoolExhausted:
        """No pooled connection within POOL_WAIT, the database answering: 452, logged once per episode."""
        size = self._pool.max_size
        reason = f"queue {self.url}: busy: all {size} pooled connections in use for {POOL_WAIT:g} s"
        if self._exhausted.occurred():
            log.warning("queue_pool_exhausted", queue=self.url, connections=size, waited=POOL_WAIT, error=str(exc))
        return PoolExhausted(reason)

    async def _reachable(self) -> bool:
        """Whether the database answers a new connection now (past the pool, its waits and its backoff)."""
        try:
            async with asyncio.timeout(FAIL_FAST * 2):
                conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
                async with conn:
                    await conn.execute("SELECT 1")
        except (psycopg.Error, OSError, TimeoutError):
            return False
        return True

    def _busy(self, exc: psycopg.Error, statement_timeout: float) -> QueueBusy:
        """A statement cancelled at the queue's bound (a lock held by another session, a slow statement): 452;
        logged once per episode, with the server's words (which lock, which bound: the transaction's own)."""
        bound = "lock_timeout" if isinstance(exc, psycopg.errors.LockNotAvailable) else "statement_timeout"
        seconds = LOCK_TIMEOUT if bound == "lock_timeout" else statement_timeout
        reason = f"queue {self.url}: busy: {bound} ({seconds:g} s) reached: {str(exc).strip().splitlines()[0]}"
        if self._slow.occurred():
            log.warning("queue_database_slow", queue=self.url, bound=bound, seconds=seconds, error=reason)
        return QueueBusy(reason)

    def _served(self) -> None:
        """A transaction committed after statements were cancelled: the slow episode is over."""
        over = self._slow.ended()
        if over is not None:
            log.info("queue_database_served", queue=self.url, slow_for=over.lasted, cancelled=over.seen)

    def _unreachable(self, exc: BaseException | None) -> QueueUnreachable:
        """The database is gone (`exc`: what said so; None: known already): the circuit open, the error."""
        if exc is not None:
            self._trip(f"{type(exc).__name__}: {exc}")
        else:
            self._outage.occurred()
        return QueueUnreachable(f"queue {self.url}: database unreachable ({self._down}); probing it")

    def _trip(self, reason: str) -> None:
        """Open the circuit (once per outage) and start the one probe."""
        if self._down is None:
            self._down = reason
            self._outage.occurred()
            log.error("queue_database_unreachable", queue=self.url, error=reason, probe_every=PROBE_EVERY)
            self._probe = asyncio.get_running_loop().create_task(self._wait_for_database(), name="queue-probe")

    async def _wait_for_database(self) -> None:
        while True:  # a probe, not a wait for an event: nothing else tells when the database is back
            if await self._reachable():
                break
            await idle(PROBE_EVERY)
        if self._pool_open:
            await self._pool.check()  # the connections the outage broke are replaced now, not at their next use
        over = self._outage.ended()
        self._down = None
        self.health.record("insert", None)  # the failures to store were the outage
        log.info(
            "queue_database_back",
            queue=self.url,
            down_for=over.lasted if over else 0.0,
            refused=over.seen - 1 if over else 0,
        )

    async def open(self) -> None:
        if self._opened:
            return
        if not self._pool_open:
            if self._down is not None:
                raise self._unreachable(None)
            try:
                # Unreachable: said at once, with the server's address, not after the pool's retries.
                await probe(self._conninfo, self._kwargs.get("password"))
            except QueueUnreachable as exc:
                self._trip(exc.reason)
                raise
            await self._pool.open(wait=False)  # it connects in the background; _connection() waits for it
            self._pool_open = True
        conn = await self._connection()
        try:
            self._found_version = await self._migrate(conn)
        except postgres_schema.SchemaTooNew as exc:
            reason = f"queue {self.url}: {exc}"
            self.health.newer_version(reason)
            raise QueueTooNew(reason) from exc
        except (psycopg.Error, OSError) as exc:
            if conn.broken:
                raise self._unreachable(exc) from exc
            raise SpoolUnavailable(f"queue {self.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            await self._pool.putconn(conn)
        self._opened = True

    async def _migrate(self, conn: psycopg.AsyncConnection[DictRow]) -> int:
        async with conn.transaction():
            # No bound: a migration waits for the instances' running transactions and must not be cut.
            await conn.execute("SET LOCAL lock_timeout = 0")
            await conn.execute("SET LOCAL statement_timeout = 0")
            applied = await postgres_schema.migrate(conn)
        for number in applied:
            log.info("queue_migrated", queue=self.url, version=number)
        return applied[0] - 1 if applied else postgres_schema.LATEST

    async def migrate(self) -> tuple[int, int]:
        await self.open()
        return self._found_version, postgres_schema.LATEST

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        self._opened = False
        if self._pool_open:
            self._pool_open = False
            await self._pool.close()

    # -- the server's side ---------------------------------------------------------------------------

    async def insert(self, m: NewMessage) -> int:
        try:
            token = await self._insert(m)
        except SpoolUnavailable as exc:
            # Every pooled connection of this instance in use is its own overload (another instance can store
            # the message: unready); the database down or slow is every instance's (degraded). Told by this
            # failure itself: an exhaustion episode is still open while the database goes away (no connection
            # is had to end it), and that outage is every instance's.
            self.health.record("insert", exc.reason, local=isinstance(exc, PoolExhausted))
            raise
        self.health.record("insert", None)
        return token

    async def _insert(self, m: NewMessage) -> int:
        m = storable_message(m)
        xid: int | None = None
        try:
            async with self._tx() as conn:
                stored = message_row(m, await self._shift(conn))
                # The transaction's id in the INSERT's own answer (no round trip): after a lost COMMIT answer it
                # tells a commit still finishing, its row invisible to every other session, from none.
                row = await (await conn.execute(SQL.insert_message + RETURNING_XID, stored.values)).fetchone()
                assert row is not None
                xid = int(row["xid"])
                await self._insert_rest(conn, m)
                if stored.state == "queued":
                    await self._notify(conn, m.account)
        except CommitUnknown as exc:
            exc.xid = xid
            raise
        return stored.token

    @staticmethod
    async def _insert_rest(conn: psycopg.AsyncConnection[DictRow], m: NewMessage) -> None:
        """The new message's calls and body."""
        async with conn.cursor() as cur:
            await cur.executemany(
                SQL.insert_call,
                [
                    (m.id, n, c.key, c.recipients, c.state, c.upstream_id, c.error, c.lost)
                    for n, c in enumerate(m.decision.calls.values())
                ],
            )
            for row in chunks(m.id, m.blobs):  # one chunk in memory at a time
                await cur.execute(SQL.insert_blob, row)

    async def commit_state(self, xid: int) -> str | None:
        try:
            async with self._tx() as conn:
                row = await (await conn.execute(COMMIT_STATE, (xid, xid))).fetchone()
        except QueueDataRefused as exc:
            if not isinstance(exc.__cause__, psycopg.errors.InvalidParameterValue):
                raise
            # "transaction ID N is in the future" (SQLSTATE 22023): the server answering now has not handed
            # that id out yet (a standby promoted before the insert's WAL reached it). It does not know the
            # transaction, as for one too old: the row decides.
            return None
        assert row is not None
        status = row["status"]
        if status == "committed" and not row["visible"]:
            # Marked committed in the commit log, not yet ended (PostgreSQL marks it, then waits for the
            # synchronous standby, then makes it visible): its rows are not seen yet.
            return "in progress"
        return None if status is None else str(status)

    @staticmethod
    async def _notify(conn: psycopg.AsyncConnection[DictRow], account: str) -> None:
        # PostgreSQL only: the other instances' LISTEN (SQLite's processes poll).
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, account))

    async def claim(self, owner: str, account: str, now: float, limit: int, lease: float) -> list[Claimed]:
        async with self._tx(LONG_READ_TIMEOUT) as conn:
            shift = await self._shift(conn)
            now += shift
            rows = await (await conn.execute(SQL.due, (account, now, limit))).fetchall()
            if len(rows) < limit:
                rows += await (await conn.execute(SQL.reapable, (account, now, limit - len(rows)))).fetchall()
            if not rows:
                return []
            reaped = {r["id"]: r["state"] == "inflight" for r in rows}
            ids = POSTGRES.items(list(reaped))
            updated = await (await conn.execute(SQL.claim(len(reaped)), (owner, now + lease, *ids))).fetchall()
            rows_read = ClaimedRows(account, reaped, [_on_caller_clock(r, shift) for r in updated])
            for c in await (await conn.execute(SQL.claimed_calls(len(reaped)), ids)).fetchall():
                rows_read.call(c)
            async with conn.cursor() as cur:
                async for row in cur.stream(SQL.claimed_blobs(len(reaped)), ids):  # streamed row by row
                    rows_read.blob_chunk(row)
        return rows_read.claimed()

    async def mark_sending(self, msg_id: str, token: int, keys: Sequence[str], lease_past: float | None = None) -> bool:
        async with self._tx() as conn:
            if lease_past is None:
                held = await self._holds(conn, msg_id, token)
            else:
                lease_past += await self._shift(conn)
                held = await (await conn.execute(SQL.holds_lease, (msg_id, token, lease_past))).fetchone() is not None
            if not held:
                return False
            async with conn.cursor() as cur:
                await cur.executemany(SQL.mark_sending, [(msg_id, key) for key in keys])
        return True

    @staticmethod
    async def _holds(conn: psycopg.AsyncConnection[DictRow], msg_id: str, token: int) -> bool:
        return await (await conn.execute(SQL.holds, (msg_id, token))).fetchone() is not None

    async def token_of(self, msg_id: str) -> int | None:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.token_of, (msg_id,))).fetchone()
        return None if row is None else int(row["token"])

    async def withdraw(self, msg_id: str, token: int) -> str:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.token_of, (msg_id,))).fetchone()  # locked: no claim in between
            if row is None:
                return "absent"
            if int(row["token"]) != token:
                return "claimed"
            await conn.execute(SQL.delete_message, (msg_id,))
        return "withdrawn"

    async def settle(self, msg_id: str, token: int, d: Decision, now: float) -> bool:
        d = storable_decision(d)
        async with self._tx() as conn:
            if not await self._holds(conn, msg_id, token):
                return False
            if d.verdict == "delivered":
                await conn.execute(SQL.delete_message, (msg_id,))
                return True
            dead = d.verdict in ("dead", "refused")
            shift = await self._shift(conn)
            row = await (
                await conn.execute(
                    SQL.settle,
                    (
                        "dead" if dead else "queued",
                        d.attempts,
                        d.next_attempt + shift,
                        d.last_error,
                        d.dead_reason if dead else None,
                        now + shift if dead else None,
                        d.internal_errors,
                        msg_id,
                    ),
                )
            ).fetchone()
            async with conn.cursor() as cur:
                await cur.executemany(
                    SQL.settle_call,
                    [(c.state, c.upstream_id, c.error, c.lost, msg_id, c.key) for c in d.calls.values()],
                )
            if not dead and row is not None:
                await self._notify(conn, row["account"])
        return True

    async def release(self, msg_id: str, token: int, now: float) -> bool:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.release, (now + await self._shift(conn), msg_id, token))).fetchone()
            if row is not None:
                await self._notify(conn, row["account"])
        return row is not None

    async def renew(self, owner: str, lease_until: float) -> int:
        async with self._tx() as conn:
            cur = await conn.execute(SQL.lease, (lease_until + await self._shift(conn), owner))
            return cur.rowcount

    async def expire_owners(self, owners: Sequence[str], now: float) -> int:
        async with self._tx() as conn:
            now += await self._shift(conn)
            expired = 0
            for owner in owners:
                expired += (await conn.execute(SQL.expire, (now - 1, owner, now))).rowcount
            return expired

    async def owners(self) -> list[str]:
        async with self._tx() as conn:
            rows = await (await conn.execute(SQL.owners)).fetchall()
        return [r["owner"] for r in rows]

    async def next_due(self, accounts: Sequence[str]) -> float | None:
        async with self._tx() as conn:
            shift = await self._shift(conn)
            row = await (await conn.execute(SQL.next_due(len(accounts)), 2 * POSTGRES.items(accounts))).fetchone()
        return None if row is None or row["t"] is None else float(row["t"]) - shift

    async def wake(self, account: str, now: float, limit: int | None = None) -> int:
        if limit is None:
            return await woken_in_batches(lambda batch: self.wake(account, now, batch))
        async with self._tx() as conn:
            now += await self._shift(conn)
            cur = await conn.execute(SQL.wake, (now, account, now, limit))
            if cur.rowcount:
                await self._notify(conn, account)
            return cur.rowcount

    async def listen(self, wake: Callable[[str], None]) -> None:
        """Call `wake(account)` whenever another instance made a message due; reconnects until cancelled."""
        delay = 1.0
        failing = Episode()
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 1.0
                    if (over := failing.ended()) is not None:
                        log.info("queue_listen_restored", queue=self.url, failed_for=over.lasted, attempts=over.seen)
                    async for notice in conn.notifies():
                        wake(notice.payload)
            except (psycopg.Error, OSError) as exc:
                if failing.occurred():  # once per outage; the workers poll meanwhile
                    log.warning("queue_listen_failed", queue=self.url, error=f"{type(exc).__name__}: {exc}")
                await idle(delay)
                delay = min(delay * 2, 30.0)

    # -- shared rate limits ---------------------------------------------------------------------------

    async def rate_slots(
        self, account: str, count: int, interval: float, burst: int, recovery: float = 30.0
    ) -> list[float]:
        """Take the account's next `count` call slots (one row per account, the database's clock); returns the
        seconds to wait for each."""
        async with self._tx() as conn:
            tat, slow_until, now = await self._rate_row(conn, account)
            slowed = tokenbucket.slowed(interval, now, slow_until, recovery)
            slots = tokenbucket.take_many(tat, now, slowed, burst, count)
            await conn.execute(SQL.rate_write, (slots.tat, slow_until, account))
        return list(slots.waits)

    async def rate_pause(self, account: str, seconds: float, slow_for: float) -> None:
        """The upstream said 429: no slot for `seconds`, and a slower rate for `slow_for` seconds."""
        async with self._tx() as conn:
            tat, _, now = await self._rate_row(conn, account)
            await conn.execute(SQL.rate_write, (tokenbucket.paused(tat, now, seconds), now + slow_for, account))

    # -- shared quota counts ------------------------------------------------------------------------------

    async def quota_take(self, login: str, windows: Sequence[Window], size: int) -> tuple[Verdict, dict[str, Counts]]:
        async with self._tx() as conn:
            counts = await self._quota_rows(conn, login, windows)
            verdict = quota.decide(windows, counts, 1, size)
            if verdict.ok:
                for window in windows:
                    await conn.execute(SQL.quota_add, (1, size, login, window.key))
                    counts[window.key] = quota.added(counts[window.key], 1, size)
        return verdict, counts

    async def quota_return(self, login: str, windows: Sequence[Window], size: int) -> None:
        async with self._tx() as conn:
            for window in windows:
                await conn.execute(SQL.quota_add, (-1, -size, login, window.key))

    async def quota_counts(self, login: str, windows: Sequence[Window]) -> dict[str, Counts]:
        async with self._tx() as conn:
            return await self._quota_rows(conn, login, windows)

    async def _quota_rows(
        self, conn: psycopg.AsyncConnection[DictRow], login: str, windows: Sequence[Window]
    ) -> dict[str, Counts]:
        """The windows' counts, their rows made on first use and locked until commit (the login's windows
        that ended over an hour ago by the database's clock dropped: never another instance's current one).
        A window's end is stored moved onto the database's clock, which the clean-up compares it with: on
        this host's, an instance over an hour behind the database had its current window dropped at each
        take, its count starting from 0 every time. (The window is still this host's clock hour or day.)"""
        await conn.execute(SQL.quota_expired, (login, quota.KEEP_AFTER_END))
        shift = await self._shift(conn)
        counts = {}
        for window in windows:
            await conn.execute(SQL.quota_row, (login, window.key, window.end + shift))
            row = await (await conn.execute(SQL.quota_read, (login, window.key))).fetchone()
            assert row is not None
            counts[window.key] = Counts(int(row["messages"]), int(row["bytes"]))
        return counts

    @staticmethod
    async def _rate_row(conn: psycopg.AsyncConnection[DictRow], account: str) -> tuple[float, float, float]:
        """(tat, slow_until, now) of the account's bucket, made on first use and locked until commit."""
        await conn.execute(SQL.rate_row, (account,))
        row = await (await conn.execute(SQL.rate_read, (account,))).fetchone()
        assert row is not None
        return float(row["tat"]), float(row["slow_until"]), float(row["now"])

    # -- AUTH counts ----------------------------------------------------------------------------------

    async def auth_begin(self, client: str, rules: Rules) -> tuple[Record, authcount.Verdict, float]:
        record, verdict, now = await self._auth(client, rules.window, auth_begin_change(rules))
        return record, verdict, now

    async def auth_end(self, client: str, rules: Rules, failed: bool, in_flight: bool) -> tuple[Record, bool, float]:
        record, locked, now = await self._auth(client, rules.window, auth_end_change(rules, failed, in_flight))
        return record, bool(locked), now

    async def auth_lift(self, client: str, rules: Rules) -> bool:
        return bool((await self._auth(client, rules.window, auth_lift_change))[1])

    async def auth_peek(self, client: str) -> tuple[Record, float] | None:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.auth_peek, (client,))).fetchone()
        return None if row is None else auth_read(row)

    async def auth_held(
        self, limit: int, *, prefix: str = "", besides: Sequence[str] = ()
    ) -> list[tuple[str, Record, float]]:
        held, parameters = SQL.auth_held_of(len(besides)), auth_held_parameters(limit, prefix, besides)
        async with self._tx() as conn:
            rows = await (await conn.execute(held, parameters)).fetchall()
        return [(str(row["client"]), *auth_read(row)) for row in rows]

    async def _auth(self, client: str, window: float, change: AuthChange) -> tuple[Record, Any, float]:
        """`change` applied to the client's row, locked until commit, with the database's clock (the one clock
        of every instance)."""
        async with self._tx() as conn:
            await conn.execute(SQL.auth_row, (client,))
            record, now = auth_read(await (await conn.execute(SQL.auth_read, (client,))).fetchone())
            record, result = change(record, now)
            if record.clean():
                await conn.execute(SQL.auth_forget, (client,))
            else:
                await conn.execute(SQL.auth_write, auth_written(client, record))
            if now >= self._next_sweep:
                self._next_sweep = now + AUTH_SWEEP_EVERY
                await conn.execute(SQL.auth_sweep, (now - window, now, now))
                await conn.execute(SQL.signout_sweep, (SIGNOUT_KEPT_PAST,))
        return record, result, now

    # -- console sign-outs ----------------------------------------------------------------------------

    async def session_revoke(self, sid: str, until: float) -> None:
        async with self._tx() as conn:
            # Stored on the database's clock, which the sweep compares it with: on this host's, a console
            # instance more than SIGNOUT_KEPT_PAST behind the database had its own sign-out swept while its
            # clock still held the session open, and took the cookie again.
            until += await self._shift(conn)
            await conn.execute(SQL.signout_sweep, (SIGNOUT_KEPT_PAST,))
            await conn.execute(SQL.signout_write, (sid, until))

    async def session_revoked(self, sid: str) -> bool:
        async with self._tx() as conn:
            return await (await conn.execute(SQL.signout_read, (sid,))).fetchone() is not None

    # -- idempotency keys -----------------------------------------------------------------------------

    async def claim_key(
        self, account: str, key: str, msg_id: str, now: float, window: float, stale: float, digest: str | None = None
    ) -> KeyHit | KeyTakenOver | None:
        async with self._tx() as conn:
            now += await self._shift(conn)  # a key's age decides a takeover: one clock for every instance
            claimed = await self._claim_key(conn, account, key, msg_id, now, window, stale, digest)
            # Last: the sweep never waits (SKIP LOCKED) and nothing waits after it, so two instances' claims
            # cannot each hold a row the other's own key waits for.
            await self._sweep_keys(conn, now)
        return claimed

    @staticmethod
    async def _claim_key(
        conn: psycopg.AsyncConnection[DictRow],
        account: str,
        key: str,
        msg_id: str,
        now: float,
        window: float,
        stale: float,
        digest: str | None,
    ) -> KeyHit | KeyTakenOver | None:
        # This key's expired row at once (the others are swept in batches: a table-wide delete in every claim
        # would have instances contend; SQLite, one writer at a time, deletes every expired key).
        await conn.execute("DELETE FROM idempotency WHERE account=%s AND key=%s AND expires<%s", (account, key, now))
        # Insert first: two instances claiming one new key at once cannot both get it.
        inserted = await (
            await conn.execute(SQL.key_insert, (account, key, msg_id, now, now + window, digest))
        ).fetchone()
        if inserted is not None:
            return None
        row = await (await conn.execute(SQL.key_row, (account, key))).fetchone()
        if row is None or row["reply_id"] is not None or row["created"] >= now - stale:
            return None if row is None else KeyHit(row["msg_id"], row["reply_id"], row["digest"])
        if await (await conn.execute(SQL.stored, (row["msg_id"],))).fetchone() is not None:
            await conn.execute(SQL.key_answered, (account, key))
            return KeyHit(row["msg_id"], row["msg_id"], row["digest"])
        # A stale claim whose message was never stored: this one takes the key over, in place.
        await conn.execute(SQL.key_take_over, (msg_id, now, now + window, digest, account, key))
        return KeyTakenOver(row["msg_id"])

    async def _sweep_keys(self, conn: psycopg.AsyncConnection[DictRow], now: float) -> None:
        """One batch of expired keys deleted (`now`: the database's clock), when this instance's turn has come:
        the keys of resends never made would otherwise stay for ever, one row per keyed message."""
        if now < self._next_key_sweep:
            return
        swept = (await conn.execute(_KEY_SWEEP, (now, KEY_SWEEP_BATCH))).rowcount
        # A full batch: more may be left, swept at the next claim; else not before KEY_SWEEP_EVERY.
        self._next_key_sweep = now if swept >= KEY_SWEEP_BATCH else now + KEY_SWEEP_EVERY

    async def finish_key(self, account: str, key: str, msg_id: str, reply_id: str | None) -> None:
        async with self._tx() as conn:
            if reply_id is None:
                await conn.execute(SQL.key_drop, (account, key, msg_id))
            else:
                await conn.execute(SQL.key_reply, (reply_id, account, key, msg_id))

    async def record_key(
        self, account: str, key: str, msg_id: str, reply_id: str, created: float, expires: float, digest: str | None
    ) -> bool:
        async with self._tx() as conn:
            shift = await self._shift(conn)
            values = (account, key, msg_id, reply_id, created + shift, expires + shift, digest)
            row = await (await conn.execute(SQL.key_late, values)).fetchone()
        return row is not None

    # -- operators ------------------------------------------------------------------------------------

    async def counts(self, now: float) -> dict[str, dict[str, Any]]:
        # `created` is on the accepting instances' clocks (never moved: _TIME_COLUMNS): the ages are taken on the
        # caller's, unshifted (off by no more than the hosts' skew, which queue_clock_skew reports).
        async with self._tx(LONG_READ_TIMEOUT) as conn:
            rows = await (await conn.execute(SQL.counts)).fetchall()
        return {r["state"]: {"count": r["n"], "oldest_age": now - r["oldest"]} for r in rows}

    async def clock_offset(self) -> float | None:
        """The database's clock read between two of this host's: the offset from their midpoint (the round trip
        is milliseconds, against a bound of seconds)."""
        async with self._tx() as conn:
            return -await self._shift(conn, fresh=True)

    async def waiting(self) -> dict[str, int]:
        async with self._tx(LONG_READ_TIMEOUT) as conn:
            rows = await (await conn.execute(SQL.waiting)).fetchall()
        return {r["account"]: r["n"] for r in rows}

    async def list(self, states: Sequence[str], limit: int = 1000) -> list[dict[str, Any]]:
        async with self._tx(LONG_READ_TIMEOUT) as conn:
            shift = await self._shift(conn)
            rows = await (await conn.execute(SQL.listing(len(states)), (*POSTGRES.items(states), limit))).fetchall()
        return [_on_caller_clock(r, shift) for r in rows]

    async def show(self, msg_id: str) -> dict[str, Any] | None:
        async with self._tx() as conn:
            shift = await self._shift(conn)
            row = await (await conn.execute(SQL.show, (msg_id,))).fetchone()
            if row is None:
                return None
            calls = await (await conn.execute(SQL.calls, (msg_id,))).fetchall()
        out = {k: v for k, v in _on_caller_clock(row, shift).items() if k not in UNSHOWN}
        out["calls"] = [dict(c) for c in calls]
        return out

    async def submission(self, msg_id: str) -> bytes | None:
        async with self._tx(LONG_READ_TIMEOUT) as conn:
            row = await (await conn.execute(SQL.submission, (msg_id,))).fetchone()
        return None if row is None else bytes(row["submission"])

    async def retry_now(self, msg_id: str, now: float) -> bool:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.retry_now, (now + await self._shift(conn), msg_id))).fetchone()
            if row is not None:
                await self._notify(conn, row["account"])
        return row is not None

    async def delete(self, msg_id: str) -> dict[str, Any] | None:
        async with self._tx() as conn:
            # The row locked first: a claim or settle of it waits for this transaction, and one that
            # committed before the lock is seen by the calls read next (READ COMMITTED reads anew).
            row = await (await conn.execute(SQL.delete_lock, (msg_id,))).fetchone()
            if row is None:
                return None
            shift = await self._shift(conn)
            calls = await (await conn.execute(SQL.calls, (msg_id,))).fetchall()
            await conn.execute(SQL.delete, (msg_id,))
        out = _on_caller_clock(row, shift)
        out["calls"] = [dict(c) for c in calls]
        return out

    async def requeue(self, msg_id: str, now: float, max_lifetime: float) -> bool:
        async with self._tx() as conn:
            now += await self._shift(conn)
            row = await (await conn.execute(SQL.requeue, (now, now + max_lifetime, msg_id))).fetchone()
            if row is not None:
                await conn.execute(SQL.requeue_calls, (msg_id,))
                await self._notify(conn, row["account"])
        return row is not None
