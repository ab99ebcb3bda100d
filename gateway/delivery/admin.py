"""Operator actions on queued messages (retry now, requeue, delete), each recorded in the message's ledger
record, and the selections they act on (by state, account, login, recipient domain, reason, age). One code
path for every way in: `smtp-gateway queue ...` and the console."""

from __future__ import annotations

import getpass
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.core.records import CallRow
from gateway.ledger import model
from gateway.ledger.model import MAX_LIMIT, Query, RecipientState
from gateway.ledger.recorder import Recorder, addresses
from gateway.ledger.store import LedgerStore, LedgerUnavailable
from gateway.queue.store import QueueStore

Action = Literal["retry", "requeue", "delete"]
ACTIONS: tuple[Action, ...] = ("retry", "requeue", "delete")
# Which messages each action can take (the store's own rule decides in the end: a message may change
# between a listing and the action).
ELIGIBLE: Mapping[Action, tuple[str, ...]] = {
    "retry": ("queued",),
    "requeue": ("dead",),
    "delete": ("queued", "dead"),
}
# The most messages one listing reads from the queue (oldest first) before filtering.
SCAN_LIMIT = 10_000
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class BadSelection(ValueError):
    """A filter that cannot be used; the text says which."""


def parse_age(text: str) -> float:
    """`90`, `90s`, `30m`, `2h`, `1.5d` -> seconds."""
    m = _AGE.match(text)
    if m is None:
        raise BadSelection(f"age: a number with s, m, h or d (30m, 2h, 1d), not {text[:20]!r}")
    return float(m[1]) * _UNITS[m[2]]


@dataclass(frozen=True, slots=True)
class Selection:
    """Which queued messages (`queue`: queued and in flight) or dead letters (`dead`): every filter given must
    match. `domain`: a recipient's domain (or a subdomain of it); `reason`: words in the last error or the
    dead letter's reason; `older_than`: seconds since the message was accepted."""

    dead: bool = False
    account: str | None = None
    login: str | None = None
    domain: str | None = None
    reason: str | None = None
    older_than: float | None = None

    @property
    def states(self) -> tuple[str, ...]:
        return ("dead",) if self.dead else ("queued", "inflight")

    def matches(self, item: QueueItem, now: float) -> bool:
        if self.account and item.account != self.account:
            return False
        if self.login and item.login != self.login:
            return False
        if self.older_than is not None and now - item.created < self.older_than:
            return False
        if self.reason and self.reason.lower() not in (item.reason or "").lower():
            return False
        if self.domain:
            wanted = self.domain.strip().lower().lstrip("@")
            domains = {a.rpartition("@")[2].lower() for a in item.recipients}
            if not any(d == wanted or d.endswith("." + wanted) for d in domains):
                return False
        return True

    def describe(self) -> str:
        parts = ["dead letters" if self.dead else "queued messages"]
        for name in ("account", "login", "domain", "reason"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name} {value}")
        if self.older_than is not None:
            parts.append(f"older than {self.older_than:g}s")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class QueueItem:
    """A listed message: the queue's row, with its login and recipients (from the ledger, else its calls)."""

    row: Mapping[str, Any]
    login: str | None = None
    recipients: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return str(self.row["id"])

    @property
    def state(self) -> str:
        return str(self.row["state"])

    @property
    def account(self) -> str:
        return str(self.row["account"])

    @property
    def created(self) -> float:
        return float(self.row["created"])

    @property
    def reason(self) -> str | None:
        value = self.row.get("dead_reason") if self.state == "dead" else self.row.get("last_error")
        return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Listing:
    items: list[QueueItem]
    scanned: int  # queue rows read
    truncated: bool  # the scan stopped at its limit: older matches may exist beyond it


@dataclass(slots=True)
class Results:
    """What one action did: the ids it changed, and those it left (not eligible any more, or unknown)."""

    action: Action
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def operator_name() -> str:
    """Who acts, as the timeline shows it: the local user at this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "operator"
    return f"{user}@{socket.gethostname()}"


def _calls(info: Mapping[str, Any]) -> list[CallRow]:
    return [
        CallRow(c["key"], c["recipients"], c["state"], c["upstream_id"], c["error"], c["lost"])
        for c in info.get("calls", [])
    ]


class QueueAdmin:
    """`ledger` records each action; `records` (the ledger's store) names each listed message's login and
    recipients."""

    def __init__(self, store: QueueStore, ledger: Recorder, records: LedgerStore | None = None) -> None:
        self.store = store
        self.ledger = ledger
        self.records = records

    async def select(self, selection: Selection, now: float, limit: int = 1000, scan: int = SCAN_LIMIT) -> Listing:
        """The messages `selection` matches, oldest first, at most `limit`, among the first `scan` of its
        states."""
        rows = await self.store.list(list(selection.states), limit=scan)
        items: list[QueueItem] = []
        for start in range(0, len(rows), MAX_LIMIT):
            for item in await self._items(rows[start : start + MAX_LIMIT]):
                if selection.matches(item, now):
                    items.append(item)
            if len(items) >= limit:
                break
        return Listing(items[:limit], len(rows), len(rows) >= scan)

    async def _items(self, rows: Sequence[Mapping[str, Any]]) -> list[QueueItem]:
        found: dict[str, model.Record] = {}
        if self.records is not None and rows:
            try:
                page = await self.records.find(Query(ids=tuple(r["id"] for r in rows), limit=MAX_LIMIT))
                found = {r.id: r for r in page.records}
            except LedgerUnavailable:
                found = {}
        items = []
        for row in rows:
            record = found.get(row["id"])
            if record is not None:
                items.append(QueueItem(row, record.login, tuple(r.address for r in record.recipients)))
                continue
            info = await self.store.show(row["id"])  # no ledger record: the recipients of its calls
            calls = _calls(info) if info is not None else []
            items.append(QueueItem(row, None, tuple(a for c in calls for a in addresses(c))))
        return items

    async def act(
        self,
        action: Action,
        ids: Sequence[str],
        now: float,
        max_lifetime: float,
        each: Callable[[str, bool], None] | None = None,
    ) -> Results:
        """One action on each of `ids`, in order, by the same rule as one at a time. `each(id, done)` is told
        of every id as soon as it is acted on: each id is its own transaction, so when a later one fails (a
        lock wait, an outage, Ctrl-C) the earlier ones are done, and the caller must still say and record
        them."""
        results = Results(action)
        for msg_id in ids:
            msg_id = msg_id.upper()
            if action == "retry":
                ok = await self.retry(msg_id, now)
            elif action == "requeue":
                ok = await self.requeue(msg_id, now, max_lifetime)
            else:
                ok = await self.delete(msg_id)
            (results.done if ok else results.skipped).append(msg_id)
            if each is not None:
                each(msg_id, ok)
        return results

    async def retry(self, msg_id: str, now: float) -> bool:
        """A queued message due now. False: unknown, in flight or dead (see requeue)."""
        info = await self.store.show(msg_id)
        if info is None or not await self.store.retry_now(msg_id, now):
            return False
        self.ledger.operator(
            msg_id=msg_id, created=info["created"], action=model.RETRIED, detail="made due now by an operator"
        )
        return True

    async def requeue(self, msg_id: str, now: float, max_lifetime: float) -> bool:
        """A dead letter back in the queue with a fresh lifetime; its refused calls are tried again."""
        info = await self.store.show(msg_id)
        if info is None or not await self.store.requeue(msg_id, now, max_lifetime):
            return False
        back: dict[str, tuple[RecipientState, str | None]] = {}
        for call in _calls(info):
            if call.state != "done":
                back.update({a: ("deferred", "requeued by an operator") for a in addresses(call)})
        self.ledger.operator(
            msg_id=msg_id,
            created=info["created"],
            action=model.REQUEUED,
            detail=f"dead letter requeued by an operator (was: {info.get('dead_reason')})",
            changed=back,
        )
        return True

    async def delete(self, msg_id: str) -> bool:
        """A queued message or dead letter deleted (not while its call runs): its unsent recipients are dead.

        The calls are those the store deleted, read in the delete's own transaction: a worker's attempt that
        settled just before (one call accepted) must not be recorded dead (`dead` outranks `sent`). A call
        whose answer was lost (`lost`) may have been sent: its recipients are dead too (nothing will retry
        them: `deferred` would say something will), with a reason saying the upstream may have them, and the
        timeline gets an `ambiguous` event for the call; events read back can still tell (readback)."""
        info = await self.store.delete(msg_id)
        if info is None:
            return False
        reason = model.DELETED_BY_OPERATOR
        gone: dict[str, tuple[RecipientState, str | None]] = {}
        unknown: list[CallRow] = []
        for call in _calls(info):
            if call.state == "done":
                continue
            if call.lost:
                unknown.append(call)
                gone.update({a: ("dead", model.DELETED_ANSWER_LOST) for a in addresses(call)})
            else:
                gone.update({a: ("dead", reason) for a in addresses(call)})
        self.ledger.operator(
            msg_id=msg_id,
            created=info["created"],
            action=model.DELETED,
            detail=reason,
            changed=gone,
            unknown=unknown,
        )
        return True
