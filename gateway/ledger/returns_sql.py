"""The return path's SQL, written once for both backends (the queue's Dialect names each difference): event
cursors, matching events to recipients, suppressions, the webhook outbox and notice decisions."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from gateway.queue.sql import POSTGRES, SQLITE, Dialect

_MATCHED = (
    "r.msg_id, r.created, r.address, r.rcpt, r.state, r.state_at, r.upstream_id, m.account, m.mail_from,"
    " m.message_id, m.subject, m.login, m.reply_id"
)
_DELIVERY = "webhook, event_id, msg_id, created, enqueued, type, body, attempts, token"
_SUPPRESSED = "account, address, reason, source, created, msg_id, detail"


class ReturnStatements:
    def __init__(self, d: Dialect) -> None:
        self.dialect = d
        self.clock = d(f"SELECT {d.now}")  # the database's clock, to measure this host's against (PostgreSQL)
        # -- event cursors: one row per account (and per DMDS invalid-contacts list), leased like a queue row
        self.cursor_row = d(
            "INSERT INTO event_cursors (name, account, position, page, token) VALUES (?, ?, ?, 0, 0)"
            " ON CONFLICT (name) DO NOTHING"
        )
        self.cursor_read = d(
            "SELECT position, window_since, window_until, page, owner, lease_until, token FROM event_cursors"
            f" WHERE name=?{d.for_update}"
        )
        self.cursor_lease = d(
            "UPDATE event_cursors SET owner=?, lease_until=?, token=token+1 WHERE name=? RETURNING token"
        )
        self.cursor_holds = d(f"SELECT 1 FROM event_cursors WHERE name=? AND token=?{d.for_update}")
        self.cursor_progress = d(
            "UPDATE event_cursors SET window_since=?, window_until=?, page=?, lease_until=?, polled=? WHERE name=?"
        )
        self.cursor_complete = d(
            "UPDATE event_cursors SET position=?, window_since=NULL, window_until=NULL, page=0, lease_until=?,"
            " polled=? WHERE name=? AND token=?"
        )
        self.cursor_release = d("UPDATE event_cursors SET owner=NULL, lease_until=NULL WHERE name=? AND token=?")
        self.cursors = d(
            "SELECT name, account, position, window_since, window_until, page, owner, lease_until, polled"
            " FROM event_cursors ORDER BY name"
        )
        # -- matching upstream events to the recipients the gateway sent
        # -- suppressions
        self.suppressions = d(f"SELECT {_SUPPRESSED} FROM suppressions ORDER BY account, created DESC, address")
        self.suppressions_of = d(
            f"SELECT {_SUPPRESSED} FROM suppressions WHERE account=? ORDER BY created DESC, address"
        )
        self.suppression_drop = d("DELETE FROM suppressions WHERE account=? AND address=?")
        self.suppression_drop_any = d("DELETE FROM suppressions WHERE address=?")
        self.suppression_addresses = d("SELECT address FROM suppressions WHERE account=?")
        self.suppression_source = d("SELECT address FROM suppressions WHERE account=? AND source=?")
        self.suppression_source_before = d(
            "SELECT address FROM suppressions WHERE account=? AND source=? AND created<?"
        )
        self.suppression_drop_source = d("DELETE FROM suppressions WHERE account=? AND address=? AND source=?")
        # -- the webhook outbox
        self.outbox_due = d(
            "SELECT webhook, event_id, state FROM webhook_outbox WHERE state='pending' AND next_attempt<=?"
            f" ORDER BY next_attempt LIMIT ?{d.skip_locked}"
        )
        self.outbox_reapable = d(
            "SELECT webhook, event_id, state FROM webhook_outbox WHERE state='sending' AND lease_until<?"
            f" LIMIT ?{d.skip_locked}"
        )
        # One webhook's, so that another's queue cannot crowd it out (each webhook has its own share of an
        # instance's slots: gateway/returnpath/webhooks.py), by the index with the webhook first
        # (shared_schema.WEBHOOK_DUE_INDEX). A removed webhook's are read by its name too, found among the
        # outbox's webhooks (outbox_webhooks).
        self.outbox_due_of = d(
            "SELECT webhook, event_id, state FROM webhook_outbox WHERE state='pending' AND webhook=?"
            f" AND next_attempt<=? ORDER BY next_attempt LIMIT ?{d.skip_locked}"
        )
        self.outbox_reapable_of = d(
            "SELECT webhook, event_id, state FROM webhook_outbox WHERE state='sending' AND webhook=?"
            f" AND lease_until<? LIMIT ?{d.skip_locked}"
        )
        # The webhooks with rows in the outbox (any state), each found by one seek past the one before in an
        # index with the webhook first (the primary key's or webhook_outbox_due_of): a loose index scan, which
        # neither SQLite nor PostgreSQL does on its own for DISTINCT (both would read every row's entry):
        # as many seeks as there are names, however many rows each has. Asked every round, it finds a
        # removed webhook's deliveries at once, each read then by its own indexed query. (What it replaces,
        # `NOT (webhook IN (...))` on (state, next_attempt), walked the configured webhooks' whole due backlog
        # every round to find none. Sweeping that way only at start, after a reload and every few minutes is
        # not simpler: the sender would have to tell reloads, keep sweeping while a removed webhook's backlog
        # lasts, and would leave a webhook only another instance still has, during a rolling reload, waiting
        # minutes. This needs no state and no timer, and costs a few index seeks a round.)
        self.outbox_webhooks = d(
            "WITH RECURSIVE hooks (name) AS (SELECT MIN(webhook) FROM webhook_outbox UNION ALL SELECT"
            " (SELECT MIN(webhook) FROM webhook_outbox WHERE webhook>hooks.name) FROM hooks WHERE hooks.name IS"
            " NOT NULL) SELECT name FROM hooks WHERE name IS NOT NULL"
        )
        self.outbox_lease = d(
            "UPDATE webhook_outbox SET state='sending', owner=?, lease_until=?, token=token+1"
            f" WHERE webhook=? AND event_id=? RETURNING {_DELIVERY}"
        )
        self.outbox_settle = d(
            "UPDATE webhook_outbox SET state=?, attempts=?, next_attempt=?, last_error=?, done_at=?, owner=NULL,"
            " lease_until=NULL WHERE webhook=? AND event_id=? AND token=?"
        )
        self.outbox_pending = d(
            "SELECT webhook, COUNT(*) AS n FROM webhook_outbox WHERE state IN ('pending', 'sending') GROUP BY webhook"
        )
        self.outbox_next = d("SELECT MIN(next_attempt) AS t FROM webhook_outbox WHERE state='pending'")
        # -- notices: one decision per message and recipient
        self.notice_pending = d(
            f"SELECT msg_id, rcpt FROM ledger_notices WHERE state='pending' ORDER BY at LIMIT ?{d.skip_locked}"
        )
        self.notice_expired = d(
            "SELECT msg_id, rcpt FROM ledger_notices WHERE state='claimed' AND lease_until<?"
            f" ORDER BY lease_until LIMIT ?{d.skip_locked}"
        )
        self.notice_claim = d(
            "UPDATE ledger_notices SET state='claimed', owner=?, lease_until=?, token=token+1 WHERE msg_id=?"
            " AND rcpt=? RETURNING token"
        )
        self.notice_finish = d(
            "UPDATE ledger_notices SET state=?, notice_id=?, reason=?, at=?, owner=NULL, lease_until=NULL"
            " WHERE msg_id=? AND rcpt=? AND token=? AND state='claimed'"
        )
        self.notice_postpone = d(
            "UPDATE ledger_notices SET lease_until=?, reason=? WHERE msg_id=? AND rcpt=? AND token=?"
            " AND state='claimed'"
        )
        self.notice_of = d("SELECT notice FROM ledger_messages WHERE id=?")
        self.notices = d(
            "SELECT msg_id, rcpt, state, at, notice_id, reason FROM ledger_notices WHERE msg_id=? ORDER BY rcpt"
        )
        # -- the per-sender limit: a tally per (account, sender, window length, window start), and each
        # counted notice by its idempotency key (counted once, however often its decision is taken)
        self.count_prune = d("DELETE FROM notice_tally WHERE ends<=?")
        self.counted_prune = d("DELETE FROM notice_counted WHERE ends<=?")
        self.count_mark = d(
            "INSERT INTO notice_counted (key, account, sender, length, win, ends) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (key) DO NOTHING RETURNING key"
        )
        self.counted = d("SELECT 1 FROM notice_counted WHERE key=? AND ends>?")
        self.count_unmark = d("DELETE FROM notice_counted WHERE key=? RETURNING account, sender, length, win")
        self.count_row = d(
            "INSERT INTO notice_tally (account, sender, length, win, ends, n) VALUES (?, ?, ?, ?, ?, 0)"
            " ON CONFLICT DO NOTHING"
        )
        self.count_take = d(
            "UPDATE notice_tally SET n=n+1 WHERE account=? AND sender=? AND length=? AND win=? AND n<? RETURNING n"
        )
        self.count_back = d("UPDATE notice_tally SET n=n-1 WHERE account=? AND sender=? AND length=? AND win=? AND n>0")
        # -- leases of owners known to be gone (a process of this instance that was killed)
        self.owners = d(
            "SELECT owner FROM event_cursors WHERE owner IS NOT NULL"
            " UNION SELECT owner FROM webhook_outbox WHERE state='sending' AND owner IS NOT NULL"
            " UNION SELECT owner FROM ledger_notices WHERE state='claimed' AND owner IS NOT NULL"
        )
        self.expire = (
            d("UPDATE event_cursors SET lease_until=? WHERE owner=?"),
            d("UPDATE webhook_outbox SET lease_until=? WHERE owner=? AND state='sending'"),
            d("UPDATE ledger_notices SET lease_until=? WHERE owner=? AND state='claimed'"),
        )

    def upstream_ids(self, n: int) -> str:
        d = self.dialect
        return d(
            f"SELECT {_MATCHED} FROM ledger_recipients r LEFT JOIN ledger_messages m ON m.id = r.msg_id"
            f" WHERE r.upstream_id{d.among(n)}"
        )

    def outbox_claims(
        self, room: Mapping[str, int] | None, limit: int, present: Sequence[str] = (), removed: int | None = None
    ) -> Iterator[tuple[int, list[tuple[str, str, tuple[Any, ...], int]]]]:
        """What claim_deliveries reads, in groups: (most rows of the group, its reads), each read (due query,
        reapable query, their leading parameters, most rows wanted), the most wanted being capped by the caller
        at what its group's most leaves. `room`: how many more of each named webhook may be leased (each its
        own query, so that one webhook's queue cannot crowd another's out), `limit` in all; the webhooks of
        `present` (those with rows: outbox_webhooks) that it does not name (removed ones) are a group of their
        own, up to `removed` (None: `limit`) besides: they end without a POST, so they never wait for the named
        webhooks' backlog (an empty `room`: no webhook is configured, only those). None: any webhook's."""
        if room is None:
            yield limit, [(self.outbox_due, self.outbox_reapable, (), limit)]
            return
        yield limit, [(self.outbox_due_of, self.outbox_reapable_of, (name,), n) for name, n in room.items() if n > 0]
        most = limit if removed is None else removed
        gone = [name for name in present if name not in room]
        yield most, [(self.outbox_due_of, self.outbox_reapable_of, (name,), most) for name in gone]

    def events_known(self, n: int) -> str:
        """Which of these event ids the ledger holds already (an event read again)."""
        return self.dialect(f"SELECT id FROM ledger_events WHERE id{self.dialect.among(n)}")

    def addresses(self, n: int) -> str:
        """Recipients sent to these addresses since a time (events that name no upstream id)."""
        d = self.dialect
        return d(
            f"SELECT {_MATCHED} FROM ledger_recipients r LEFT JOIN ledger_messages m ON m.id = r.msg_id"
            f" WHERE r.rcpt{d.among(n)} AND r.upstream_id IS NOT NULL AND r.created>=?"
        )

    def lost(self, n: int) -> str:
        """Recipients at these addresses accepted since a time whose call's answer was lost (an `ambiguous`
        event on their call, no upstream id learnt) and not settled since: events about them name an id the
        gateway never learnt (readback.pick matches them by address and time)."""
        d = self.dialect
        return d(
            f"SELECT {_MATCHED} FROM ledger_recipients r LEFT JOIN ledger_messages m ON m.id = r.msg_id"
            f" WHERE r.rcpt{d.among(n)} AND r.upstream_id IS NULL AND r.created>=?"
            " AND r.state IN ('accepted', 'deferred', 'dead') AND EXISTS (SELECT 1 FROM ledger_events e"
            " WHERE e.msg_id = r.msg_id AND e.call_key = r.call_key AND e.outcome = 'ambiguous')"
        )


FOR_SQLITE = ReturnStatements(SQLITE)
FOR_POSTGRES = ReturnStatements(POSTGRES)
