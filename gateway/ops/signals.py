"""SIGTERM and SIGINT as one event on the running loop, whatever the process inherited (a script's `cmd &`
starts it with SIGINT ignored), remembering which came first: the exit status tells them apart."""

from __future__ import annotations

import asyncio
import signal


class StopSignals:
    """`install()` on the running loop, then `await wait()`: the first stop signal received."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._event = asyncio.Event()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._receive, sig)

    def _receive(self, sig: signal.Signals) -> None:
        if self.received is None:
            self.received = sig
        self._event.set()

    async def wait(self) -> signal.Signals:
        await self._event.wait()
        assert self.received is not None
        return self.received
