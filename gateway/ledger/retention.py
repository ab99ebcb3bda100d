"""Retention: records older than `ledger.retention` are deleted in bounded batches by a periodic task.

Every instance runs it; deleting is idempotent (two instances pruning at once delete each row once), and
each batch is its own short transaction, so pruning a large backlog never holds the database for long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from gateway.config import LedgerSettings
from gateway.core.waits import idle
from gateway.ledger.model import iso
from gateway.ledger.store import LedgerStore, LedgerUnavailable
from gateway.ops.metrics import LEDGER_PRUNED

log = structlog.get_logger("gateway.ledger")

PRUNE_EVERY = 300.0
BATCH = 500


async def prune(store: LedgerStore, retention: float, now: float, batch: int = BATCH) -> int:
    """Delete every record accepted more than `retention` seconds before `now`; returns how many."""
    total = 0
    while True:
        n = await store.prune(now - retention, batch)
        total += n
        LEDGER_PRUNED.inc(n)
        if n < batch:
            break
        await asyncio.sleep(0)  # between batches, let everything else run
    if total:
        log.info("ledger_pruned", messages=total, accepted_before=iso(now - retention))
    return total


async def run(
    store: LedgerStore,
    settings: Callable[[], LedgerSettings],
    every: float = PRUNE_EVERY,
    clock: Callable[[], float] = time.time,
) -> None:
    """Prune now and then every `every` seconds, until cancelled (`settings`: the current [ledger])."""
    failing = False
    while True:
        try:
            await prune(store, settings().retention, clock())
        except LedgerUnavailable as exc:
            if not failing:
                log.warning("ledger_prune_failed", error=exc.reason, retry_in=every)
            failing = True
        else:
            failing = False
        await idle(every)
