"""The LedgerStore protocol: what every backend (SQLite, PostgreSQL; the queue's database) stores and finds.

Tables (gateway/queue/shared_schema.py, migrated with the queue's schema):

    ledger_messages    one row per message answered 250, by local id; reply_id, message_id, sender,
                       login, account and time are indexed for search
    ledger_recipients  one row per (message, recipient address in lower case): state, when it changed,
                       upstream id, call key, reason; indexed by address, upstream id and state
    ledger_events      the timeline: one row per event, under a stable id (written twice, stored once)

Writes come in batches (gateway/ledger/writer.py), each batch one transaction. A backend failure raises
LedgerUnavailable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.ledger.model import Page, Query, Record, Row, Tally


class LedgerUnavailable(Exception):
    """The ledger's database cannot be used now; `reason` says why (for the log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LedgerStore(Protocol):
    url: str  # where it is, for logs; never with a password

    async def open(self) -> None:
        """Connect and apply pending schema migrations (the queue's: the ledger's tables are among them)."""
        ...

    async def close(self) -> None: ...

    async def write(self, rows: Sequence[Row]) -> None:
        """Store the rows in one transaction, in order: messages and recipients are upserted (a recipient
        keeps the later state), events inserted once by id. Idempotent: a batch written again changes nothing."""
        ...

    async def get(self, msg_id: str) -> Record | None:
        """The whole record of the message with this local id: recipients, timeline and request."""
        ...

    async def find(self, query: Query) -> Page:
        """Records matching every filter, newest first, without their timelines and requests."""
        ...

    async def tally(self, since: float) -> Tally:
        """Messages accepted since `since` by account and login, and their recipients by state."""
        ...

    async def prune(self, before: float, limit: int) -> int:
        """Delete up to `limit` messages accepted before `before` (with their recipients and events, and
        rows of messages whose own row never arrived); returns how many messages' rows went."""
        ...
