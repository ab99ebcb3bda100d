"""Metrics (Prometheus) and the operator HTTP endpoint: /healthz, /readyz, /metrics. All metrics live here."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

SESSIONS = Counter("smtp_gateway_sessions_total", "SMTP sessions opened", ["listener"], registry=REGISTRY)
AUTH = Counter("smtp_gateway_auth_total", "AUTH attempts by result", ["result"], registry=REGISTRY)
TLS_HANDSHAKE_FAILURES = Counter(
    "smtp_gateway_tls_handshake_failures_total",
    "Failed TLS handshakes by listener and the highest protocol version the client offered",
    ["listener", "offered"],
    registry=REGISTRY,
)
MESSAGES = Counter(
    "smtp_gateway_messages_total", "Messages by final SMTP reply class", ["result"], registry=REGISTRY
)
UPSTREAM_SECONDS = Histogram(
    "smtp_gateway_upstream_seconds",
    "Upstream API call latency",
    ["account", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)


class OperatorEndpoint:
    """Health and metrics over HTTP for load balancers, container runtimes and Prometheus."""

    def __init__(self, ready: web.Application | None = None) -> None:
        self.app = web.Application()
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        self.is_ready = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        status = 200 if self.is_ready else 503
        return web.json_response({"ready": self.is_ready}, status=status)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
