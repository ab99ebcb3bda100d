"""The SQLite queue backend: one file shared by the worker processes of one machine.

Every statement of a process runs on its one dedicated thread (never on the event loop). WAL lets
readers (the queue CLI) and one writer work at once; `BEGIN IMMEDIATE` serialises writers across
processes; `synchronous=FULL` makes each commit durable (fsync'd) before it returns, so a 250 is only
sent for a message on disk. Any SQLite or OS error becomes SpoolUnavailable (452 4.3.1 to a client).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import structlog

from gateway.core import authcount
from gateway.core.authcount import Record, Rules
from gateway.core.errors import QueueTooNew, SpoolUnavailable
from gateway.core.quota import Counts, Verdict, Window
from gateway.core.records import Decision
from gateway.core.storable import storable_decision
from gateway.queue import sqlite_schema, wallstep
from gateway.queue.health import QueueHealth
from gateway.queue.sql import FOR_SQLITE, SQLITE, UNSHOWN
from gateway.queue.sqlite_side import RateFile, Reserve, disk_full
from gateway.queue.sqlite_wal import use_wal
from gateway.queue.store import (
    Claimed,
    ClaimedRows,
    KeyHit,
    KeyTakenOver,
    NewMessage,
    auth_begin_change,
    auth_end_change,
    auth_lift_change,
    chunks,
    message_row,
    storable_message,
    woken_in_batches,
)
from gateway.queue.wallstep import WallStep

log = structlog.get_logger("gateway.queue.sqlite")
T = TypeVar("T")
SQL = FOR_SQLITE
WAL_AT_LEAST = 64 * 1024  # bytes: the smallest WAL checkpointed early for a small reserve
# While the disk reserve is in use, how often the queue's own operations look for room again (seconds).
RECOVERY_EVERY = 1.0
# A queue file up to this size is VACUUMed once to turn auto_vacuum on (it takes about a second per 100 MB,
# and as much free disk as the file); a larger one keeps reusing its free pages until it is small again.
VACUUM_AT_MOST = 64 * 1024 * 1024


class SqliteQueue:
    def __init__(
        self,
        path: Path,
        *,
        max_page_count: int | None = None,
        reserve: int = 0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        # The host's wall clock stepped (leases are on it): renew ours, reap nobody's for a while (wallstep.py;
        # `wall`, `monotonic`: the host's clocks, tests give fakes).
        self._wall = WallStep(wall, monotonic)
        self.url = f"sqlite:///{path}"
        self._max_page_count = max_page_count
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-db")
        self._db: sqlite3.Connection | None = None
        self._found_version = 0  # the schema version this process found (migrated on connecting)
        self._closed = False
        self._rate = RateFile(path.with_name(path.name + "-ratelimit"))
        self.health = QueueHealth()
        self._reserve = Reserve(path.with_name(path.name + "-reserve"), reserve, self.health)
        self._next_recovery = 0.0

    # -- plumbing ------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(self._call, fn, *args))
        except sqlite_schema.SchemaTooNew as exc:
            reason = f"queue {self.path}: {exc}"
            self.health.newer_version(reason)
            raise QueueTooNew(reason) from exc
        except (sqlite3.Error, OSError) as exc:
            raise SpoolUnavailable(f"queue {self.path}: {type(exc).__name__}: {exc}") from exc

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._db is None:
            self._connect()
        try:
            result = fn(*args)
        except sqlite3.OperationalError as exc:
            # The disk is full: give the reserved space back (once) so the messages already stored can still
            # be claimed, settled and deleted; new messages are refused (452) until it is restored. A WAL
            # is only reused after a checkpoint, which must first grow the database file: checkpoint and
            # truncate the WAL now, then try again.
            if fn == self._insert or not disk_full(exc) or not (self._reserve.release() or self._reserve.released):
                raise
            with contextlib.suppress(sqlite3.OperationalError):  # a busy reader: the retry may still fit
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            result = fn(*args)
        if self._reserve.released and time.monotonic() >= self._next_recovery:
            # Every queue operation (the retry worker's polls too: a gateway that is not ready gets no new
            # mail to try with) looks whether the drained queue left room again, at most once a second.
            self._next_recovery = time.monotonic() + RECOVERY_EVERY
            self._recover()
        return result

    def _recover(self) -> bool:
        """While the reserve is in use: give back to the file system what the queue freed (the pages of
        deleted messages, the WAL), then take the reserve back if it fits now. True once it is back."""
        with contextlib.suppress(sqlite3.OperationalError):  # busy (another process) or still no room
            # As a script: a plain execute() steps it once, and each step frees one page.
            self.db.executescript("PRAGMA incremental_vacuum;")
        with contextlib.suppress(sqlite3.OperationalError):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        if not self._reserve.restore():
            return False
        self.health.record("insert", None)  # room again: the last refusal to store is over
        return True

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reserve.restore(at_start=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            db.row_factory = sqlite3.Row
            # Freed pages go back to the file system (PRAGMA incremental_vacuum), not only to later messages:
            # a queue that filled its disk can give the space back once it has drained. A new file gets it at
            # once; an older one when it is small enough to VACUUM (below).
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            use_wal(db)
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            # Debian's SQLite zeroes deleted content by default, which rewrites a delivered message's whole
            # blob into the WAL just to delete it; FAST zeroes only what costs no extra I/O.
            db.execute("PRAGMA secure_delete=FAST")
            if self._reserve.size > 0:
                # The WAL is checkpointed (and cut back) before it outgrows a quarter of the reserve: when the
                # disk fills up, the released reserve always has room for the checkpoint that lets the WAL
                # be reused (SQLite's default lets a WAL reach 4 MiB first).
                wal = max(WAL_AT_LEAST, self._reserve.size // 4)
                page = db.execute("PRAGMA page_size").fetchone()[0]
                db.execute(f"PRAGMA wal_autocheckpoint={max(1, min(1000, wal // page))}")
                db.execute(f"PRAGMA journal_size_limit={wal}")
            if self._max_page_count is not None:  # tests: simulate a full disk
                db.execute(f"PRAGMA max_page_count={int(self._max_page_count)}")
            self._found_version, _ = sqlite_schema.migrate(db)
            _incremental_vacuum_on(db, self.path)
        except BaseException:
            db.close()
            raise
        self._db = db

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def open(self) -> None:
        await self._run(lambda: None)

    async def migrate(self) -> tuple[int, int]:
        def run() -> tuple[int, int]:
            return self._found_version, sqlite_schema.migrate(self.db)[1]

        return await self._run(run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
        await self._rate.close()

    # -- the server's side ---------------------------------------------------------------------------

    async def insert(self, message: NewMessage) -> int:
        try:
            token = await self._run(self._insert, message)
        except SpoolUnavailable as exc:
            self.health.record("insert", exc.reason)
            raise
        self.health.record("insert", None)
        return token

    def _insert(self, m: NewMessage) -> int:
        if self._reserve.released and not self._recover():  # measured again for every new message
            raise sqlite3.OperationalError("database or disk is full (its reserve is in use to drain the queue)")
        m = storable_message(m)  # as PostgreSQL stores it (no NUL): the backends read alike
        stored = message_row(m)
        with self._tx() as db:
            db.execute(SQL.insert_message, stored.values)
            db.executemany(
                SQL.insert_call,
                [
                    (m.id, c.key, c.recipients, c.state, c.upstream_id, c.error, c.lost)
                    for c in m.decision.calls.values()
                ],
            )
            db.executemany(SQL.insert_blob, chunks(m.id, m.blobs))
        return stored.token

    async def claim(self, owner: str, account: str, now: float, limit: int, lease: float) -> list[Claimed]:
        # Held for half a lease: more than a heartbeat's interval (a third), so every live sibling has renewed.
        step = self._wall.seen(hold=lease / 2, tolerance=wallstep.tolerance(lease))
        if step:
            try:
                renewed = await self._run(self._renew_all, owner, now + lease)
            except SpoolUnavailable:
                self._wall.again(step)  # not consumed: the next claim sees the step and renews again
                raise
            # Leases are on this clock: live ones looked expired. Ours renewed now; nobody's reaped meanwhile.
            log.warning("queue_clock_stepped", step=round(step, 1), renewed=renewed, reap_after=lease / 2)
        return await self._run(self._claim, owner, account, now, limit, lease, self._wall.may_reap())

    def _renew_all(self, owner: str, lease_until: float) -> int:
        with self._tx() as db:
            return db.execute(SQL.lease, (lease_until, owner)).rowcount

    def _claim(
        self, owner: str, account: str, now: float, limit: int, lease: float, reap: bool = True
    ) -> list[Claimed]:
        # Looked for first without the write lock, which every process of the queue waits for: an idle
        # worker's polls never take it (and a process paused while holding it would stop them all).
        db = self.db
        if not (
            db.execute(SQL.due, (account, now, 1)).fetchone()
            or (reap and db.execute(SQL.reapable, (account, now, 1)).fetchone())
        ):
            return []
        with self._tx() as db:
            rows = db.execute(SQL.due, (account, now, limit)).fetchall()
            if reap and len(rows) < limit:
                rows += db.execute(SQL.reapable, (account, now, limit - len(rows))).fetchall()
            if not rows:
                return []
            reaped = {r["id"]: r["state"] == "inflight" for r in rows}
            ids = list(reaped)
            updated = db.execute(SQL.claim(len(ids)), (owner, now + lease, *ids)).fetchall()
            rows_read = ClaimedRows(account, reaped, updated)
            for c in db.execute(SQL.claimed_calls(len(ids)), ids):
                rows_read.call(c)
            for row in db.execute(SQL.claimed_blobs(len(ids)), ids):
                rows_read.blob_chunk(row)
        return rows_read.claimed()

    async def mark_sending(self, msg_id: str, token: int, keys: Sequence[str], lease_past: float | None = None) -> bool:
        def run() -> bool:
            with self._tx() as db:
                held = (
                    db.execute(SQL.holds, (msg_id, token))
                    if lease_past is None
                    else db.execute(SQL.holds_lease, (msg_id, token, lease_past))
                )
                if held.fetchone() is None:
                    return False
                db.executemany(SQL.mark_sending, [(msg_id, key) for key in keys])
            return True

        return await self._run(run)

    async def settle(self, msg_id: str, token: int, decision: Decision, now: float) -> bool:
        return await self._run(self._settle, msg_id, token, decision, now)

    def _settle(self, msg_id: str, token: int, d: Decision, now: float) -> bool:
        d = storable_decision(d)
        with self._tx() as db:
            if db.execute(SQL.holds, (msg_id, token)).fetchone() is None:
                return False  # fenced: another owner claimed it since (our lease expired)
            if d.verdict == "delivered":
                db.execute(SQL.delete_message, (msg_id,))
                return True
            dead = d.verdict in ("dead", "refused")
            db.execute(
                SQL.settle,
                (
                    "dead" if dead else "queued",
                    d.attempts,
                    d.next_attempt,
                    d.last_error,
                    d.dead_reason if dead else None,
                    now if dead else None,
                    d.internal_errors,
                    msg_id,
                ),
            ).fetchall()
            db.executemany(
                SQL.settle_call,
                [(c.state, c.upstream_id, c.error, c.lost, msg_id, c.key) for c in d.calls.values()],
            )
        return True

    async def token_of(self, msg_id: str) -> int | None:
        def run() -> int | None:
            with self._tx() as db:
                row = db.execute(SQL.token_of, (msg_id,)).fetchone()
            return None if row is None else int(row[0])

        return await self._run(run)

    async def commit_state(self, xid: int) -> str | None:
        # No transaction ids: SQLite's COMMIT is local and never unknown (CommitUnknown carries no xid here).
        return None

    async def withdraw(self, msg_id: str, token: int) -> str:
        # SQLite's COMMIT is local: its error means not committed (CommitUnknown is PostgreSQL's), so this is
        # never needed for SQLite's own inserts; here for the interface (and a test's fault injection).
        def run() -> str:
            with self._tx() as db:
                row = db.execute(SQL.token_of, (msg_id,)).fetchone()
                if row is None:
                    return "absent"
                if int(row[0]) != token:
                    return "claimed"
                db.execute(SQL.delete_message, (msg_id,))
            return "withdrawn"

        return await self._run(run)

    async def release(self, msg_id: str, token: int, now: float) -> bool:
        def run() -> bool:
            with self._tx() as db:
                return db.execute(SQL.release, (now, msg_id, token)).fetchone() is not None

        return await self._run(run)

    async def renew(self, owner: str, lease_until: float) -> int:
        def run() -> int:
            with self._tx() as db:
                return db.execute(SQL.lease, (lease_until, owner)).rowcount

        return await self._run(run)

    async def expire_owners(self, owners: Sequence[str], now: float) -> int:
        def run() -> int:
            with self._tx() as db:
                return sum(db.execute(SQL.expire, (now - 1, owner, now)).rowcount for owner in owners)

        return await self._run(run)

    async def owners(self) -> list[str]:
        def run() -> list[str]:
            return [r[0] for r in self.db.execute(SQL.owners)]

        return await self._run(run)

    async def next_due(self, accounts: Sequence[str]) -> float | None:
        def run() -> float | None:
            row = self.db.execute(SQL.next_due(len(accounts)), 2 * SQLITE.items(accounts)).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._run(run)

    async def wake(self, account: str, now: float, limit: int | None = None) -> int:
        if limit is None:
            return await woken_in_batches(lambda batch: self.wake(account, now, batch))

        def run() -> int:
            with self._tx() as db:
                return db.execute(SQL.wake, (now, account, now, limit)).rowcount

        return await self._run(run)

    async def listen(self, wake: Callable[[str], None]) -> None:
        return None  # SQLite has no notifications: the retry worker polls (delivery.poll_interval)

    # -- shared rate limits ---------------------------------------------------------------------------

    async def rate_slots(
        self, account: str, count: int, interval: float, burst: int, recovery: float = 30.0
    ) -> list[float]:
        return await self._rate.slots(account, count, interval, burst, recovery)

    async def rate_pause(self, account: str, seconds: float, slow_for: float) -> None:
        await self._rate.pause(account, seconds, slow_for)

    # -- AUTH counts ----------------------------------------------------------------------------------

    async def auth_begin(self, client: str, rules: Rules) -> tuple[Record, authcount.Verdict, float]:
        record, verdict, now = await self._rate.auth(client, rules.window, auth_begin_change(rules))
        return record, verdict, now

    async def auth_end(self, client: str, rules: Rules, failed: bool, in_flight: bool) -> tuple[Record, bool, float]:
        record, locked, now = await self._rate.auth(client, rules.window, auth_end_change(rules, failed, in_flight))
        return record, bool(locked), now

    async def auth_lift(self, client: str, rules: Rules) -> bool:
        return bool((await self._rate.auth(client, rules.window, auth_lift_change))[1])

    async def auth_peek(self, client: str) -> tuple[Record, float] | None:
        return await self._rate.auth_peek(client)

    async def auth_held(
        self, limit: int, *, prefix: str = "", besides: Sequence[str] = ()
    ) -> list[tuple[str, Record, float]]:
        return await self._rate.auth_held(limit, prefix=prefix, besides=besides)

    # -- console sign-outs (in the same side file: they outlive a restart, as the AUTH counts do) --------------

    async def session_revoke(self, sid: str, until: float) -> None:
        await self._rate.session_revoke(sid, until)

    async def session_revoked(self, sid: str) -> bool:
        return await self._rate.session_revoked(sid)

    # -- shared quota counts (in the same side file as the rate buckets) ------------------------------------

    async def quota_take(self, login: str, windows: Sequence[Window], size: int) -> tuple[Verdict, dict[str, Counts]]:
        return await self._rate.quota_take(login, windows, size)

    async def quota_return(self, login: str, windows: Sequence[Window], size: int) -> None:
        await self._rate.quota_return(login, windows, size)

    async def quota_counts(self, login: str, windows: Sequence[Window]) -> dict[str, Counts]:
        return await self._rate.quota_counts(login, windows)

    # -- idempotency keys -----------------------------------------------------------------------------

    async def claim_key(
        self, account: str, key: str, msg_id: str, now: float, window: float, stale: float, digest: str | None = None
    ) -> KeyHit | KeyTakenOver | None:
        def run() -> KeyHit | KeyTakenOver | None:
            taken: KeyTakenOver | None = None
            with self._tx() as db:
                # One writer at a time: every expired key can go now (PostgreSQL deletes only this one's).
                db.execute("DELETE FROM idempotency WHERE expires<?", (now,))
                row = db.execute(SQL.key_row, (account, key)).fetchone()
                if row is not None and (row["reply_id"] is not None or row["created"] >= now - stale):
                    return KeyHit(row["msg_id"], row["reply_id"], row["digest"])
                if row is not None:
                    if db.execute(SQL.stored, (row["msg_id"],)).fetchone() is not None:
                        db.execute(SQL.key_answered, (account, key))
                        return KeyHit(row["msg_id"], row["msg_id"], row["digest"])
                    # A stale claim whose message was never stored: this one takes the key over.
                    db.execute(SQL.key_drop, (account, key, row["msg_id"]))
                    taken = KeyTakenOver(row["msg_id"])
                db.execute(SQL.key_insert, (account, key, msg_id, now, now + window, digest)).fetchall()
            return taken

        return await self._run(run)

    async def finish_key(self, account: str, key: str, msg_id: str, reply_id: str | None) -> None:
        def run() -> None:
            with self._tx() as db:
                if reply_id is None:
                    db.execute(SQL.key_drop, (account, key, msg_id))
                else:
                    db.execute(SQL.key_reply, (reply_id, account, key, msg_id))

        await self._run(run)

    async def record_key(
        self, account: str, key: str, msg_id: str, reply_id: str, created: float, expires: float, digest: str | None
    ) -> bool:
        def run() -> bool:
            with self._tx() as db:
                row = db.execute(SQL.key_late, (account, key, msg_id, reply_id, created, expires, digest)).fetchone()
            return row is not None

        return await self._run(run)

    # -- operators ------------------------------------------------------------------------------------

    async def clock_offset(self) -> float | None:
        return None  # a file on this host: every process reads the same clock

    async def counts(self, now: float) -> dict[str, dict[str, Any]]:
        def run() -> dict[str, dict[str, Any]]:
            rows = self.db.execute(SQL.counts).fetchall()
            return {r["state"]: {"count": r["n"], "oldest_age": now - r["oldest"]} for r in rows}

        return await self._run(run)

    async def waiting(self) -> dict[str, int]:
        def run() -> dict[str, int]:
            return {r["account"]: r["n"] for r in self.db.execute(SQL.waiting).fetchall()}

        return await self._run(run)

    async def list(self, states: Sequence[str], limit: int = 1000) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            rows = self.db.execute(SQL.listing(len(states)), (*SQLITE.items(states), limit)).fetchall()
            return [dict(r) for r in rows]

        return await self._run(run)

    async def show(self, msg_id: str) -> dict[str, Any] | None:
        def run() -> dict[str, Any] | None:
            row = self.db.execute(SQL.show, (msg_id,)).fetchone()
            if row is None:
                return None
            out = {k: row[k] for k in row.keys() if k not in UNSHOWN}  # noqa: SIM118 (sqlite3.Row)
            out["calls"] = [dict(r) for r in self.db.execute(SQL.calls, (msg_id,))]
            return out

        return await self._run(run)

    async def submission(self, msg_id: str) -> bytes | None:
        def run() -> bytes | None:
            row = self.db.execute(SQL.submission, (msg_id,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(run)

    async def retry_now(self, msg_id: str, now: float) -> bool:
        def run() -> bool:
            with self._tx() as db:
                return db.execute(SQL.retry_now, (now, msg_id)).fetchone() is not None

        return await self._run(run)

    async def delete(self, msg_id: str) -> dict[str, Any] | None:
        def run() -> dict[str, Any] | None:
            with self._tx() as db:  # BEGIN IMMEDIATE: no settle between the read and the delete
                row = db.execute(SQL.delete_lock, (msg_id,)).fetchone()
                if row is None:
                    return None
                out = dict(row)
                out["calls"] = [dict(r) for r in db.execute(SQL.calls, (msg_id,))]
                db.execute(SQL.delete, (msg_id,))
                return out

        return await self._run(run)

    async def requeue(self, msg_id: str, now: float, max_lifetime: float) -> bool:
        def run() -> bool:
            with self._tx() as db:
                found = db.execute(SQL.requeue, (now, now + max_lifetime, msg_id)).fetchone() is not None
                if found:
                    db.execute(SQL.requeue_calls, (msg_id,))
            return found

        return await self._run(run)


def _incremental_vacuum_on(db: sqlite3.Connection, path: Path) -> None:
    """Turn a queue file written before auto_vacuum (0: none) into one that can give space back: VACUUM
    when that is cheap (a small file), else say why it waits (it is tried again at every start)."""
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    size = db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
    if size > VACUUM_AT_MOST:
        log.warning("queue_auto_vacuum_pending", path=str(path), size=size, limit=VACUUM_AT_MOST)
        return
    try:
        db.execute("VACUUM")
    except sqlite3.OperationalError as exc:  # another process busy, or no room for the copy: next start
        log.warning("queue_auto_vacuum_pending", path=str(path), size=size, error=str(exc))
        return
    log.info("queue_auto_vacuum_on", path=str(path), size=size)
