"""SIGTERM and SIGINT as one event on the running loop, whatever the process inherited (a script's `cmd &`
starts it with SIGINT ignored), remembering which came first: the exit status tells them apart."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType


class StopSignals:
    """`install()` on the running loop, then `await wait()`: the first stop signal received."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._event = asyncio.Event()
        self._again = asyncio.Event()  # a second stop signal: cut the wait before the drain short

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._receive, sig)

    def _receive(self, sig: signal.Signals) -> None:
        if self.received is None:
            self.received = sig
        elif self._event.is_set():
            self._again.set()
        self._event.set()

    async def wait(self) -> signal.Signals:
        await self._event.wait()
        assert self.received is not None
        return self.received

    async def again(self, seconds: float) -> bool:
        """Wait up to `seconds` for a second stop signal; True if it came."""
        try:
            async with asyncio.timeout(seconds):
                await self._again.wait()
        except TimeoutError:
            return False
        return True


class Hangups:
    """SIGHUP (a reload request) caught from the first moment of `serve`, not only once it has started: its
    default action ends the process, and systemd counts death by SIGHUP as a clean exit (Restart=on-failure
    does not restart it). One that comes while starting is noted and applied once started (the configuration
    may have changed after it was read); after that, each runs the reload at once."""

    def __init__(self) -> None:
        self.pending = False
        self._reload: Callable[[], None] | None = None

    def catch_early(self) -> None:
        """Before the event loop runs (loading the configuration, the preflight): note it."""
        signal.signal(signal.SIGHUP, self._note)

    def install(self) -> None:
        """On the running loop, before the start."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._receive)

    def started(self, reload: Callable[[], None]) -> bool:
        """From now on a SIGHUP runs `reload`; True if one came while starting (the caller runs it once)."""
        self._reload = reload
        pending, self.pending = self.pending, False
        return pending

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def _receive(self) -> None:
        if self._reload is None:
            self.pending = True
        else:
            self._reload()
