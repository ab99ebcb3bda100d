"""Which QueueStore backs the queue: SQLite (a file, the default) or PostgreSQL (`queue_url`)."""

from __future__ import annotations

from gateway.config import DeliverySettings
from gateway.queue.sqlite import SqliteQueue
from gateway.queue.store import QueueStore


def open_store(settings: DeliverySettings, *, server: bool = True) -> QueueStore:
    """The queue; `server`: this process delivers (it keeps the SQLite disk reserve; the CLI does not)."""
    if settings.queue_url:
        from gateway.queue.postgres import PostgresQueue  # psycopg is only needed for PostgreSQL

        password = settings.queue_password.get_secret_value() if settings.queue_password else None
        return PostgresQueue(settings.queue_url, password)
    return SqliteQueue(settings.spool_path, reserve=settings.spool_reserve if server else 0)
