"""A webhook receiver for the tests: a real aiohttp server on 127.0.0.1 (any free port) that records every POST
(headers and body as received) and answers its first `fail_first` with 503, the rest with 200."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    fail_first: int = 0
    delay: float = 0.0  # seconds before answering (a receiver slower than the webhook's timeout)
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/smtp"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 503 if len(self.received) < self.fail_first else 200
        self.received.append(Received({k.lower(): v for k, v in request.headers.items()}, body, status))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response({"ok": status == 200}, status=status)

    async def start(self) -> int:
        app = web.Application()
        app.router.add_post("/hooks/smtp", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def accepted(self) -> list[Received]:
        return [r for r in self.received if r.status == 200]
