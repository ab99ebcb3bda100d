"""Background tasks nobody awaits (a SIGHUP's reload, the periodic figures, the return path's loops): a bug in
one is logged once with its traceback and counted, instead of asyncio's "Task exception was never retrieved"
when (if ever) the task is collected."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from gateway.ops.metrics import INTERNAL_ERRORS

log = structlog.get_logger("gateway.tasks")


def report_failure(task: asyncio.Task[Any]) -> None:
    """A done-callback: a task that ended with an exception (a bug: each task catches what it expects) is
    logged as background_task_internal_error and counted in smtp_gateway_internal_errors_total{where=background}."""
    if task.cancelled():
        return
    error = task.exception()
    if error is None:
        return
    INTERNAL_ERRORS.labels(where="background").inc()
    log.error(
        "background_task_internal_error", task=getattr(task.get_coro(), "__qualname__", task.get_name()), exc_info=error
    )


def loop_failed(where: str, error: Exception) -> None:
    """A periodic loop's round that met a bug: logged with its traceback and counted; the loop goes on (its
    next round may work: a figure stale for one round, not for the process's life)."""
    INTERNAL_ERRORS.labels(where="background").inc()
    log.error("background_task_internal_error", task=where, exc_info=error)
