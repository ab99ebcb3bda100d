"""The QueueStore protocol: what every queue backend (SQLite, PostgreSQL) stores, and nothing it decides.

    messages.state  queued    waiting for next_attempt; any instance may claim it
                    inflight  claimed: `owner` holds a lease until `lease_until`; `token` changed on the
                              claim, and a write under an older token changes nothing (fencing)
                    dead      dead letter; dead_reason says why
    blobs           the base64 text of each large attachment, in chunks (the record refers to them by number)
    calls.state     pending   not sent yet, or sent and failed (safe or ambiguous: `lost` counts the
                              times its answer was lost after sending)
                    sending   the owner is sending it now: if the lease expires, it is ambiguous
                    done      accepted by the upstream (upstream_id): never sent again
                    rejected  refused for good (error)

A delivered message is deleted. Decisions (what state comes next) are made above the store, by
gateway/delivery/transition.py; the store applies them atomically and only under the caller's token.

Times (`now`, lease ends, due times, a claimed message's expires) are epoch seconds of the caller's clock, in
and out. SQLite stores them as they are (one host, one clock). PostgreSQL, shared by instances on several hosts,
stores and compares them on the database's clock: each is moved by the database's clock minus this host's, read
in the same transaction (gateway/queue/postgres.py), so a skewed host neither takes over live leases nor sends
retries early or late. A message's `created` is not one of them: it is the label of the message's acceptance,
the accepting instance's clock as it wrote it, which every ledger row of the message carries (shared_schema.LEDGER)
whichever instance or operator writes it; it is stored and handed back unchanged on both backends, and only ages
(counts' oldest_age, an operator's older_than) are taken from it, on the reader's clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from gateway.core import authcount
from gateway.core.authcount import Record, Rules
from gateway.core.errors import QueueUnreachable
from gateway.core.quota import Counts, Verdict, Window
from gateway.core.records import CallRow, Decision, DeliveryState
from gateway.core.storable import storable, storable_decision
from gateway.queue.health import QueueHealth


class CommitUnknown(QueueUnreachable):
    """The COMMIT was sent and its answer lost (the connection cut after it went: a failover, a proxy restarted,
    a network cut): the transaction may or may not have committed. Not a failure before the commit, which
    wrote nothing: the caller of a write whose outcome matters asks the queue before it answers. `xid`: the
    transaction's id when the backend told it before the COMMIT (PostgreSQL's insert), for `commit_state`: a
    row not seen yet may belong to a COMMIT still finishing (waiting for a synchronous standby), so its
    absence alone does not say the write failed."""

    def __init__(self, reason: str, xid: int | None = None) -> None:
        super().__init__(reason)
        self.xid = xid


class QueueDataRefused(Exception):
    """The queue's database refused what was written (a value it cannot hold): a bug, not an outage. Never a
    SpoolUnavailable, which callers retry: the same write would be refused again, every lease, for ever."""


@dataclass(frozen=True, slots=True)
class NewMessage:
    id: str
    account: str
    mail_from: str
    subject: str
    submission: bytes
    decision: Decision  # its state after the inline attempt ("queued", "dead"); or:
    inflight_owner: str | None = None  # set: stored in flight, leased to this owner (the call still runs)
    lease_until: float = 0.0
    created: float = 0.0
    expires: float = 0.0
    idempotency_key: str | None = None
    blobs: Sequence[bytes | memoryview] = ()  # the large attachments the submission refers to (codec.encode)
    # What a notice about it needs beyond the submission (gateway/ledger/notice.py `queued`), stored in the
    # same row: an instance that claims it rebuilds the ledger record's notice data from it if the accepting
    # instance died before writing the record (notice.NOBODY when nobody would be told). None: not kept.
    notice: str | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message leased to one owner. `reaped`: its previous owner's lease had expired."""

    id: str
    account: str
    token: int
    submission: bytes
    before: DeliveryState
    reaped: bool = False
    blobs: Sequence[bytes] = ()
    notice: str | None = None  # NewMessage.notice as stored (None too for rows stored before it was kept)


@dataclass(frozen=True, slots=True)
class KeyHit:
    """A resend: the idempotency key was seen before. `reply_id` is None while the first copy is in progress."""

    msg_id: str
    reply_id: str | None
    digest: str | None = None  # what the first message said (None: stored before digests were kept)


@dataclass(frozen=True, slots=True)
class KeyTakenOver:
    """The key was this message's to take: an earlier message claimed it, never answered within `stale`
    and was never queued (its process died, most likely after its calls went out and before its answer was
    recorded). The new message has the key now and is sent: a duplicate if the first one's calls were out."""

    msg_id: str  # the earlier message, whose claim went stale


class QueueStore(Protocol):
    """Async. Every method raises gateway.core.errors.SpoolUnavailable when the backend cannot be used."""

    url: str  # where it is, for logs ("sqlite:///var/spool.sqlite3"); never with a password
    health: QueueHealth  # recent failures to store a message, the disk reserve: for /readyz

    async def open(self) -> None:
        """Connect and apply pending schema migrations."""
        ...

    async def close(self) -> None: ...

    async def migrate(self) -> tuple[int, int]:
        """Apply pending migrations (opening does it too); returns (version found on opening, version now)."""
        ...

    # -- the server's side --------------------------------------------------------------------------

    async def insert(self, message: NewMessage) -> int:
        """Store a new message with its calls, durably (fsync'd / committed) before returning its token."""
        ...

    async def claim(self, owner: str, account: str, now: float, limit: int, lease: float) -> list[Claimed]:
        """Lease up to `limit` messages of `account`: due queued ones first, then inflight ones whose lease
        expired (reaped). Each claim changes the message's token. Never claims one message twice."""
        ...

    async def mark_sending(self, msg_id: str, token: int, keys: Sequence[str], lease_past: float | None = None) -> bool:
        """The owner is about to send these calls. False (nothing marked): the token is stale (another owner
        has it), or, given `lease_past`, the lease ends before then (its owner was paused past it: the
        message may be claimed by another any moment). The fencing check before every call."""
        ...

    async def settle(self, msg_id: str, token: int, decision: Decision, now: float) -> bool:
        """Apply an attempt's decision: delete (delivered), queue again or dead-letter. False: stale token."""
        ...

    async def token_of(self, msg_id: str) -> int | None:
        """The message's fencing token now; None: no such message. What tells a write whose COMMIT's answer was
        lost (CommitUnknown) from one that failed: an insert landed when its row is there with the token it
        wrote (1 in flight, 0 queued); a settle that deletes (delivered) landed when the row is gone."""
        ...

    async def commit_state(self, xid: int) -> str | None:
        """What became of the transaction `xid` (CommitUnknown.xid): "committed" (and seen by every statement
        begun from now: its rows, unless changed since, are there), "aborted" (nothing it wrote exists, for
        good), "in progress" (running, or committed but not yet visible to others: a COMMIT waiting for a
        synchronous standby; ask again) or None (the backend cannot tell: too old for its commit log, or no
        transaction ids, as SQLite, whose COMMIT is local and never unknown)."""
        ...

    async def withdraw(self, msg_id: str, token: int) -> str:
        """Delete a message that still carries `token` (nobody claimed it since), with its calls and body: one
        whose insert's outcome was unknown and whose client was answered 452. "withdrawn" (deleted), "absent"
        (no such message: the insert never landed, or an earlier withdraw did) or "claimed" (another token:
        claimed since, it may be sent; left alone)."""
        ...

    async def release(self, msg_id: str, token: int, now: float) -> bool:
        """Give a claimed message back unattempted (shutting down): queued, due now."""
        ...

    async def renew(self, owner: str, lease_until: float) -> int:
        """Extend every lease `owner` holds (its heartbeat). Returns how many."""
        ...

    async def expire_owners(self, owners: Sequence[str], now: float) -> int:
        """End the leases of owners known to be dead (same host, process gone) so they are reaped now. Returns
        how many leases it ended (leases already over are not counted again)."""
        ...

    async def owners(self) -> list[str]:
        """Owners holding leases now."""
        ...

    async def next_due(self, accounts: Sequence[str]) -> float | None:
        """When the next queued message of these accounts is due (or an inflight lease expires)."""
        ...

    async def wake(self, account: str, now: float, limit: int | None = None) -> int:
        """Make queued messages of `account` due now, oldest first (the upstream is answering again; or
        `limit=1`: a probe of an upstream that is down). Claims then take them oldest first."""
        ...

    async def listen(self, wake: Callable[[str], None]) -> None:
        """Call `wake(account)` when another instance makes a message of `account` due; runs until
        cancelled. Backends without notifications return at once (the worker polls)."""
        ...

    # -- rate limits shared by every instance on this queue ---------------------------------------------

    async def rate_slots(
        self, account: str, count: int, interval: float, burst: int, recovery: float = 30.0
    ) -> list[float]:
        """Take `account`'s next `count` call slots of a token bucket at once (gateway.core.tokenbucket: one
        call per `interval`, `burst` at once, the interval stretched for `recovery` seconds after a 429);
        returns the seconds to wait for each, in order."""
        ...

    async def rate_pause(self, account: str, seconds: float, slow_for: float) -> None:
        """No slot for `seconds` (the upstream's Retry-After), then a slower rate for `slow_for` seconds
        (half at first, recovering linearly: give rate_slots the same `recovery`)."""
        ...

    # -- AUTH counts shared by every process and instance on this queue ----------------------------------

    async def auth_begin(self, client: str, rules: Rules) -> tuple[Record, authcount.Verdict, float]:
        """An AUTH attempt of `client` starts (gateway.core.authcount.begin, under the record's lock): the
        record after it, the verdict, and the store's clock."""
        ...

    async def auth_end(self, client: str, rules: Rules, failed: bool, in_flight: bool) -> tuple[Record, bool, float]:
        """An AUTH attempt of `client` ended (authcount.end): the record after it, whether its failure started a
        lockout, and the store's clock."""
        ...

    async def auth_lift(self, client: str, rules: Rules) -> bool:
        """Forget `client`'s failures and lockout (an operator's decision): its record is deleted, so every
        process sees the lift at its next auth_peek. False: nothing was held."""
        ...

    async def auth_peek(self, client: str) -> tuple[Record, float] | None:
        """`client`'s record as it is (one read, nothing locked or written) and the store's clock; None: the
        store holds nothing against it."""
        ...

    async def auth_held(
        self, limit: int, *, prefix: str = "", besides: Sequence[str] = ()
    ) -> list[tuple[str, Record, float]]:
        """At most `limit` clients with failures or a lockout (locked out first), each with its record and the
        store's clock: what every process and instance holds against them (one read, nothing locked). Only the
        keys that start with `prefix` and with none of `besides` (one scope's: limits.clients.ScopedLedger)."""
        ...

    # -- console sign-outs shared by every instance on this queue ------------------------------------------

    async def session_revoke(self, sid: str, until: float) -> None:
        """Record the console session `sid` as signed out until `until` (on the caller's clock: when its
        lifetime ends anyway, its cookie refused everywhere by then), for every process and instance and after
        a restart. The rows whose time is over are deleted here (the table grows only by sign-outs) and at the
        AUTH sweep."""
        ...

    async def session_revoked(self, sid: str) -> bool:
        """Whether the console session `sid` was signed out (one primary-key read, nothing written)."""
        ...

    # -- per-login quotas shared by every instance on this queue -----------------------------------------

    async def quota_take(self, login: str, windows: Sequence[Window], size: int) -> tuple[Verdict, dict[str, Counts]]:
        """Count one message of `size` bytes against `login`'s `windows` if it fits them all (gateway.core.quota),
        atomically; returns the verdict and the windows' counts (with the message, when it was counted)."""
        ...

    async def quota_return(self, login: str, windows: Sequence[Window], size: int) -> None:
        """Take back a message quota_take counted (it was not accepted after all)."""
        ...

    async def quota_counts(self, login: str, windows: Sequence[Window]) -> dict[str, Counts]:
        """The windows' counts now."""
        ...

    # -- idempotency keys (resends are not sent twice) --------------------------------------------------

    async def claim_key(
        self, account: str, key: str, msg_id: str, now: float, window: float, stale: float, digest: str | None = None
    ) -> KeyHit | KeyTakenOver | None:
        """Record `key` (with the message's `digest`) for a new message (None); if it is already known
        within `window`, the earlier one.

        A key still unanswered after `stale` seconds belongs to an attempt whose process died: if its
        message is in the queue it was accepted (the hit carries that message's id); otherwise the new
        message takes the key over (KeyTakenOver names the earlier message)."""
        ...

    async def finish_key(self, account: str, key: str, msg_id: str, reply_id: str | None) -> None:
        """The message answered (reply_id: the id its 250 carried) or was refused (None: forget the key)."""
        ...

    async def record_key(
        self, account: str, key: str, msg_id: str, reply_id: str, created: float, expires: float, digest: str | None
    ) -> bool:
        """A key whose message answered while the queue could not record it (claim_key failed): record it
        now, answered. False when the key was taken meanwhile (by another instance): that one stays."""
        ...

    # -- operators (smtp-gateway queue ...) -------------------------------------------------------------

    async def counts(self, now: float) -> dict[str, dict[str, Any]]: ...

    async def clock_offset(self) -> float | None:
        """This host's clock minus the queue database's, in seconds; None when the database has no clock of
        its own (SQLite, on this host)."""
        ...

    async def waiting(self) -> dict[str, int]:
        """Account -> its messages not yet delivered or dead (queued or in flight)."""
        ...

    async def list(self, states: Sequence[str], limit: int = 1000) -> list[dict[str, Any]]: ...

    async def show(self, msg_id: str) -> dict[str, Any] | None: ...

    async def submission(self, msg_id: str) -> bytes | None: ...

    async def retry_now(self, msg_id: str, now: float) -> bool: ...

    async def delete(self, msg_id: str) -> dict[str, Any] | None:
        """Delete a queued message or dead letter (not while its call runs). Returns it as `show` does, its
        calls read in the delete's own transaction (what the ledger is told must be what was deleted, not
        what a read before it saw: a settle may land in between); None when nothing was deleted."""
        ...

    async def requeue(self, msg_id: str, now: float, max_lifetime: float) -> bool: ...


# A new message's row of the messages table, the same for both backends (gateway/queue/sql.py).
MESSAGE_COLUMNS = (
    "id, account, state, created, expires, next_attempt, attempts, mail_from, subject, size,"
    " last_error, dead_reason, dead_at, owner, lease_until, token, internal_errors, idem_key,"
    " notice, submission"
)
CALL_COLUMNS = "key, recipients, state, upstream_id, error, lost"
MESSAGE_VALUES = MESSAGE_COLUMNS.count(",") + 1


class MessageRow(NamedTuple):
    state: str  # queued, inflight (stored leased to its owner) or dead
    token: int  # the fencing token: 1 when stored in flight
    values: tuple[Any, ...]  # in MESSAGE_COLUMNS order


def storable_message(m: NewMessage) -> NewMessage:
    """The message as every backend stores it: its envelope, Subject and decision's texts with no NUL (which
    PostgreSQL refuses; gateway.core.storable). Each backend's insert starts here, each settle with
    storable_decision."""
    return replace(
        m, mail_from=storable(m.mail_from), subject=storable(m.subject), decision=storable_decision(m.decision)
    )


def message_row(m: NewMessage, shift: float = 0.0) -> MessageRow:
    """A new message's row of the messages table, `shift` seconds added to each of its times (PostgreSQL: the
    caller's clock onto the database's; SQLite: 0, this host's clock is the one clock) but `created`, the
    acceptance's label as the ledger has it (the module's docstring)."""
    d = m.decision
    inflight = m.inflight_owner is not None
    state = "inflight" if inflight else ("dead" if d.verdict == "dead" else "queued")
    token = 1 if inflight else 0
    return MessageRow(
        state,
        token,
        (
            m.id,
            m.account,
            state,
            m.created,
            m.expires + shift,
            d.next_attempt + shift,
            d.attempts,
            m.mail_from,
            m.subject,
            len(m.submission),
            d.last_error,
            d.dead_reason,
            m.created + shift if state == "dead" else None,
            m.inflight_owner,
            m.lease_until + shift if inflight else None,
            token,
            d.internal_errors,
            m.idempotency_key,
            m.notice,
            m.submission,
        ),
    )


# How often a process sweeps the shared AUTH counts of clients that stopped trying (seconds).
# Messages one wake makes due per transaction: an account's whole backlog (a million after a long outage) in
# one UPDATE would hold SQLite's writer lock for seconds, or pass PostgreSQL's statement bound and be undone.
WAKE_BATCH = 5000


async def woken_in_batches(wake: Callable[[int], Awaitable[int]]) -> int:
    """An unlimited wake, WAKE_BATCH at a time (each batch makes its messages due, so the next one reads the
    rest): how many were made due."""
    total = 0
    while True:
        woken = await wake(WAKE_BATCH)
        total += woken
        if woken < WAKE_BATCH:
            return total


AUTH_SWEEP_EVERY = 60.0
# A sign-out's row is kept this long past its session's lifetime (on the store's clock: PostgreSQL moves the
# signing-out instance's `until` onto the database's): an instance whose clock is behind that instance's by
# less than this still refuses the cookie until its own clock says the lifetime is over.
SIGNOUT_KEPT_PAST = 300.0
AuthChange = Callable[[Record, float], tuple[Record, Any]]


def auth_read(row: Any) -> tuple[Record, float]:
    """A row of auth_clients (read with the store's clock as `now`): the record, and that clock."""
    record = Record(
        int(row["failures"]),
        float(row["since"]),
        int(row["in_flight"]),
        float(row["in_flight_until"]),
        float(row["locked_until"]),
    )
    return record, float(row["now"])


def auth_written(client: str, r: Record) -> tuple[Any, ...]:
    """The parameters of auth_write for `r`."""
    return (r.failures, r.since, r.in_flight, r.in_flight_until, r.locked_until, client)


def auth_begin_change(rules: Rules) -> AuthChange:
    return lambda r, now: authcount.begin(r, now, rules)


def auth_end_change(rules: Rules, failed: bool, in_flight: bool) -> AuthChange:
    return lambda r, now: authcount.end(r, now, rules, failed=failed, in_flight=in_flight)


def auth_lift_change(r: Record, now: float) -> tuple[Record, bool]:
    return authcount.NEW, not r.clean()


CHUNK = 1 << 20


def chunks(msg_id: str, blobs: Sequence[bytes | memoryview]) -> Iterator[tuple[str, int, int, memoryview]]:
    """Rows of the blobs table: each blob cut in CHUNK-sized slices (views, not copies)."""
    for n, blob in enumerate(blobs):
        view = memoryview(blob)
        for seq, start in enumerate(range(0, max(len(view), 1), CHUNK)):
            yield msg_id, n, seq, view[start : start + CHUNK]


class ClaimedRows:
    """A claim's rows read back into Claimed messages, the same for both backends: the claimed messages
    (`updated`, with id, seq, token, submission, attempts, created, expires, internal_errors, notice), then their
    calls and their blob chunks in order, one row at a time (a blob's chunks are never all in memory
    beside the blob)."""

    def __init__(self, account: str, reaped: dict[str, bool], updated: Sequence[Any]) -> None:
        self._account, self._reaped, self._updated = account, reaped, updated
        self._calls: dict[str, dict[str, CallRow]] = {r["id"]: {} for r in updated}
        self._blobs: dict[str, list[bytearray]] = {r["id"]: [] for r in updated}

    def call(self, c: Any) -> None:
        self._calls[c["msg_id"]][c["key"]] = CallRow(
            c["key"], c["recipients"], c["state"], c["upstream_id"], c["error"], c["lost"]
        )

    def blob_chunk(self, row: Any) -> None:
        parts = self._blobs[row["msg_id"]]
        if row["n"] == len(parts):
            parts.append(bytearray())
        parts[row["n"]] += row["data"]

    def claimed(self) -> list[Claimed]:
        """Due messages first, then reaped ones, each in the order they were stored."""
        reaped = self._reaped
        return [
            Claimed(
                m["id"],
                self._account,
                m["token"],
                bytes(m["submission"]),
                DeliveryState(self._calls[m["id"]], m["attempts"], m["created"], m["expires"], m["internal_errors"]),
                reaped=reaped[m["id"]],
                blobs=self._blobs[m["id"]],  # type: ignore[arg-type]  # bytearray serves where bytes are read
                notice=m["notice"],
            )
            for m in sorted(self._updated, key=lambda m: (reaped[m["id"]], m["seq"]))
        ]
