"""Waiting for a wake-up or a timeout, whichever comes first, in the loops of background tasks."""

from __future__ import annotations

import asyncio
import contextlib


async def woken(event: asyncio.Event, seconds: float) -> None:
    """Wait until `event` is set or `seconds` have passed, then clear it. A cancellation is never lost: on Python
    3.11 `asyncio.wait_for` returns normally when its cancellation arrives just as the event is set, and a loop
    sleeping so would then never stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    event.clear()
