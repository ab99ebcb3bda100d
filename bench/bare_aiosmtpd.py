"""Bare aiosmtpd baseline server: one event loop, DATA handler only answers 250."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Coroutine
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
    loop_name = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    print(f"LISTENING {bound[0]}:{bound[1]} {loop_name}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def run(coro: Coroutine[Any, Any, None], loop_name: str) -> str:
    """Run on uvloop (when asked, or for "auto" when installed, like the gateway) or asyncio."""
    if loop_name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop_name == "uvloop":
                raise
        else:
            uvloop.run(coro)
            return "uvloop"
    asyncio.run(coro)
    return "asyncio"


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed on stdout)")
    parser.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="auto: uvloop if installed"
    )
    args = parser.parse_args()
    run(serve(args.host, args.port), args.loop)


if __name__ == "__main__":
    main()
