"""The ReturnStore on the PostgreSQL ledger: its pool, one transaction per change, committed with the server's
own durability (the ledger's batches alone skip the WAL flush). Rows another instance is claiming are passed
over (`FOR UPDATE SKIP LOCKED`), as the queue's claims do.

Leases (the events poll's cursor, webhook deliveries being POSTed, notice decisions and their postponements) are
stored and compared on the database's clock, as the queue's are: callers pass times on their own clock, moved by
the offset `_shift` measures (gateway/core/dbclock.py), so an instance whose clock is ahead does not take over a
sibling's live lease (a webhook POSTed twice). The other times stay on the caller's clock, as the ledger's
timestamps do: the outbox's due times (an OutboxRow's is written by the ledger's writer), a cursor's position
and `polled`, notices' decision times and windows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import psycopg

from gateway.core.dbclock import DbClock
from gateway.core.storable import storable
from gateway.ledger import readback
from gateway.ledger.model import Record, Row, SuppressionRow, address_key, address_keys
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.returns import COUNTED_KEPT, Claim, Delivery, Lease, Match, Suppressed
from gateway.ledger.returns_sql import FOR_POSTGRES
from gateway.queue.sql import POSTGRES

SQL = FOR_POSTGRES


class PostgresReturns:
    def __init__(self, ledger: PostgresLedger, clock: Callable[[], float] | None = None) -> None:
        self.ledger = ledger
        # This host's clock against the database's (`clock`: the host's, tests give a skewed one; None: time.time).
        self._clock = DbClock(clock)

    async def _shift(self, conn: psycopg.AsyncConnection[Any]) -> float:
        """The database's clock minus this host's, read in the caller's transaction unless the last reading
        serves: added to a caller's time it is on the database's clock."""

        async def read() -> float:
            row = await (await conn.execute(SQL.clock)).fetchone()
            assert row is not None
            return float(row[0])

        return await self._clock.shift(read)

    # -- event cursors ------------------------------------------------------------------------------------

    async def lease_cursor(
        self, name: str, account: str, owner: str, now: float, lease: float, start: float
    ) -> tuple[Lease | None, float]:
        async with self.ledger.connection() as conn:
            await conn.execute(SQL.cursor_row, (name, account, start))
            row = await (await conn.execute(SQL.cursor_read, (name,))).fetchone()
            assert row is not None
            position, since, until, page, holder, lease_until, _ = row
            now_there = now + await self._shift(conn)
            if holder is not None and holder != owner and (lease_until or 0) >= now_there:
                return None, float(position)
            leased = await (await conn.execute(SQL.cursor_lease, (owner, now_there + lease, name))).fetchone()
            assert leased is not None
        return Lease(name, int(leased[0]), float(position), since, until, int(page)), float(position)

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
        async with self.ledger.connection() as conn:
            if await (await conn.execute(SQL.cursor_holds, (name, token))).fetchone() is None:
                return None
            ids = readback.event_ids(rows)
            known: list[str] = []
            if ids:
                cur = await conn.execute(SQL.events_known(len(ids)), POSTGRES.items(ids))
                known = [r[0] for r in await cur.fetchall()]
            written = readback.unread(rows, known)
            await PostgresLedger.write_in(conn, written)
            lease_until = now + await self._shift(conn) + lease
            await conn.execute(SQL.cursor_progress, (since, until, page, lease_until, now, name))
        return written

    async def complete(self, name: str, token: int, position: float, now: float, lease: float) -> bool:
        async with self.ledger.connection() as conn:
            lease_until = now + await self._shift(conn) + lease
            cur = await conn.execute(SQL.cursor_complete, (position, lease_until, now, name, token))
            return cur.rowcount == 1

    async def release(self, name: str, token: int) -> None:
        async with self.ledger.connection() as conn:
            await conn.execute(SQL.cursor_release, (name, token))

    async def cursors(self) -> list[dict[str, Any]]:
        async with self.ledger.connection() as conn:
            shift = await self._shift(conn)
            cur = await conn.execute(SQL.cursors)
            names = [c.name for c in cur.description or ()]
            out = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
        for cursor in out:  # the lease's end back on the caller's clock
            if cursor["lease_until"] is not None:
                cursor["lease_until"] -= shift
        return out

    # -- matching -----------------------------------------------------------------------------------------

    async def match_ids(self, upstream_ids: Sequence[str]) -> list[Match]:
        ids = sorted(set(upstream_ids))
        if not ids:
            return []
        async with self.ledger.connection() as conn:
            rows = await (await conn.execute(SQL.upstream_ids(len(ids)), POSTGRES.items(ids))).fetchall()
        return [Match(*r) for r in rows]

    async def match_addresses(self, addresses: Sequence[str], since: float) -> list[Match]:
        keys = sorted({address_key(a) for a in addresses})
        if not keys:
            return []
        async with self.ledger.connection() as conn:
            rows = await (await conn.execute(SQL.addresses(len(keys)), (*POSTGRES.items(keys), since))).fetchall()
        return [Match(*r) for r in rows]

    async def match_lost(self, addresses: Sequence[str], since: float) -> list[Match]:
        keys = sorted({address_key(a) for a in addresses})
        if not keys:
            return []
        async with self.ledger.connection() as conn:
            rows = await (await conn.execute(SQL.lost(len(keys)), (*POSTGRES.items(keys), since))).fetchall()
        return [replace(Match(*r), lost=True) for r in rows]

    # -- suppressions -------------------------------------------------------------------------------------

    async def suppressions(self, account: str | None = None) -> list[Suppressed]:
        async with self.ledger.connection() as conn:
            if account is None:
                rows = await (await conn.execute(SQL.suppressions)).fetchall()
            else:
                rows = await (await conn.execute(SQL.suppressions_of, (account,))).fetchall()
        return [Suppressed(*r) for r in rows]

    async def suppress(self, rows: Sequence[SuppressionRow]) -> None:
        if rows:
            async with self.ledger.connection() as conn:
                await PostgresLedger.write_in(conn, rows)

    async def unsuppress(self, address: str, account: str | None = None) -> int:
        removed = 0
        async with self.ledger.connection() as conn:
            for key in address_keys(address):
                if account is None:
                    cur = await conn.execute(SQL.suppression_drop_any, (key,))
                else:
                    cur = await conn.execute(SQL.suppression_drop, (account, key))
                removed += cur.rowcount
        return removed

    async def sync_source(
        self,
        account: str,
        source: str,
        rows: Sequence[SuppressionRow],
        lifted: Sequence[str] = (),
        read_at: float = 0.0,
    ) -> tuple[list[str], list[str]]:
        wanted = {address_key(r.address): r for r in rows}
        gone: set[str] = set()
        async with self.ledger.connection() as conn:
            held_by = [(source, await (await conn.execute(SQL.suppression_source, (account, source))).fetchall())]
            for kind in lifted:
                cur = await conn.execute(SQL.suppression_source_before, (account, kind, read_at))
                held_by.append((kind, await cur.fetchall()))
            for kind, found in held_by:
                held = {r[0] for r in found}
                for address in held - set(wanted):
                    await conn.execute(SQL.suppression_drop_source, (account, address, kind))
                    gone.add(address)
            present = {r[0] for r in await (await conn.execute(SQL.suppression_addresses, (account,))).fetchall()}
            new = [r for a, r in wanted.items() if a not in present]
            await PostgresLedger.write_in(conn, new)
        return sorted(address_key(r.address) for r in new), sorted(gone)

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
        async with self.ledger.connection() as conn:
            # Due times are on the writers' clocks (the ledger's writer wrote the first); leases on the database's.
            now_there = now + await self._shift(conn)
            rows: list[Any] = []
            # The webhooks with rows, to read those of removed ones (only when webhooks are named).
            gone = room is not None and (limit if removed is None else removed) > 0
            present = [r[0] for r in await (await conn.execute(SQL.outbox_webhooks)).fetchall()] if gone else []
            for cap, reads in SQL.outbox_claims(room, limit, present, removed):
                got = 0
                for due, reapable, params, most in reads:
                    want = min(most, cap - got)
                    if want <= 0:
                        break
                    found = await (await conn.execute(due, (*params, now, want))).fetchall()
                    if len(found) < want:
                        found += await (
                            await conn.execute(reapable, (*params, now_there, want - len(found)))
                        ).fetchall()
                    got += len(found)
                    rows += found
            out = []
            for webhook, event_id, state in rows:
                leased = await (
                    await conn.execute(SQL.outbox_lease, (owner, now_there + lease, webhook, event_id))
                ).fetchone()
                assert leased is not None
                out.append(Delivery.of(leased, reclaimed=state == "sending"))
        return out

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
        values = (
            state,
            attempts,
            next_attempt,
            storable(error),
            done,
            delivery.webhook,
            delivery.event_id,
            delivery.token,
        )
        async with self.ledger.connection() as conn:
            if (await conn.execute(SQL.outbox_settle, values)).rowcount != 1:
                return False
            await PostgresLedger.write_in(conn, rows)
        return True

    async def pending_deliveries(self) -> dict[str, int]:
        async with self.ledger.connection() as conn:
            rows = await (await conn.execute(SQL.outbox_pending)).fetchall()
        return {webhook: int(n) for webhook, n in rows}

    # -- notices ------------------------------------------------------------------------------------------

    async def claim_notices(self, owner: str, now: float, lease: float, limit: int) -> list[Claim]:
        claims = []
        async with self.ledger.connection() as conn:
            rows = await (await conn.execute(SQL.notice_pending, (limit,))).fetchall()
            now_there = now + await self._shift(conn)
            if len(rows) < limit:
                rows += await (await conn.execute(SQL.notice_expired, (now_there, limit - len(rows)))).fetchall()
            for msg_id, rcpt in rows:
                leased = (owner, now_there + lease, msg_id, rcpt)
                row = await (await conn.execute(SQL.notice_claim, leased)).fetchone()
                assert row is not None
                claims.append(Claim(msg_id, rcpt, int(row[0])))
        return claims

    async def finish_notices(
        self,
        claims: Sequence[Claim],
        state: str,
        now: float,
        notice_id: str | None,
        reason: str | None,
        rows: Sequence[Row],
    ) -> int:
        async with self.ledger.connection() as conn:
            done = 0
            for c in claims:
                cur = await conn.execute(
                    SQL.notice_finish, (state, storable(notice_id), storable(reason), now, c.msg_id, c.rcpt, c.token)
                )
                done += cur.rowcount
            if done:
                await PostgresLedger.write_in(conn, rows)
        return done

    async def postpone_notices(self, claims: Sequence[Claim], until: float, reason: str) -> None:
        async with self.ledger.connection() as conn:
            until += await self._shift(conn)  # stored as the claim's lease: on the database's clock
            for c in claims:
                await conn.execute(SQL.notice_postpone, (until, storable(reason), c.msg_id, c.rcpt, c.token))

    async def notice_data(self, msg_id: str) -> tuple[Record, str | None] | None:
        record = await self.ledger.get(msg_id)
        if record is None:
            return None
        async with self.ledger.connection() as conn:
            row = await (await conn.execute(SQL.notice_of, (record.id,))).fetchone()
        return record, None if row is None else row[0]

    async def count_notice(self, key: str, account: str, sender: str, window: float, limit: int, now: float) -> bool:
        start = now - now % window
        async with self.ledger.connection() as conn:
            await conn.execute(SQL.count_prune, (now,))
            await conn.execute(SQL.counted_prune, (now,))
            marked = (key, account, sender, window, start, start + window + COUNTED_KEPT)
            if await (await conn.execute(SQL.count_mark, marked)).fetchone() is None:
                return True  # counted by the decision this one takes over
            await conn.execute(SQL.count_row, (account, sender, window, start, start + window))
            taken = await conn.execute(SQL.count_take, (account, sender, window, start, limit))
            if await taken.fetchone() is not None:
                return True
            await conn.execute(SQL.count_unmark, (key,))
            return False

    async def uncount_notice(self, key: str) -> None:
        async with self.ledger.connection() as conn:
            row = await (await conn.execute(SQL.count_unmark, (key,))).fetchone()
            if row is not None:
                await conn.execute(SQL.count_back, tuple(row))

    async def notice_counted(self, key: str, now: float) -> bool:
        async with self.ledger.connection() as conn:
            return await (await conn.execute(SQL.counted, (key, now))).fetchone() is not None

    async def owners(self) -> list[str]:
        async with self.ledger.connection() as conn:
            return [r[0] for r in await (await conn.execute(SQL.owners)).fetchall()]

    async def expire_owners(self, owners: Sequence[str], now: float) -> int:
        expired = 0
        async with self.ledger.connection() as conn:
            over = now + await self._shift(conn) - 1  # a lease's end, on the database's clock
            for owner in owners:
                for statement in SQL.expire:
                    expired += (await conn.execute(statement, (over, owner))).rowcount
        return expired
