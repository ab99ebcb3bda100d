"""The suppression lists as RCPT TO checks them: an in-memory copy of the queue database's lists, reloaded
every `return_path.suppression_refresh` seconds off the SMTP path (a reload swaps the whole copy at once), so a
check is a dict lookup and never waits for the database. Entries this instance adds or removes apply at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import structlog

from gateway.ledger.model import address_key
from gateway.ledger.returns import ReturnStore, Suppressed
from gateway.ledger.store import LedgerUnavailable
from gateway.ops.metrics import SUPPRESSIONS

log = structlog.get_logger("gateway.ledger")


class SuppressionSet:
    def __init__(self) -> None:
        self._lists: dict[str, dict[str, Suppressed]] = {}  # account -> address key -> entry
        self.loaded_at: float | None = None

    def check(self, account: str, address: str) -> Suppressed | None:
        entries = self._lists.get(account)
        return entries.get(address_key(address)) if entries else None

    def replace(self, entries: Iterable[Suppressed]) -> None:
        lists: dict[str, dict[str, Suppressed]] = {}
        for e in entries:
            lists.setdefault(e.account, {}).setdefault(e.address, e)
        self._lists = lists
        self._count()

    def add(self, entries: Iterable[Suppressed]) -> None:
        for e in entries:
            self._lists.setdefault(e.account, {}).setdefault(address_key(e.address), e)
        self._count()

    def remove(self, address: str, account: str | None = None) -> None:
        key = address_key(address)
        for name, entries in self._lists.items():
            if account is None or name == account:
                entries.pop(key, None)
        self._count()

    def counts(self) -> dict[str, int]:
        return {account: len(entries) for account, entries in self._lists.items()}

    def _count(self) -> None:
        for account, entries in self._lists.items():
            SUPPRESSIONS.labels(account=account).set(len(entries))

    async def refresh(self, store: ReturnStore) -> None:
        """Reload the whole copy (LedgerUnavailable: the old copy stays)."""
        self.replace(await store.suppressions())
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
            await asyncio.sleep(every())
