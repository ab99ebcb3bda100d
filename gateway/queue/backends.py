"""Which QueueStore backs the queue: SQLite (a file, the default) or PostgreSQL (`queue_url`)."""

from __future__ import annotations

from gateway.queue.sqlite import SqliteQueue
from gateway.queue.store import QueueStore
from gateway.settings import DeliverySettings


def open_store(settings: DeliverySettings) -> QueueStore:
    if settings.queue_url:
        from gateway.queue.postgres import PostgresQueue  # psycopg is only needed for PostgreSQL

        password = settings.queue_password.get_secret_value() if settings.queue_password else None
        return PostgresQueue(settings.queue_url, password)
    return SqliteQueue(settings.spool_path)
