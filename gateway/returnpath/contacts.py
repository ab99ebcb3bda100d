"""The vendor's own invalid contacts (DMDS: invalidated after hard bounces or complaints; mail to them is not
sent, `Not-Sent`) kept in the account's suppression list, minus its whitelist: read every
`invalid_interval` by one instance at a time (a lease on the cursor `<account>/invalid`, as the event polls
have), its entries replaced as a whole (a contact DMDS revalidated leaves the list, with the entries its
`Not-Sent` or invalidation events made). Addresses new to the list are checked against the whitelist first
(cached), so a whitelisted contact is never suppressed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import structlog

from gateway.core.errors import GatewayError
from gateway.core.events import Contacts
from gateway.core.waits import idle
from gateway.ledger.model import INVALID_LIST, SuppressionRow, address_key
from gateway.ledger.returns import ReturnStore, Suppressed
from gateway.ledger.store import LedgerUnavailable
from gateway.ledger.suppression import SuppressionSet
from gateway.ops.metrics import INTERNAL_ERRORS, SUPPRESSION_SYNCS

log = structlog.get_logger("gateway.events")

# An event read back about an address replaces this source's entry (model.suppression_replaces); the sync
# removes only this source's entries (and LIFTED's), so never the entry that replaced one.
SOURCE = INVALID_LIST
REASON = "invalid contact at the upstream"
# Entries of events that say the contact is on the list: DMDS' `Not-Sent` (it sends nothing to an invalid
# contact) and its invalidation event. They end when the contact leaves the list (revalidated), as the list's
# own entry does. A contact the gateway sent to before its next read of the list is suppressed by its
# `Not-Sent` first, so the entry is that event's.
LIFTED = ("not_sent", "invalidated")
LEASE = 300.0


class InvalidContacts:
    def __init__(
        self,
        account: str,
        contacts: Contacts,
        every: Callable[[], float],
        returns: ReturnStore,
        owner: str,
        suppressions: SuppressionSet,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.account = account
        self.contacts = contacts
        self.every = every
        self.returns = returns
        self.owner = owner
        self.suppressions = suppressions
        self.clock = clock
        self.name = f"{account}/invalid"
        self._failing: str | None = None

    async def run(self) -> None:
        while True:
            await self.sync()
            await idle(min(self.every(), 60.0))  # due or not is the cursor's: look often, read rarely

    async def sync(self) -> str:
        """Read the list if it is due (no instance read it within `every`); returns the metric's result."""
        try:
            result = await self._sync()
        except (GatewayError, LedgerUnavailable) as exc:
            if self._failing is None:
                log.warning("invalid_contacts_failed", account=self.account, error=exc.reason)
            self._failing = exc.reason
            result = "failed"
        except Exception as exc:  # a bug: once with its traceback
            INTERNAL_ERRORS.labels(where="invalid_contacts").inc()
            log.error("invalid_contacts_internal_error", account=self.account, exc_info=exc)
            result = "failed"
        else:
            if result == "ok" and self._failing is not None:
                log.info("invalid_contacts_recovered", account=self.account)
                self._failing = None
        if result in ("ok", "failed"):
            SUPPRESSION_SYNCS.labels(account=self.account, result=result).inc()
        return result

    async def _sync(self) -> str:
        every = self.every()
        now = self.clock()
        if every <= 0:
            return "off"
        lease, position = await self.returns.lease_cursor(self.name, self.account, self.owner, now, LEASE, 0.0)
        if lease is None:
            return "busy"
        try:
            if now - position < every:
                return "not_due"
            listed = {address_key(a) for a in await self.contacts.invalid()}
            held = {e.address for e in await self.returns.suppressions(self.account) if e.source == SOURCE}
            rows = []
            for address in sorted(listed):
                if address not in held and await self.contacts.whitelisted(address):
                    continue
                rows.append(SuppressionRow(self.account, address, REASON, SOURCE, now))
            added, removed = await self.returns.sync_source(self.account, SOURCE, rows, LIFTED, read_at=now)
            await self.returns.complete(self.name, lease.token, now, self.clock(), LEASE)
        finally:
            with contextlib.suppress(LedgerUnavailable):
                await self.returns.release(self.name, lease.token)
        self.suppressions.add(Suppressed.of(r) for r in rows if r.address in set(added))
        for address in removed:
            self.suppressions.remove(address, self.account)
        if added or removed:
            log.info("invalid_contacts_synced", account=self.account, added=len(added), removed=len(removed))
        return "ok"
