"""The background loops' waits (gateway/core/waits.py): a wake-up ends a wait early, and a cancellation that
something swallowed (as psycopg_pool's getconn can when it races a connection's return) ends the next wait at
once instead of letting the loop sleep on and hold up the stop that cancelled it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.core.waits import idle, woken

# A bound on the test's own waits: the loops under test sleep for an hour when the code is wrong.
BOUND = 10.0


async def test_woken_returns_on_its_event_and_clears_it() -> None:
    event = asyncio.Event()
    waiting = asyncio.create_task(woken(event, 3600))
    await asyncio.sleep(0)
    event.set()
    done, _ = await asyncio.wait({waiting}, timeout=BOUND)
    assert waiting in done and waiting.exception() is None and not event.is_set()


@pytest.mark.parametrize("wait", [lambda: woken(asyncio.Event(), 3600), lambda: idle(3600)], ids=["woken", "idle"])
async def test_a_swallowed_cancellation_ends_the_next_wait(wait: Callable[[], Awaitable[None]]) -> None:
    swallowed = asyncio.Event()

    async def loop() -> None:
        while True:
            try:
                await asyncio.sleep(3600)  # a library call in the loop's round
            except asyncio.CancelledError:
                swallowed.set()  # lost, as the library loses it: no uncancel(), no raise
            await wait()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait_for(swallowed.wait(), BOUND)
    done, _ = await asyncio.wait({task}, timeout=BOUND)
    assert task in done and task.cancelled()


async def test_a_timeout_inside_the_round_is_not_taken_for_a_cancellation() -> None:
    """asyncio.timeout's own cancellation is taken back (uncancel): the loop goes on to its wait as usual."""
    event = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await asyncio.sleep(3600)
    await woken(event, 0.01)
    await idle(0)
