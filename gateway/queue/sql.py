"""The queue's SQL, written once for both backends: FOR_SQLITE and FOR_POSTGRES.

Statements are written with `?` marks and take the backend's placeholder (psycopg's is `%s`). Where the
dialects differ, the difference is one named attribute of the Dialect, which says why. What only one
backend has stays in its module: PostgreSQL's NOTIFY/LISTEN and advisory lock, SQLite's PRAGMAs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.queue.store import CALL_COLUMNS, MESSAGE_COLUMNS, MESSAGE_VALUES


@dataclass(frozen=True, slots=True)
class Dialect:
    mark: str  # the parameter placeholder
    # Rows read in a transaction to be changed by it are locked against other instances. SQLite needs
    # none: BEGIN IMMEDIATE holds the whole database for its one writer.
    for_update: str
    # Claims pass over rows another instance is claiming instead of waiting for them (SQLite: one writer).
    skip_locked: str
    # A message's calls in the order they were stored: SQLite's rowid; PostgreSQL's tables have none, so
    # its calls table has an `ord` column, written on insert.
    call_order: str
    # No LIMIT: PostgreSQL takes NULL and refuses a negative one; SQLite takes -1 and refuses NULL.
    no_limit: int | None
    # The database's clock in epoch seconds, for the rate buckets every process shares: PostgreSQL's is
    # the one clock of all instances; SQLite's is the machine's its processes share.
    now: str
    # `column IN (list)`: PostgreSQL takes the list as one array parameter (= ANY); SQLite, a mark per item.
    array_parameter: bool

    def among(self, n: int) -> str:
        return " = ANY(?)" if self.array_parameter else f" IN ({','.join('?' * n)})"

    def items(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """The parameters for one `among(len(values))`."""
        return (list(values),) if self.array_parameter else tuple(values)

    def __call__(self, sql: str) -> str:
        assert "%" not in sql  # psycopg would read it as a placeholder
        return sql.replace("?", self.mark)


SQLITE = Dialect(
    mark="?",
    for_update="",
    skip_locked="",
    call_order="rowid",
    no_limit=-1,
    now="((julianday('now') - 2440587.5) * 86400.0)",
    array_parameter=False,
)
POSTGRES = Dialect(
    mark="%s",
    for_update=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    call_order="ord",
    no_limit=None,
    now="extract(epoch FROM clock_timestamp())",
    array_parameter=True,
)

_CLAIMED = "id, seq, token, submission, attempts, created, expires, internal_errors, notice"
_LISTED = (
    "m.id, m.state, m.account, m.created, m.next_attempt, m.attempts, m.mail_from, m.subject, m.size,"
    " m.last_error, m.dead_reason, m.dead_at, m.owner,"
    " (SELECT COUNT(*) FROM calls c WHERE c.msg_id=m.id AND c.state!='done') AS open_calls,"
    " (SELECT COUNT(*) FROM calls c WHERE c.msg_id=m.id) AS calls"
)

# Columns `show` and `delete` leave out: the message itself, and the header block a notice would quote.
UNSHOWN = ("submission", "notice")
# A deleted message as QueueStore.delete returns it: show's columns.
_DELETED = ", ".join(c.strip() for c in MESSAGE_COLUMNS.split(",") if c.strip() not in UNSHOWN)


class Statements:
    """Every statement of one dialect; those taking a list of n values are methods of n."""

    def __init__(self, d: Dialect) -> None:
        self.dialect = d
        self.set_version = d("INSERT INTO schema_version (version) VALUES (?)")
        # -- storing
        self.insert_message = d(f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES ({','.join('?' * MESSAGE_VALUES)})")
        ordered = "" if d.call_order == "rowid" else f"{d.call_order}, "  # rowid is assigned by SQLite
        marks = ",".join("?" * (7 + bool(ordered)))
        self.insert_call = d(f"INSERT INTO calls (msg_id, {ordered}{CALL_COLUMNS}) VALUES ({marks})")
        self.insert_blob = d("INSERT INTO blobs (msg_id, n, seq, data) VALUES (?,?,?,?)")
        # -- claiming: due messages first, then those whose owner's lease expired
        self.due = d(
            "SELECT id, state FROM messages WHERE account=? AND state='queued' AND next_attempt<=?"
            f" ORDER BY next_attempt, seq LIMIT ?{d.skip_locked}"
        )
        self.reapable = d(
            "SELECT id, state FROM messages WHERE account=? AND state='inflight'"
            f" AND (lease_until IS NULL OR lease_until<?) ORDER BY seq LIMIT ?{d.skip_locked}"
        )
        # -- an owner's writes, under its token
        self.holds = d(f"SELECT 1 FROM messages WHERE id=? AND token=?{d.for_update}")
        # The fencing check before a call is sent: our token, and a lease that still runs (by the messages'
        # primary key: one indexed row).
        self.holds_lease = d(
            f"SELECT 1 FROM messages WHERE id=? AND token=? AND state='inflight' AND lease_until>?{d.for_update}"
        )
        self.mark_sending = d("UPDATE calls SET state='sending' WHERE msg_id=? AND key=? AND state='pending'")
        self.delete_message = d("DELETE FROM messages WHERE id=?")
        # A write whose COMMIT's answer was lost: whether it landed (QueueStore.token_of, withdraw).
        self.token_of = d(f"SELECT token FROM messages WHERE id=?{d.for_update}")
        self.settle = d(
            "UPDATE messages SET state=?, attempts=?, next_attempt=?, last_error=?, dead_reason=?, dead_at=?,"
            " internal_errors=?, owner=NULL, lease_until=NULL WHERE id=? RETURNING account"
        )
        self.settle_call = d("UPDATE calls SET state=?, upstream_id=?, error=?, lost=? WHERE msg_id=? AND key=?")
        self.release = d(
            "UPDATE messages SET state='queued', next_attempt=?, owner=NULL, lease_until=NULL"
            " WHERE id=? AND token=? AND state='inflight' RETURNING account"
        )
        self.lease = d("UPDATE messages SET lease_until=? WHERE owner=? AND state='inflight'")
        # Ends an owner's leases that have not ended yet (so the count says what changed, once).
        self.expire = d("UPDATE messages SET lease_until=? WHERE owner=? AND state='inflight' AND lease_until>=?")
        self.owners = d("SELECT DISTINCT owner FROM messages WHERE state='inflight' AND owner IS NOT NULL")
        self.wake = d(
            "UPDATE messages SET next_attempt=? WHERE id IN (SELECT id FROM messages WHERE account=?"
            f" AND state='queued' AND next_attempt>? ORDER BY seq LIMIT ?{d.skip_locked})"
        )
        self.clock = d(f"SELECT {d.now} AS now")  # the database's clock, to measure this host's against
        # -- rate buckets shared by every process (gateway.core.tokenbucket does the arithmetic)
        self.rate_row = d("INSERT INTO rate_buckets (account, tat) VALUES (?, 0) ON CONFLICT (account) DO NOTHING")
        self.rate_read = d(f"SELECT tat, slow_until, {d.now} AS now FROM rate_buckets WHERE account=?{d.for_update}")
        self.rate_write = d("UPDATE rate_buckets SET tat=?, slow_until=? WHERE account=?")
        # -- AUTH counts per client shared by every process (gateway.core.authcount does the arithmetic)
        self.auth_row = d("INSERT INTO auth_clients (client) VALUES (?) ON CONFLICT (client) DO NOTHING")
        self.auth_read = d(
            "SELECT failures, since, in_flight, in_flight_until, locked_until,"
            f" {d.now} AS now FROM auth_clients WHERE client=?{d.for_update}"
        )
        self.auth_write = d(
            "UPDATE auth_clients SET failures=?, since=?, in_flight=?, in_flight_until=?, locked_until=? WHERE client=?"
        )
        self.auth_forget = d("DELETE FROM auth_clients WHERE client=?")
        # The record as it is, no row made nor locked: one primary-key read before each AUTH.
        self.auth_peek = d(
            "SELECT failures, since, in_flight, in_flight_until, locked_until,"
            f" {d.now} AS now FROM auth_clients WHERE client=?"
        )
        # Clients with nothing left to remember (a window over, no attempt in flight, no lockout): the counts of
        # addresses that stopped trying.
        self.auth_sweep = d(
            "DELETE FROM auth_clients WHERE (failures=0 OR since<=?) AND in_flight_until<=? AND locked_until<=?"
        )
        # -- console sessions signed out, refused by every process until their lifetime is over
        self.signout_write = d("INSERT INTO console_signouts (sid, until) VALUES (?, ?) ON CONFLICT (sid) DO NOTHING")
        self.signout_read = d("SELECT 1 FROM console_signouts WHERE sid=?")
        # Rows past their session's lifetime by more than `?` seconds of the database's clock (PostgreSQL
        # stores `until` moved onto it; SQLite's callers share its host's clock).
        self.signout_sweep = d(f"DELETE FROM console_signouts WHERE until<{d.now} - ?")
        # -- per-login quota counts shared by every process (gateway.core.quota does the arithmetic)
        self.quota_row = d(
            "INSERT INTO quota_counts (login, win, messages, bytes, expires) VALUES (?, ?, 0, 0, ?)"
            " ON CONFLICT (login, win) DO NOTHING"
        )
        self.quota_read = d(f"SELECT messages, bytes FROM quota_counts WHERE login=? AND win=?{d.for_update}")
        self.quota_add = d("UPDATE quota_counts SET messages=messages+?, bytes=bytes+? WHERE login=? AND win=?")
        # A login's windows that ended more than `?` seconds ago by the database's clock: not the caller's, so an
        # instance whose clock is ahead cannot drop the window one whose clock is behind still counts in
        # (PostgreSQL stores `expires` moved onto the database's clock; SQLite's callers share its host's).
        self.quota_expired = d(f"DELETE FROM quota_counts WHERE login=? AND expires<{d.now} - ?")
        # -- idempotency keys
        self.key_row = d(
            f"SELECT msg_id, reply_id, created, digest FROM idempotency WHERE account=? AND key=?{d.for_update}"
        )
        self.key_insert = d(
            "INSERT INTO idempotency (account, key, msg_id, created, expires, digest) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT (account, key) DO NOTHING RETURNING msg_id"
        )
        self.key_answered = d("UPDATE idempotency SET reply_id=msg_id WHERE account=? AND key=?")
        self.key_late = d(
            "INSERT INTO idempotency (account, key, msg_id, reply_id, created, expires, digest) VALUES (?,?,?,?,?,?,?)"
            " ON CONFLICT (account, key) DO NOTHING RETURNING msg_id"
        )
        self.key_take_over = d(
            "UPDATE idempotency SET msg_id=?, created=?, expires=?, digest=? WHERE account=? AND key=?"
        )
        self.key_drop = d("DELETE FROM idempotency WHERE account=? AND key=? AND msg_id=?")
        self.key_reply = d("UPDATE idempotency SET reply_id=? WHERE account=? AND key=? AND msg_id=?")
        self.stored = d("SELECT 1 FROM messages WHERE id=?")
        # -- operators
        self.counts = d("SELECT state, COUNT(*) AS n, MIN(created) AS oldest FROM messages GROUP BY state")
        self.waiting = d("SELECT account, COUNT(*) AS n FROM messages WHERE state!='dead' GROUP BY account")
        self.show = d("SELECT * FROM messages WHERE id=?")
        self.calls = d(f"SELECT {CALL_COLUMNS} FROM calls WHERE msg_id=? ORDER BY {d.call_order}")
        self.submission = d("SELECT submission FROM messages WHERE id=?")
        self.retry_now = d("UPDATE messages SET next_attempt=? WHERE id=? AND state='queued' RETURNING account")
        self.delete = d("DELETE FROM messages WHERE id=? AND state!='inflight'")
        # The row a delete is about, locked on PostgreSQL (a settle or claim of it waits, then finds it
        # gone), so the calls read after it are those the delete removes (QueueStore.delete).
        self.delete_lock = d(f"SELECT {_DELETED} FROM messages WHERE id=? AND state!='inflight'{d.for_update}")
        self.requeue = d(
            "UPDATE messages SET state='queued', next_attempt=?, expires=?, attempts=0, dead_reason=NULL,"
            " dead_at=NULL, internal_errors=0 WHERE id=? AND state='dead' RETURNING account"
        )
        self.requeue_calls = d("UPDATE calls SET state='pending', error=NULL WHERE msg_id=? AND state='rejected'")

    def claim(self, n: int) -> str:
        d = self.dialect
        return d(
            "UPDATE messages SET state='inflight', owner=?, lease_until=?, token=token+1"
            f" WHERE id{d.among(n)} RETURNING {_CLAIMED}"
        )

    def claimed_calls(self, n: int) -> str:
        d = self.dialect
        return d(f"SELECT msg_id, {CALL_COLUMNS} FROM calls WHERE msg_id{d.among(n)} ORDER BY msg_id, {d.call_order}")

    def claimed_blobs(self, n: int) -> str:
        d = self.dialect
        return d(f"SELECT msg_id, n, data FROM blobs WHERE msg_id{d.among(n)} ORDER BY msg_id, n, seq")

    def next_due(self, n: int) -> str:
        """When the first of `n` accounts' messages is due (its parameters: the accounts, twice). One part per
        state, so each reads its partial index (messages_due, messages_lease) and not every row of the table:
        the worker asks after every attempt for each account with room, however deep the others' backlogs
        (docs/development/benchmarks.md has the figures)."""
        d = self.dialect
        return d(
            "SELECT MIN(t) AS t FROM ("
            f"SELECT MIN(next_attempt) AS t FROM messages WHERE state='queued' AND account{d.among(n)}"
            " UNION ALL"
            f" SELECT MIN(COALESCE(lease_until, 0)) FROM messages WHERE state='inflight' AND account{d.among(n)}"
            ") AS due"
        )

    def auth_held_of(self, besides: int) -> str:
        """The clients held back now, for the operator's list: locked out first, then by their failures (the
        window is the caller's rules': a failure past it is filtered there); of the clients whose key starts
        with one prefix and with none of `besides` others (its parameters: auth_held_parameters). A scope's
        list read on its own: a flood of one scope's records would otherwise push another's past the limit."""
        d = self.dialect
        others = " AND client NOT LIKE ? ESCAPE '!'" * besides
        return d(
            "SELECT client, failures, since, in_flight, in_flight_until, locked_until,"
            f" {d.now} AS now FROM auth_clients WHERE (failures>0 OR locked_until>{d.now})"
            f" AND client LIKE ? ESCAPE '!'{others} ORDER BY locked_until DESC, failures DESC, client LIMIT ?"
        )

    def listing(self, n: int) -> str:
        d = self.dialect
        return d(f"SELECT {_LISTED} FROM messages m WHERE m.state{d.among(n)} ORDER BY m.seq LIMIT ?")


def starting(prefix: str) -> str:
    """A LIKE pattern (ESCAPE '!') of the keys that start with `prefix`."""
    return "".join(f"!{c}" if c in "!%_" else c for c in prefix) + "%"


def auth_held_parameters(limit: int, prefix: str, besides: Sequence[str]) -> tuple[Any, ...]:
    """Statements.auth_held_of's parameters."""
    return (starting(prefix), *(starting(b) for b in besides), limit)


FOR_SQLITE = Statements(SQLITE)
FOR_POSTGRES = Statements(POSTGRES)
