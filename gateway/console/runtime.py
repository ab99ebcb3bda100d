"""What the console reads of the running gateway: the composition root (gateway/app.py) provides it."""

from __future__ import annotations

from typing import Protocol

from gateway.auth.onetime import OneTimeLogins
from gateway.config import Settings
from gateway.config.reload import ConfigStatus
from gateway.delivery.health import AccountHealth
from gateway.ledger.store import LedgerStore
from gateway.ledger.writer import LedgerWriter
from gateway.limits.lockouts import Lockouts
from gateway.queue.store import QueueStore


class Gateway(Protocol):
    @property
    def settings(self) -> Settings: ...

    @property
    def ports(self) -> dict[str, int]:
        """The SMTP listeners' bound ports by name."""
        ...

    @property
    def store(self) -> QueueStore | None: ...

    @property
    def ledger(self) -> LedgerStore | None: ...

    @property
    def ledger_writer(self) -> LedgerWriter | None: ...

    @property
    def health(self) -> AccountHealth: ...

    @property
    def lockouts(self) -> Lockouts: ...

    @property
    def onetime(self) -> OneTimeLogins: ...

    @property
    def config_status(self) -> ConfigStatus: ...
