"""Metrics (Prometheus) and the operator HTTP endpoint: /healthz, /readyz, /metrics. All metrics live here."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

SESSIONS = Counter("smtp_gateway_sessions_total", "SMTP sessions opened", ["listener"], registry=REGISTRY)
AUTH = Counter("smtp_gateway_auth_total", "AUTH attempts by result", ["result"], registry=REGISTRY)
TLS_HANDSHAKE_FAILURES = Counter(
    "smtp_gateway_tls_handshake_failures_total",
    "Failed TLS handshakes by listener and the highest protocol version the client offered",
    ["listener", "offered"],
    registry=REGISTRY,
)
MESSAGES = Counter("smtp_gateway_messages_total", "Messages by final SMTP reply class", ["result"], registry=REGISTRY)
UPSTREAM_SECONDS = Histogram(
    "smtp_gateway_upstream_seconds",
    "Upstream API calls and their latency (the _count is the number of calls) by outcome: ok (2xx), "
    "client_error (4xx), server_error (5xx), not_sent (never reached the upstream: safe to resend), "
    "answer_lost (sent, no complete answer: the upstream may have it)",
    ["account", "endpoint", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
RATE_LIMIT_WAIT = Histogram(
    "smtp_gateway_rate_limit_wait_seconds",
    "Time upstream calls waited for the account's rate limiter",
    ["account"],
    buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
AMBIGUOUS = Counter(
    "smtp_gateway_ambiguous_calls_total",
    "Calls whose answer was lost after they were sent and that were then resent or held (the at-least-once "
    "window): lost answer (read timeout, reset), lease expired mid-call (instance died), shutdown mid-call",
    ["account", "cause"],
    registry=REGISTRY,
)


UPSTREAM_AUTH_REFUSED = Counter(
    "smtp_gateway_upstream_auth_refused_total",
    "Upstream answers refusing the gateway's own credentials (401/403, IP allowlist): an operator error",
    ["account"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "smtp_gateway_deliveries_total",
    "Delivery attempts by path (inline: during the SMTP session; queue: the retry worker) and verdict "
    "(delivered, refused, queued, dead, internal_error)",
    ["account", "path", "verdict"],
    registry=REGISTRY,
)
CLIENT_GONE = Counter(
    "smtp_gateway_client_gone_total",
    "Messages whose client disconnected while their inline call ran; the call was recorded all the same",
    ["verdict"],
    registry=REGISTRY,
)
LARGE_BYTES = Gauge(
    "smtp_gateway_large_message_bytes",
    "Bytes of large messages (over limits.large_message_threshold) held now, of limits.max_large_bytes",
    registry=REGISTRY,
)
LARGE_REFUSED = Counter(
    "smtp_gateway_large_messages_refused_total",
    "Large messages refused with 452 4.3.1 because limits.max_large_bytes were in use",
    registry=REGISTRY,
)
RESENDS = Counter(
    "smtp_gateway_resends_total",
    "Messages not sent again because their idempotency key was seen within the window: answered (250 with the "
    "first message's id) or in_progress (451: the first copy is still being delivered)",
    ["account", "result"],
    registry=REGISTRY,
)
INTERNAL_ERRORS = Counter(
    "smtp_gateway_internal_errors_total",
    "Unexpected exceptions (bugs), each logged once with its traceback",
    ["where"],
    registry=REGISTRY,
)


SESSIONS_ACTIVE = Gauge("smtp_gateway_sessions_active", "SMTP sessions open now", ["listener"], registry=REGISTRY)
SESSIONS_TLS = Counter(
    "smtp_gateway_sessions_tls_total",
    "SMTP sessions that became encrypted (implicit TLS or STARTTLS), by listener and negotiated TLS version",
    ["listener", "version"],
    registry=REGISTRY,
)
CONNECTIONS_REFUSED = Counter(
    "smtp_gateway_connections_refused_total",
    "Connections closed before a session began, by listener and reason: max_sessions, max_sessions_per_ip, "
    "draining, proxy_untrusted (no PROXY header accepted from that address), proxy_invalid, proxy_timeout",
    ["listener", "reason"],
    registry=REGISTRY,
)
REFUSALS = Counter(
    "smtp_gateway_refusals_total",
    'Every 4xx/5xx reply sent to an SMTP client, by basic and enhanced status code (e.g. "553 5.7.1")',
    ["code"],
    registry=REGISTRY,
)
LIMIT_HITS = Counter(
    "smtp_gateway_limit_hits_total",
    "Clients cut short by a limit: command_timeout, data_timeout, max_commands_before_data, messages_per_minute, "
    "max_auth_failures (per connection), max_recipients, max_message_size, max_large_bytes",
    ["limit"],
    registry=REGISTRY,
)
AUTH_DELAYED = Counter(
    "smtp_gateway_auth_delayed_total",
    "AUTH attempts made to wait first because their client IP failed too often recently",
    registry=REGISTRY,
)
AUTH_LOCKOUTS = Counter(
    "smtp_gateway_auth_lockouts_total",
    "Client IPs (IPv6: /64 networks) locked out of AUTH after too many failures",
    registry=REGISTRY,
)
AUTH_TRACKED = Gauge(
    "smtp_gateway_auth_failure_ips",
    "Client IPs (IPv6: /64 networks) whose recent AUTH failures are remembered (bounded by limits.max_tracked_ips)",
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "smtp_gateway_dead_letters_total",
    "Messages that became dead letters, by cause: refused (by the upstream, for good), expired (max_lifetime), "
    'held (ambiguous = "hold"), internal_error, corrupt (an unreadable queue record)',
    ["cause"],
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "smtp_gateway_config_reloads_total",
    "Configuration reloads (SIGHUP) by result: ok, invalid (the configuration was refused), tls_failed (the "
    "certificate files did not load); a refused reload keeps the running configuration",
    ["result"],
    registry=REGISTRY,
)

QUEUE_STATES = ("queued", "inflight", "dead")


class QueueStats(Collector):
    """The queue's depth and oldest message by state, as last read.

    The queue store is async: a task of the server reads QueueStore.counts every few seconds and stores it
    here; a scrape only reads these numbers (never the database, never blocking the event loop).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counts: Mapping[str, Mapping[str, Any]] | None = None
        self._updated = 0.0

    def update(self, counts: Mapping[str, Mapping[str, Any]]) -> None:
        self._counts = counts
        self._updated = self._clock()

    def clear(self) -> None:
        self._counts = None

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "smtp_gateway_queue_messages",
            "Messages in the queue by state (queued: waiting "
            "for a retry; inflight: being delivered; dead: dead letters)",
            labels=["state"],
        )
        oldest = GaugeMetricFamily(
            "smtp_gateway_queue_oldest_age_seconds",
            "Age of the oldest message in the queue by state (0 when there is none)",
            labels=["state"],
        )
        stale = GaugeMetricFamily(
            "smtp_gateway_queue_stats_age_seconds",
            "Seconds since the queue figures were read (they are refreshed every few seconds)",
        )
        counts = self._counts
        if counts is not None:
            since = self._clock() - self._updated
            for state in QUEUE_STATES:
                row = counts.get(state) or {}
                depth.add_metric([state], float(row.get("count", 0)))
                age = row.get("oldest_age")
                oldest.add_metric([state], float(age) + since if row.get("count") and age is not None else 0.0)
            stale.add_metric([], since)
        yield depth
        yield oldest
        yield stale


QUEUE_STATS = QueueStats()
REGISTRY.register(QUEUE_STATS)


class OperatorEndpoint:
    """Health and metrics over HTTP for load balancers, container runtimes and Prometheus."""

    def __init__(self, problems: Callable[[], list[str]] = list) -> None:
        self.app = web.Application()
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        self.is_ready = False
        self._problems = problems
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """503 while starting or draining, and while an upstream refuses the gateway's own credentials
        (messages are queued meanwhile: an operator must act)."""
        problems = self._problems() if self.is_ready else ["starting or draining"]
        if not problems:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "problems": problems}, status=503)

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
