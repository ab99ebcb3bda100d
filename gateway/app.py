"""Composition root: build every part from Settings, serve on one event loop, shut down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field

import structlog

from gateway.credentials import Authenticator
from gateway.delivery.health import AccountHealth
from gateway.delivery.owner import DeliveryOwner
from gateway.dns import DnsResolver
from gateway.domaincheck import check_domains
from gateway.observability import OperatorEndpoint
from gateway.pipeline import Pipeline
from gateway.providers import registry
from gateway.providers.base import Provider
from gateway.queue.backends import open_store
from gateway.queue.store import QueueStore
from gateway.queue.worker import RetryWorker
from gateway.settings import DmdsAccount, Settings
from gateway.smtp.server import Listeners

log = structlog.get_logger("gateway.app")


@dataclass
class App:
    settings: Settings
    providers: dict[str, Provider] = field(default_factory=dict)
    listeners: Listeners | None = None
    store: QueueStore | None = None
    owner: DeliveryOwner | None = None
    worker: RetryWorker | None = None
    operator: OperatorEndpoint | None = None
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        settings = self.settings
        for name, account in settings.accounts.items():
            self.providers[name] = registry.build(name, account)
        self.authenticator = Authenticator(settings.accounts, self.providers)
        d = settings.dns
        self.resolver = DnsResolver(d.nameservers or None, d.port, d.timeout, d.max_ttl, d.negative_ttl)
        # The queue is opened before listening; what another instance (or the last run) left is resumed.
        self.store = open_store(settings.delivery)
        try:
            await self.store.open()
        except Exception as exc:
            # Not fatal: the healthy path needs no queue; messages that need it get 452 4.3.1 until it can
            # be opened (each use tries again).
            log.error("queue_unavailable", queue=self.store.url, error=str(exc))
        self.health = AccountHealth(list(settings.accounts))
        self.owner = DeliveryOwner(self.providers, self.store, settings.delivery, self.health)
        dsettings = settings.delivery
        self.worker = RetryWorker(self.owner, list(settings.accounts), dsettings.concurrency,
                                  dsettings.poll_interval, dsettings.probe_interval)
        self.worker.start()
        self.pipeline = Pipeline(settings, self.providers, self.owner, resolver=self.resolver)
        self.listeners = Listeners(settings, self.pipeline, self.authenticator)
        await self.listeners.start()
        if settings.http.port is not None:
            self.operator = OperatorEndpoint(problems=self.health.problems)
            port = await self.operator.start(settings.http.address, settings.http.port)
            self.operator.is_ready = True
            log.info("operator_endpoint_started", address=settings.http.address, port=port)
        if settings.dns.check_sender_domain:
            self._background.add(asyncio.get_running_loop().create_task(self._log_domain_findings()))

    async def _log_domain_findings(self) -> None:
        """The same findings as `smtp-gateway check-domains`, logged once at startup."""
        for name, account in self.settings.accounts.items():
            if not isinstance(account, DmdsAccount):
                continue
            for report in await check_domains(self.resolver, dict(account.sender_domains)):
                fields = {"account": name, "domain": report.domain, "return_path": report.return_path}
                if report.problems:
                    log.error("sender_domain_problem", problems=report.problems, **fields)
                elif report.warnings:
                    log.warning("sender_domain_warning", warnings=report.warnings, **fields)
                else:
                    log.info("sender_domain_ok", **fields)

    @property
    def ports(self) -> dict[str, int]:
        return self.listeners.ports if self.listeners else {}

    async def stop(self, drain_timeout: float = 30.0) -> None:
        for task in self._background:
            task.cancel()
        if self.operator is not None:
            self.operator.is_ready = False
        if self.listeners is not None:
            await self.listeners.drain(drain_timeout)
        if self.operator is not None:
            # /readyz answered 503 while draining; now nothing is left to observe.
            with contextlib.suppress(Exception):
                await self.operator.stop()
        if self.worker is not None:
            await self.worker.stop()
        if self.owner is not None:
            await self.owner.stop(self.settings.delivery.shutdown_timeout)
        if self.store is not None:
            await self.store.close()
        for provider in self.providers.values():
            with contextlib.suppress(Exception):
                await provider.aclose()
        log.info("stopped")


async def run(app: App, drain_timeout: float = 30.0) -> None:
    """Start, wait for SIGTERM/SIGINT, then drain and stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    log.info("ready", listeners=app.ports)
    try:
        await stop.wait()
    finally:
        log.info("shutting_down", drain_timeout=drain_timeout)
        await app.stop(drain_timeout)
