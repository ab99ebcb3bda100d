"""The ReturnStore protocol: what the return path keeps in the queue's database beside the ledger (the same
backends, the same connection), shared by every instance on one queue.

    event_cursors   one row per account's event poll (and per DMDS invalid-contacts list): how far it has
                    read (`position`), the window and page under way, leased to one instance at a time
                    with a fencing token, as a queue row is
    suppressions    per account, the addresses refused at RCPT TO, with reason, source and time
    webhook_outbox  one delivery per (webhook, event id), written in the transaction of the event it
                    announces; leased while it is POSTed; pending -> sending -> delivered | failed
    ledger_notices  one notice decision per (message, recipient), written with what made the recipient fail:
                    pending -> claimed (leased) -> sent | skipped | failed
    notice_tally    notices per account, sender address, window length and window start (the per-sender
                    limit), each row pruned once its own window has ended
    notice_counted  each notice counted, by its idempotency key: a decision taken over counts it once

Every method raises LedgerUnavailable when the database cannot be used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.ledger.model import Record, Row, SuppressionRow, address_key


@dataclass(frozen=True, slots=True)
class Lease:
    """An event cursor leased to this instance: where to read from, and the window and page under way
    (None: none, a new window starts at `position`)."""

    name: str
    token: int
    position: float
    window_since: float | None = None
    window_until: float | None = None
    page: int = 0


@dataclass(frozen=True, slots=True)
class Match:
    """A recipient the gateway sent, as an upstream event about it finds it (with its message's fields)."""

    msg_id: str
    created: float
    address: str
    rcpt: str
    state: str
    state_at: float
    upstream_id: str | None
    account: str | None = None
    mail_from: str | None = None
    message_id: str | None = None
    subject: str | None = None
    login: str | None = None
    reply_id: str | None = None
    # Its call's answer was lost (match_lost): no upstream id is known, an event finds it by address and time.
    lost: bool = False


@dataclass(frozen=True, slots=True)
class Suppressed:
    account: str
    address: str
    reason: str
    source: str
    created: float
    msg_id: str | None = None
    detail: str | None = None

    @classmethod
    def of(cls, row: SuppressionRow) -> Suppressed:
        return cls(row.account, address_key(row.address), row.reason, row.source, row.created, row.msg_id, row.detail)

    def to_json(self) -> dict[str, Any]:
        from gateway.ledger.model import iso

        return {
            "account": self.account,
            "address": self.address,
            "reason": self.reason,
            "source": self.source,
            "created": iso(self.created),
            "msg_id": self.msg_id,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    """A webhook delivery leased to this instance. `reclaimed`: a previous owner's lease expired while it was
    POSTing (it may have been received: the at-least-once window)."""

    webhook: str
    event_id: str
    msg_id: str
    created: float
    enqueued: float
    type: str
    body: str
    attempts: int
    token: int
    reclaimed: bool = False

    @classmethod
    def of(cls, row: Sequence[Any], *, reclaimed: bool) -> Delivery:
        """From a leased outbox row (webhook, event_id, msg_id, created, enqueued, type, body, attempts, token)."""
        webhook, event_id, msg_id, created, enqueued, type_, body, attempts, token = row
        return cls(webhook, event_id, msg_id, created, enqueued, type_, body, attempts, token, reclaimed)


# How long a counted notice's key is kept after its window ended: a decision taken over later than that
# (its lease long gone) would count its notice again.
COUNTED_KEPT = 86400.0


@dataclass(frozen=True, slots=True)
class Claim:
    """A notice decision leased to this instance."""

    msg_id: str
    rcpt: str
    token: int


class ReturnStore(Protocol):
    # -- event cursors ------------------------------------------------------------------------------------

    async def lease_cursor(
        self, name: str, account: str, owner: str, now: float, lease: float, start: float
    ) -> tuple[Lease | None, float]:
        """Lease the cursor `name` (made at `start` on first use) unless another owner's lease runs; returns
        the lease (None: busy) and the cursor's position."""
        ...

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
        """Write `rows` and the window's progress (the next page to read) in one transaction, if the lease
        is still ours (None: fenced, nothing written); the lease is renewed. Returns the rows written: all of
        them but the suppressions of events read before (readback.unread)."""
        ...

    async def complete(self, name: str, token: int, position: float, now: float, lease: float) -> bool:
        """The window up to `position` is read: the next one starts there (minus the overlap)."""
        ...

    async def release(self, name: str, token: int) -> None: ...

    async def cursors(self) -> list[dict[str, Any]]: ...

    # -- matching -----------------------------------------------------------------------------------------

    async def match_ids(self, upstream_ids: Sequence[str]) -> list[Match]:
        """Every recipient sent under one of these upstream ids."""
        ...

    async def match_addresses(self, addresses: Sequence[str], since: float) -> list[Match]:
        """Recipients sent to these addresses since `since` (events that name no upstream id)."""
        ...

    async def match_lost(self, addresses: Sequence[str], since: float) -> list[Match]:
        """Recipients at these addresses accepted since `since` whose call's answer was lost and that nothing
        settled since (no upstream id learnt; `accepted`, `deferred` or `dead`): `lost` matches."""
        ...

    # -- suppressions -------------------------------------------------------------------------------------

    async def suppressions(self, account: str | None = None) -> list[Suppressed]: ...

    async def suppress(self, rows: Sequence[SuppressionRow]) -> None:
        """Add entries (an address already listed keeps its first entry)."""
        ...

    async def unsuppress(self, address: str, account: str | None = None) -> int:
        """Remove an address (from one account's list, or every one); returns how many entries went."""
        ...

    async def sync_source(
        self,
        account: str,
        source: str,
        rows: Sequence[SuppressionRow],
        lifted: Sequence[str] = (),
        read_at: float = 0.0,
    ) -> tuple[list[str], list[str]]:
        """Make `source`'s entries of `account` exactly `rows` (a list read whole from the vendor): returns the
        addresses added and removed. Entries of the `lifted` sources made before `read_at` (when the list was
        read) whose address `rows` does not hold are removed too (what the list's state caused: DMDS'
        `Not-Sent`); a later one may be newer than the list. Other sources' entries are left alone."""
        ...

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
        """Lease up to `limit` deliveries: due pending ones, then those whose owner's lease expired. `room`: at
        most so many more of each webhook it names (each read on its own, so that one webhook's queue cannot
        crowd another's out), `limit` in all; besides those, up to `removed` (None: `limit`) of the webhooks it
        does not name (removed ones: they end without a POST, so they never wait for the named ones' backlog;
        an empty `room` reads only those)."""
        ...

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
        """`state`: delivered, failed (for good) or pending (again at `next_attempt`), with `rows` (the timeline
        event) in the same transaction, under the lease's token (False: fenced)."""
        ...

    async def pending_deliveries(self) -> dict[str, int]:
        """Deliveries not yet made (pending or being POSTed), by webhook."""
        ...

    # -- notices ------------------------------------------------------------------------------------------

    async def claim_notices(self, owner: str, now: float, lease: float, limit: int) -> list[Claim]:
        """Take up to `limit` decisions to make: pending ones, then those whose owner's lease expired (it stopped
        before deciding)."""
        ...

    async def finish_notices(
        self,
        claims: Sequence[Claim],
        state: str,
        now: float,
        notice_id: str | None,
        reason: str | None,
        rows: Sequence[Row],
    ) -> int:
        """Record the decision (sent, skipped, failed) of claims still ours, with `rows`, in one transaction."""
        ...

    async def postpone_notices(self, claims: Sequence[Claim], until: float, reason: str) -> None:
        """Keep the claims and look at them again at `until` (a notice that could not be handed over now)."""
        ...

    async def notice_data(self, msg_id: str) -> tuple[Record, str | None] | None:
        """The message's record and its notice data (JSON text, None when it has none)."""
        ...

    async def count_notice(self, key: str, account: str, sender: str, window: float, limit: int, now: float) -> bool:
        """Count the notice `key` to `sender` in `account`'s current window (`window` seconds long) if fewer
        than `limit` were; False: the limit. True without counting again when `key` was counted already (a
        decision taken over after its notice was handed to the queue: the notice counts once)."""
        ...

    async def uncount_notice(self, key: str) -> None:
        """Give back the count `count_notice` took for `key` (the notice was not handed over: a 4xx)."""
        ...

    async def notice_counted(self, key: str, now: float) -> bool:
        """Whether the notice `key` was counted (and so handed to the queue) and its mark still kept."""
        ...

    # -- leases of owners that are gone -------------------------------------------------------------------

    async def owners(self) -> list[str]:
        """Owners holding leases (cursors, webhook deliveries being POSTed, notice decisions)."""
        ...

    async def expire_owners(self, owners: Sequence[str], now: float) -> int:
        """End the leases of owners known to be dead, so that others take over now; returns how many."""
        ...
