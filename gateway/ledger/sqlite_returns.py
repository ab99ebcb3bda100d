"""The ReturnStore on the SQLite ledger: its connection and thread, one `BEGIN IMMEDIATE` per change.

Its leases (event cursors, webhook deliveries being POSTed, notice decisions) are on this host's wall clock, as
the callers pass it, like the SQLite queue's: a forward step of that clock by a lease made a live lease look
expired and the next claim, in any process, took it over (a webhook or a notice sent twice). Each claim reads
the clock's steps (gateway/queue/wallstep.py) and, for a while after one, takes over nobody's expired lease of
its kind; due and new work is still claimed."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import structlog

from gateway.ledger import readback
from gateway.ledger.model import Record, Row, SuppressionRow, address_key, address_keys
from gateway.ledger.returns import COUNTED_KEPT, Claim, Delivery, Lease, Match, Suppressed
from gateway.ledger.returns_sql import FOR_SQLITE
from gateway.ledger.sqlite import SqliteLedger
from gateway.queue.sql import SQLITE
from gateway.queue.wallstep import WallStep

log = structlog.get_logger("gateway.ledger.sqlite_returns")
SQL = FOR_SQLITE
T = TypeVar("T")


@contextmanager
def _tx(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _match(r: Sequence[Any]) -> Match:
    return Match(*r)


class SqliteReturns:
    def __init__(
        self,
        ledger: SqliteLedger,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        # The host's wall clock stepped (leases are on it): reap nobody's for a while (`_may_reap`; `wall`,
        # `monotonic`: the host's clocks, tests give fakes).
        self._wall = WallStep(wall, monotonic)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.ledger.run(fn, *args)

    def _may_reap(self, kind: str, lease: float) -> bool:
        """Whether a claim of `kind` (leases of `lease` seconds) may take over others' expired leases now.

        After a forward step of the wall clock, not for one whole lease (on the monotonic clock) from when this
        process saw it. The queue holds for half a lease because its heartbeats renew every live lease within a
        third of one; nothing renews these (a webhook's lease is its timeout and a margin, one POST; a notice
        decision's 120 s; a cursor's is renewed only with each page, however long a provider takes to answer),
        so a lease taken before the step is known to be over only when a whole lease has passed since it was
        taken: by then its owner has settled it (or overran it, which a lease never covered). The step came
        before this process saw it, so the hold ends a lease after the step or later: no live owner loses its
        lease. Each kind is held for its own lease (the one its caller passes, as its siblings do); a kind held
        longer only waits, as a dead process's leases of it are taken over that much later."""
        step = self._wall.seen()
        if step:
            # Return-path leases are on this clock: live ones looked expired. None taken over for a lease of each kind.
            log.warning("return_path_clock_stepped", step=round(step, 1), seen_by=kind, reap_after=lease)
        return self._wall.may_reap(hold=lease)

    # -- event cursors ------------------------------------------------------------------------------------

    async def lease_cursor(
        self, name: str, account: str, owner: str, now: float, lease: float, start: float
    ) -> tuple[Lease | None, float]:
        reap = self._may_reap("cursor", lease)

        def run(db: sqlite3.Connection) -> tuple[Lease | None, float]:
            with _tx(db):
                db.execute(SQL.cursor_row, (name, account, start))
                position, since, until, page, holder, lease_until, _ = db.execute(SQL.cursor_read, (name,)).fetchone()
                if holder is not None and holder != owner and (not reap or (lease_until or 0) >= now):
                    return None, float(position)
                (token,) = db.execute(SQL.cursor_lease, (owner, now + lease, name)).fetchone()
            return Lease(name, int(token), float(position), since, until, int(page)), float(position)

        return await self._run(run)

    async def apply(
        self,
        name: str,
        token: int,
        rows: Sequence[Row],
        *,
        since: float,
        until: float,
        page: int,
        now: float,
        lease: float,
    ) -> list[Row] | None:
        def run(db: sqlite3.Connection) -> list[Row] | None:
            with _tx(db):
                if db.execute(SQL.cursor_holds, (name, token)).fetchone() is None:
                    return None
                ids = readback.event_ids(rows)
                known: list[str] = []
                for start in range(0, len(ids), 500):  # SQLite's limit on parameters per statement
                    part = ids[start : start + 500]
                    known += [r[0] for r in db.execute(SQL.events_known(len(part)), SQLITE.items(part))]
                written = readback.unread(rows, known)
                SqliteLedger.write_in(db, written)
                db.execute(SQL.cursor_progress, (since, until, page, now + lease, now, name))
            return written

        return await self._run(run)

    async def complete(self, name: str, token: int, position: float, now: float, lease: float) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            with _tx(db):
                return db.execute(SQL.cursor_complete, (position, now + lease, now, name, token)).rowcount == 1

        return await self._run(run)

    async def release(self, name: str, token: int) -> None:
        def run(db: sqlite3.Connection) -> None:
            with _tx(db):
                db.execute(SQL.cursor_release, (name, token))

        await self._run(run)

    async def cursors(self) -> list[dict[str, Any]]:
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = db.execute(SQL.cursors)
            names = [c[0] for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return await self._run(run)

    # -- matching -----------------------------------------------------------------------------------------

    async def match_ids(self, upstream_ids: Sequence[str]) -> list[Match]:
        ids = sorted(set(upstream_ids))
        if not ids:
            return []

        def run(db: sqlite3.Connection) -> list[Match]:
            found: list[Match] = []
            for start in range(0, len(ids), 500):  # SQLite's limit on parameters per statement
                part = ids[start : start + 500]
                found += [_match(r) for r in db.execute(SQL.upstream_ids(len(part)), SQLITE.items(part))]
            return found

        return await self._run(run)

    async def match_addresses(self, addresses: Sequence[str], since: float) -> list[Match]:
        return await self._by_address(SQL.addresses, addresses, since, lost=False)

    async def match_lost(self, addresses: Sequence[str], since: float) -> list[Match]:
        return await self._by_address(SQL.lost, addresses, since, lost=True)

    async def _by_address(
        self, statement: Callable[[int], str], addresses: Sequence[str], since: float, *, lost: bool
    ) -> list[Match]:
        """Recipients at these addresses since a time, by `statement` (addresses or lost), 500 at a time."""
        keys = sorted({address_key(a) for a in addresses})
        if not keys:
            return []

        def run(db: sqlite3.Connection) -> list[Match]:
            found: list[Match] = []
            for start in range(0, len(keys), 500):  # SQLite's limit on parameters per statement
                part = keys[start : start + 500]
                rows = db.execute(statement(len(part)), (*SQLITE.items(part), since))
                found += [replace(_match(r), lost=True) if lost else _match(r) for r in rows]
            return found

        return await self._run(run)

    # -- suppressions -------------------------------------------------------------------------------------

    async def suppressions(self, account: str | None = None) -> list[Suppressed]:
        def run(db: sqlite3.Connection) -> list[Suppressed]:
            rows = db.execute(SQL.suppressions) if account is None else db.execute(SQL.suppressions_of, (account,))
            return [Suppressed(*r) for r in rows]

        return await self._run(run)

    async def suppress(self, rows: Sequence[SuppressionRow]) -> None:
        if rows:
            await self.ledger.write(rows)

    async def unsuppress(self, address: str, account: str | None = None) -> int:
        def run(db: sqlite3.Connection) -> int:
            removed = 0
            with _tx(db):
                for key in address_keys(address):
                    if account is None:
                        removed += db.execute(SQL.suppression_drop_any, (key,)).rowcount
                    else:
                        removed += db.execute(SQL.suppression_drop, (account, key)).rowcount
            return removed

        return await self._run(run)

    async def sync_source(
        self,
        account: str,
        source: str,
        rows: Sequence[SuppressionRow],
        lifted: Sequence[str] = (),
        read_at: float = 0.0,
    ) -> tuple[list[str], list[str]]:
        def run(db: sqlite3.Connection) -> tuple[list[str], list[str]]:
            wanted = {address_key(r.address): r for r in rows}
            gone: set[str] = set()
            with _tx(db):
                held_by = [(source, db.execute(SQL.suppression_source, (account, source)).fetchall())]
                for kind in lifted:
                    held_by.append(
                        (kind, db.execute(SQL.suppression_source_before, (account, kind, read_at)).fetchall())
                    )
                for kind, found in held_by:
                    held = {r[0] for r in found}
                    for address in held - set(wanted):
                        db.execute(SQL.suppression_drop_source, (account, address, kind))
                        gone.add(address)
                present = {r[0] for r in db.execute(SQL.suppression_addresses, (account,))}
                new = [r for a, r in wanted.items() if a not in present]
                SqliteLedger.write_in(db, new)
            return sorted(address_key(r.address) for r in new), sorted(gone)

        return await self._run(run)

    # -- the webhook outbox -------------------------------------------------------------------------------

    async def claim_deliveries(
        self,
        owner: str,
        now: float,
        limit: int,
        lease: float,
        *,
        room: Mapping[str, int] | None = None,
        removed: int | None = None,
    ) -> list[Delivery]:
        reap = self._may_reap("webhook", lease)

        def run(db: sqlite3.Connection) -> list[Delivery]:
            with _tx(db):
                rows: list[Any] = []
                # The webhooks with rows, to read those of removed ones (only when webhooks are named).
                gone = room is not None and (limit if removed is None else removed) > 0
                present = [r[0] for r in db.execute(SQL.outbox_webhooks).fetchall()] if gone else []
                for cap, reads in SQL.outbox_claims(room, limit, present, removed):
                    got = 0
                    for due, reapable, params, most in reads:
                        want = min(most, cap - got)
                        if want <= 0:
                            break
                        found = db.execute(due, (*params, now, want)).fetchall()
                        if reap and len(found) < want:
                            found += db.execute(reapable, (*params, now, want - len(found))).fetchall()
                        got += len(found)
                        rows += found
                out = []
                for webhook, event_id, state in rows:
                    leased = db.execute(SQL.outbox_lease, (owner, now + lease, webhook, event_id)).fetchone()
                    out.append(Delivery.of(leased, reclaimed=state == "sending"))
            return out

        return await self._run(run)

    async def settle_delivery(
        self,
        delivery: Delivery,
        state: str,
        *,
        attempts: int,
        next_attempt: float,
        error: str | None,
        now: float,
        rows: Sequence[Row] = (),
    ) -> bool:
        done = now if state in ("delivered", "failed") else None
        values = (state, attempts, next_attempt, error, done, delivery.webhook, delivery.event_id, delivery.token)

        def run(db: sqlite3.Connection) -> bool:
            with _tx(db):
                if db.execute(SQL.outbox_settle, values).rowcount != 1:
                    return False
                SqliteLedger.write_in(db, rows)
            return True

        return await self._run(run)

    async def pending_deliveries(self) -> dict[str, int]:
        def run(db: sqlite3.Connection) -> dict[str, int]:
            return {webhook: int(n) for webhook, n in db.execute(SQL.outbox_pending)}

        return await self._run(run)

    # -- notices ------------------------------------------------------------------------------------------

    async def claim_notices(self, owner: str, now: float, lease: float, limit: int) -> list[Claim]:
        reap = self._may_reap("notice", lease)

        def run(db: sqlite3.Connection) -> list[Claim]:
            claims = []
            with _tx(db):
                rows = db.execute(SQL.notice_pending, (limit,)).fetchall()
                if reap and len(rows) < limit:
                    rows += db.execute(SQL.notice_expired, (now, limit - len(rows))).fetchall()
                for msg_id, rcpt in rows:
                    (token,) = db.execute(SQL.notice_claim, (owner, now + lease, msg_id, rcpt)).fetchone()
                    claims.append(Claim(msg_id, rcpt, int(token)))
            return claims

        return await self._run(run)

    async def finish_notices(
        self,
        claims: Sequence[Claim],
        state: str,
        now: float,
        notice_id: str | None,
        reason: str | None,
        rows: Sequence[Row],
    ) -> int:
        def run(db: sqlite3.Connection) -> int:
            with _tx(db):
                done = sum(
                    db.execute(SQL.notice_finish, (state, notice_id, reason, now, c.msg_id, c.rcpt, c.token)).rowcount
                    for c in claims
                )
                if done:
                    SqliteLedger.write_in(db, rows)
            return done

        return await self._run(run)

    async def postpone_notices(self, claims: Sequence[Claim], until: float, reason: str) -> None:
        def run(db: sqlite3.Connection) -> None:
            with _tx(db):
                for c in claims:
                    db.execute(SQL.notice_postpone, (until, reason, c.msg_id, c.rcpt, c.token))

        await self._run(run)

    async def notice_data(self, msg_id: str) -> tuple[Record, str | None] | None:
        record = await self.ledger.get(msg_id)
        if record is None:
            return None

        def run(db: sqlite3.Connection) -> str | None:
            row = db.execute(SQL.notice_of, (record.id,)).fetchone()
            return None if row is None else row[0]

        return record, await self._run(run)

    async def count_notice(self, key: str, account: str, sender: str, window: float, limit: int, now: float) -> bool:
        start = now - now % window

        def run(db: sqlite3.Connection) -> bool:
            with _tx(db):
                db.execute(SQL.count_prune, (now,))
                db.execute(SQL.counted_prune, (now,))
                marked = (key, account, sender, window, start, start + window + COUNTED_KEPT)
                if db.execute(SQL.count_mark, marked).fetchone() is None:
                    return True  # counted by the decision this one takes over
                db.execute(SQL.count_row, (account, sender, window, start, start + window))
                if db.execute(SQL.count_take, (account, sender, window, start, limit)).fetchone() is not None:
                    return True
                db.execute(SQL.count_unmark, (key,)).fetchall()
                return False

        return await self._run(run)

    async def uncount_notice(self, key: str) -> None:
        def run(db: sqlite3.Connection) -> None:
            with _tx(db):
                row = db.execute(SQL.count_unmark, (key,)).fetchone()
                if row is not None:
                    db.execute(SQL.count_back, tuple(row))

        await self._run(run)

    async def notice_counted(self, key: str, now: float) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            return db.execute(SQL.counted, (key, now)).fetchone() is not None

        return await self._run(run)

    # -- leases of owners that are gone -------------------------------------------------------------------

    async def owners(self) -> list[str]:
        def run(db: sqlite3.Connection) -> list[str]:
            return [r[0] for r in db.execute(SQL.owners)]

        return await self._run(run)

    async def expire_owners(self, owners: Sequence[str], now: float) -> int:
        def run(db: sqlite3.Connection) -> int:
            with _tx(db):
                return sum(db.execute(sql, (now - 1, owner)).rowcount for owner in owners for sql in SQL.expire)

        return await self._run(run)
