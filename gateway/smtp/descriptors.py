"""Out of file descriptors (RLIMIT_NOFILE, or the system's table): new connections cannot be accepted.

asyncio's loop reports a failed accept() to the loop's exception handler (logged as an asyncio error each
second while it lasts) and tries again a second later; uvloop's libuv accepts and closes the waiting
connections with a reserved descriptor and tells nobody. Either way the operator must learn LimitNOFILE is
too low: a check once a second (open and close one descriptor) sees it under both loops, asyncio's failed
accepts are counted too, and the episode is logged once when it begins and once when it ends.

The watch's handler is the loop's exception handler: every other exception the loop reports (a bug in a
protocol's callback) is logged and counted there too (gateway.ops.tasks.report_loop_exception).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import structlog

from gateway.core.episode import Episode
from gateway.ops.metrics import DESCRIPTORS_EXHAUSTED
from gateway.ops.tasks import report_loop_exception

log = structlog.get_logger("gateway.smtp")

CHECK_EVERY = 1.0
# Seconds without a failure before an episode ends: at the limit, with connections coming and going, each
# freed descriptor lets one accept through and the next one fails again; that is one episode, not two lines a
# second.
QUIET = 5.0
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})
# asyncio's context message for a failed accept (selector_events.py).
ACCEPT_FAILED = "socket.accept() out of system resource"


class DescriptorWatch:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._episode = Episode(clock)
        self._last_failure = 0.0
        self._accepts_failed = 0
        self._checks_failed = 0
        self._task: asyncio.Task[None] | None = None
        self._previous: Any = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)
        self._task = loop.create_task(self._check_forever())

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() == self._handle:
            loop.set_exception_handler(self._previous)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def available(self) -> None:
        """A descriptor could be had (a connection was accepted, the check opened one): the episode ends once
        none has failed for QUIET seconds."""
        if not self._episode.active or self._clock() - self._last_failure < QUIET:
            return
        over = self._episode.ended()
        if over is None:
            return
        log.warning(
            "descriptors_available",
            lasted=over.lasted,
            accepts_failed=self._accepts_failed,
            checks_failed=self._checks_failed,
        )
        self._accepts_failed = self._checks_failed = 0

    def _exhausted(self, where: str, exc: OSError) -> None:
        DESCRIPTORS_EXHAUSTED.labels(where=where).inc()
        self._last_failure = self._clock()
        if where == "accept":
            self._accepts_failed += 1
        else:
            self._checks_failed += 1
        if self._episode.occurred():
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.error(
                "descriptors_exhausted",
                where=where,
                error=os.strerror(exc.errno or 0),
                limit=soft,
                note="new connections are not accepted until descriptors are free: raise LimitNOFILE (ulimit -n)",
            )

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == ACCEPT_FAILED and isinstance(exc, OSError) and exc.errno in EXHAUSTED:
            self._exhausted("accept", exc)  # once per episode, not asyncio's line every second
            return
        if report_loop_exception(context):
            # Logged and counted: the default handler would say it a second time; a handler installed
            # before (by whoever embeds the gateway, or a test) still sees it.
            if self._previous is not None:
                self._previous(loop, context)
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    async def _check_forever(self) -> None:
        while True:
            if not self.check():
                return
            await asyncio.sleep(CHECK_EVERY)

    def check(self) -> bool:
        """Open and close one descriptor; False when this check cannot be made here at all (the device refused
        for another reason than exhaustion: a sandbox or security module), said once: asyncio's failed accepts
        are still counted."""
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in EXHAUSTED:
                self._exhausted("check", exc)
                return True
            log.warning("descriptors_check_unavailable", error=os.strerror(exc.errno or 0), path=os.devnull)
            return False
        os.close(fd)
        self.available()
        return True
