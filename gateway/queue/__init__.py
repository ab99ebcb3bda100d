"""The durable queue: QueueStore protocol (store.py), SQLite and PostgreSQL backends, the record codec."""
