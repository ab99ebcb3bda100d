"""Background tasks nobody awaits (a SIGHUP's reload, the periodic figures, the return path's loops): a bug in
one is logged once with its traceback and counted, instead of asyncio's "Task exception was never retrieved"
when (if ever) the task is collected."""

from __future__ import annotations

import asyncio
import re
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


# The arguments in the loop's message about a callback ("Exception in callback Gate.connection_made(<...>)"):
# their reprs may carry a client's bytes. What an empty "()" follows ("protocol.eof_received() call failed") stays.
_ARGUMENTS = re.compile(r"\((?!\)).*\Z", re.DOTALL)


def report_loop_exception(context: dict[str, Any]) -> bool:
    """The event loop's exception handler (gateway.smtp.descriptors.DescriptorWatch): an exception the loop
    caught in a callback (a protocol's data_received, eof_received, connection_lost, a handle's callback, a
    task nobody awaited) is a bug, logged once as event_loop_internal_error with its traceback and counted in
    smtp_gateway_internal_errors_total{where=event_loop}, instead of the loop's own message on the asyncio
    logger (worded differently by asyncio and uvloop, and counted nowhere). False when the context carries no
    exception: the loop's default handler says what it is."""
    error = context.get("exception")
    if not isinstance(error, BaseException):
        return False
    INTERNAL_ERRORS.labels(where="event_loop").inc()
    # A bug in a callback the event loop ran (a connection's protocol, a handle, a task nobody awaited): once
    # with its traceback, counted in smtp_gateway_internal_errors_total{where="event_loop"}. `loop_message` is
    # the loop's own words (asyncio's and uvloop's differ), without the callback's arguments.
    log.error(
        "event_loop_internal_error",
        loop_message=_ARGUMENTS.sub("", str(context.get("message", ""))),
        error_type=type(error).__name__,
        protocol=_type_name(context.get("protocol")),
        transport=_type_name(context.get("transport")),
        exc_info=error,
    )
    return True


def _type_name(value: object) -> str | None:
    """Type names only: a protocol's or a transport's repr may carry a client's address or state."""
    return None if value is None else type(value).__qualname__
