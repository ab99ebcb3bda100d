"""Which LedgerStore: the queue's own database, SQLite (`delivery.spool_path`) or PostgreSQL (`queue_url`)."""

from __future__ import annotations

from collections.abc import Callable

from gateway.config import DeliverySettings
from gateway.ledger.returns import ReturnStore
from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.store import LedgerStore


def open_ledger(
    settings: DeliverySettings,
    disk_full: Callable[[], bool] | None = None,
    too_new: Callable[[str], None] | None = None,
) -> LedgerStore:
    """The ledger beside the queue (not connected yet: `open`, or any first use, connects).
    `disk_full`: the SQLite queue's reserve is in use, so the ledger leaves the disk to the queue.
    `too_new`: called with the reason when the schema turns out newer than this gateway's."""
    if settings.queue_url:
        from gateway.ledger.postgres import PostgresLedger  # psycopg is only needed for PostgreSQL

        password = settings.queue_password.get_secret_value() if settings.queue_password else None
        return PostgresLedger(settings.queue_url, password, too_new=too_new)
    return SqliteLedger(settings.spool_path, disk_full, too_new)


def open_returns(ledger: LedgerStore) -> ReturnStore:
    """The return path's tables on the ledger's own connection (its backend decides which)."""
    if isinstance(ledger, SqliteLedger):
        from gateway.ledger.sqlite_returns import SqliteReturns

        return SqliteReturns(ledger)
    from gateway.ledger.postgres import PostgresLedger
    from gateway.ledger.postgres_returns import PostgresReturns

    assert isinstance(ledger, PostgresLedger)
    return PostgresReturns(ledger)
