"""Waiting in the loops of background tasks: for a wake-up or a timeout, or for a while, never past a stop."""

from __future__ import annotations

import asyncio
import contextlib


def _honour_cancel() -> None:
    """Raise the cancellation of this task that something swallowed. Libraries have lost a cancellation that
    arrives just as they finish (psycopg_pool's getconn racing a connection's return, psycopg#1275/#1345;
    `asyncio.wait_for` on 3.11): the task then stays `cancelling()` but runs on, and a loop that sleeps for
    an hour before looking again would hold up the stop that cancelled it for that long."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def woken(event: asyncio.Event, seconds: float) -> None:
    """Wait until `event` is set or `seconds` have passed, then clear it. A cancellation is never lost: on Python
    3.11 `asyncio.wait_for` returns normally when its cancellation arrives just as the event is set, and a loop
    sleeping so would then never stop (so: asyncio.timeout, and a cancellation swallowed before is raised)."""
    _honour_cancel()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    event.clear()


async def idle(seconds: float) -> None:
    """asyncio.sleep for a background loop between rounds, raising a cancellation swallowed before."""
    _honour_cancel()
    await asyncio.sleep(seconds)
