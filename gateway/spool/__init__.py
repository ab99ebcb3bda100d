"""Durable store-and-forward: SQLite spool (store.py), its async face (spool.py), the retry worker (worker.py)."""

from gateway.spool.spool import Spool
from gateway.spool.worker import RetryWorker

__all__ = ["RetryWorker", "Spool"]
