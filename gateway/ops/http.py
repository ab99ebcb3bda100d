"""The operator HTTP endpoint: /healthz, /readyz, /metrics, the message API (gateway/ops/api.py) and the
console (gateway/console/), over HTTP or HTTPS (aiohttp.web), wired by the composition root."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.limits.clients import LogSampler
from gateway.ops.api import MessageApi
from gateway.ops.metrics import HTTP_BAD_REQUESTS, REGISTRY

if TYPE_CHECKING:
    from gateway.console.web import Console

log = structlog.get_logger("gateway.http")


class BadRequestFilter(logging.Filter):
    """aiohttp's own report of a malformed request ("Error handling request from <client>", at error with a
    traceback) is the client's fault, not the gateway's, and its exception text quotes the offending request
    line or header line: a bearer token in a malformed Authorization line, a console cookie. Such a record is
    dropped and replaced by a counted `http_bad_request` line, once a minute per client address, naming the
    parser's error class only. Every other aiohttp record (a handler's bug: "Unhandled exception") passes."""

    def __init__(self, sampler: LogSampler | None = None) -> None:
        super().__init__()
        self._sampler = sampler or LogSampler()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        client = str(args[0]) if args else "unknown"
        HTTP_BAD_REQUESTS.inc()
        suppressed = self._sampler.allow(client)
        if suppressed is not None:
            log.info(
                "http_bad_request",
                client=client,
                error=type(error).__name__,
                status=error.code,
                suppressed=suppressed,
            )
        return False


def filter_bad_requests() -> None:
    """Install BadRequestFilter on aiohttp's server logger (once per process): every aiohttp server the
    gateway runs logs through it, whether or not gateway.ops.logs configured logging."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in server_log.filters):
        server_log.addFilter(BadRequestFilter())


class OperatorEndpoint:
    """Health and metrics over HTTP for load balancers, container runtimes and Prometheus."""

    def __init__(
        self,
        problems: Callable[[], list[str]] = list,
        api: MessageApi | None = None,
        console: Console | None = None,
        degraded: Callable[[], list[str]] = list,
    ) -> None:
        self.app = web.Application()
        if console is not None:
            console.install(self.app)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        if api is not None:
            api.install(self.app)
        self.is_ready = False
        self._problems = problems
        self._degraded = degraded
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness, 200 whatever else is wrong (a restart cures none of it); faults the fleet shares named."""
        degraded = self._degraded()
        return web.json_response({"status": "ok", "degraded": degraded} if degraded else {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Can this instance take mail now? 503 while starting or draining and while its own queue fails;
        faults every instance shares (a refused key, the shared database down) are named under `degraded` but
        leave it ready, since every other instance has them too (docs/operations/health.md)."""
        problems = self._problems() if self.is_ready else ["starting or draining"]
        body: dict[str, object] = {"ready": not problems}
        if problems:
            body["problems"] = problems
        degraded = self._degraded()
        if degraded:
            body["degraded"] = degraded
        return web.json_response(body, status=503 if problems else 200)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        filter_bad_requests()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, ssl_context=tls)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
