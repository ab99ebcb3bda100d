"""The suppression lists as RCPT TO checks them: an in-memory copy of the queue database's lists, reloaded
every `return_path.suppression_refresh` seconds off the SMTP path (a reload swaps the whole copy at once), so a
check is a dict lookup and never waits for the database. Entries this instance adds or removes apply at once,
and a reload under way does not undo them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import structlog

from gateway.core.waits import idle
from gateway.ledger.model import address_key, suppression_replaces
from gateway.ledger.returns import ReturnStore, Suppressed
from gateway.ledger.store import LedgerUnavailable
from gateway.ops.metrics import SUPPRESSIONS

log = structlog.get_logger("gateway.ledger")
# A change made while a reload reads: entries added, or (address key, account or None) removed.
Change = tuple[list[Suppressed], str | None, str | None]


def _slim(e: Suppressed, shared: dict[str, str]) -> Suppressed:
    """What RCPT TO answers from (source, reason, date), its repeated strings one object each: a database read
    makes a new string per row, and a list of tens of thousands of entries has few reasons. The message id and
    the detail stay in the database (pages and the API read them there): a third of the memory per entry."""
    return Suppressed(
        shared.setdefault(e.account, e.account),
        e.address,
        shared.setdefault(e.reason, e.reason),
        shared.setdefault(e.source, e.source),
        e.created,
    )


class SuppressionSet:
    def __init__(self) -> None:
        self._lists: dict[str, dict[str, Suppressed]] = {}  # account -> address key -> entry
        self.loaded_at: float | None = None
        # While a reload reads the database, what this instance adds or removes is also noted here and
        # applied again to what was read: the read may have begun before it was written.
        self._during: list[list[Change]] = []  # one log per reload under way

    def check(self, account: str, address: str) -> Suppressed | None:
        entries = self._lists.get(account)
        return entries.get(address_key(address)) if entries else None

    def replace(self, entries: Iterable[Suppressed]) -> None:
        lists: dict[str, dict[str, Suppressed]] = {}
        shared: dict[str, str] = {}
        for e in entries:
            lists.setdefault(e.account, {}).setdefault(e.address, _slim(e, shared))
        self._lists = lists
        self._count()

    def add(self, entries: Iterable[Suppressed]) -> None:
        added = list(entries)
        self._add(added)
        for log_ in self._during:
            log_.append((added, None, None))
        self._count()

    def remove(self, address: str, account: str | None = None) -> None:
        key = address_key(address)
        self._remove(key, account)
        for log_ in self._during:
            log_.append(([], key, account))
        self._count()

    def _add(self, entries: Iterable[Suppressed]) -> None:
        """The first entry of an address is kept, but one only the invalid list made is replaced (as the
        database's upsert does), so the copy answers as the database will whichever was added first."""
        shared: dict[str, str] = {}
        for e in entries:
            held = self._lists.setdefault(e.account, {})
            key = address_key(e.address)
            old = held.get(key)
            if old is None or suppression_replaces(e.source, old.source):
                held[key] = _slim(e, shared)

    def _remove(self, key: str, account: str | None) -> None:
        for name, entries in self._lists.items():
            if account is None or name == account:
                entries.pop(key, None)

    def counts(self) -> dict[str, int]:
        return {account: len(entries) for account, entries in self._lists.items()}

    def _count(self) -> None:
        for account, entries in self._lists.items():
            SUPPRESSIONS.labels(account=account).set(len(entries))

    async def refresh(self, store: ReturnStore) -> None:
        """Reload the whole copy (LedgerUnavailable: the old copy stays). What this instance added or removed
        while the database was read applies on top of what was read."""
        during: list[Change] = []
        self._during.append(during)
        try:
            loaded = await store.suppressions()
        finally:
            self._during = [d for d in self._during if d is not during]
        self.replace(loaded)
        for added, key, account in during:
            if key is None:
                self._add(added)
            else:
                self._remove(key, account)
        self._count()
        self.loaded_at = time.time()

    async def run(self, store: ReturnStore, every: Callable[[], float]) -> None:
        """Reload now and then every `every()` seconds, until cancelled; a failure keeps the copy (said once)."""
        failing = False
        while True:
            try:
                await self.refresh(store)
            except LedgerUnavailable as exc:
                if not failing:
                    log.warning("suppressions_refresh_failed", error=exc.reason, kept=sum(self.counts().values()))
                failing = True
            else:
                if failing:
                    log.info("suppressions_refresh_recovered", entries=sum(self.counts().values()))
                failing = False
            await idle(every())
