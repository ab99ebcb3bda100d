"""One call's deadline and how much of its request went out: what a transport needs to say, when a call
fails, whether the upstream can have received the request whole.

Neither transport bounds the whole call by itself: aiohttp has no write timeout (its read timeout starts only
once the body is written) and either one's read timeout restarts on every byte received. An upstream that
stops reading the body, or answers a byte at a time, would hold the call, and one of the account's
connections, for ever. So each call has a deadline, moved as it goes:

    connecting                      the transport's own connect timeout (and `connect + write + read` in all)
    writing the body                `write` seconds from its first piece
    after the body's last piece     `read` seconds for the answer, whole

The request is complete once the body's last piece was handed to the connection (it is then in the socket's
buffers or on the wire, and the upstream may act on it). Until then the upstream cannot have the whole
request: a failure or the deadline then is "not sent"; after, "answer lost".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


def deadline(timeouts: dict[str, float]) -> float | None:
    """Seconds a whole call may take: connecting (or waiting for a connection), writing and reading (None: a
    phase without a bound)."""
    write, read = timeouts.get("write"), timeouts.get("read")
    if write is None or read is None:
        return None
    return max(timeouts.get("pool", 0.0), timeouts.get("connect", 0.0)) + write + read


class Upload:
    """The body as the transport pulls it, piece by piece, and the call's deadline (`bound`, entered
    around the call). `complete` turns true right before the last piece is handed over: nothing can suspend
    the call between the two, so a failure seen while it is false happened before the request was whole."""

    __slots__ = ("_read", "_write", "bound", "complete")

    def __init__(self, timeouts: dict[str, float], *, body: bool) -> None:
        """`body`: the request has one (to be sent through `pieces`); without, it is complete as it goes."""
        self._write = timeouts.get("write")
        self._read = timeouts.get("read")
        # Until the body's first piece is pulled (connecting, or a request without a body): every phase's time.
        total = deadline(timeouts)
        self.bound = asyncio.timeout_at(None if total is None else asyncio.get_running_loop().time() + total)
        # Without a body, only connecting precedes the request's going out whole, and connecting has its own
        # timeout, shorter than this deadline: a call that meets it went out.
        self.complete = not body

    async def pieces(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`body`, one piece ahead: the last piece is known as the last before it is yielded."""
        if self._write is not None:
            self.bound.reschedule(asyncio.get_running_loop().time() + self._write)
        piece = await anext(body, None)
        while piece is not None:
            following = await anext(body, None)
            if following is None:
                self._sent()
            yield piece
            piece = following
        if not self.complete:  # an empty body
            self._sent()

    def _sent(self) -> None:
        """The last piece is about to be handed over: the request is complete, the answer's time starts."""
        self.complete = True
        if self._read is not None:
            self.bound.reschedule(asyncio.get_running_loop().time() + self._read)
