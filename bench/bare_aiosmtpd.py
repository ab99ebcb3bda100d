"""Bare aiosmtpd baseline server: one event loop, DATA handler only answers 250."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from aiosmtpd.smtp import SMTP


class BareHandler:
    """Accepts every message and throws it away."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Answer 250 without looking at the message."""
        return "250 2.0.0 OK"


async def serve(host: str, port: int) -> None:
    """Listen until SIGTERM/SIGINT; print the bound address on stdout."""
    loop = asyncio.get_running_loop()
    handler = BareHandler()
    server = await loop.create_server(lambda: SMTP(handler, hostname="bare.bench"), host, port)
    bound = server.sockets[0].getsockname()
    print(f"LISTENING {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed on stdout)")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
