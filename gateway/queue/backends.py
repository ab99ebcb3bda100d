"""Which QueueStore backs the queue: SQLite (a file, the default) or PostgreSQL (`queue_url`)."""

from __future__ import annotations

from gateway.queue.sqlite import SqliteQueue
from gateway.queue.store import QueueStore
from gateway.settings import ConfigError, DeliverySettings


def open_store(settings: DeliverySettings) -> QueueStore:
    if settings.queue_url:
        raise ConfigError("delivery.queue_url: the PostgreSQL queue is not available in this build yet")
    return SqliteQueue(settings.spool_path)
