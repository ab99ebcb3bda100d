"""Composition root: build every part from Settings, serve on one event loop, shut down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field

import structlog

from gateway.credentials import Authenticator
from gateway.delivery import Delivery
from gateway.dns import DnsResolver
from gateway.domaincheck import check_domains
from gateway.observability import OperatorEndpoint
from gateway.pipeline import Pipeline
from gateway.settings import Settings
from gateway.smtp.server import Listeners
from gateway.spool import RetryWorker, Spool
from gateway.upstream.base import Driver
from gateway.upstream.dmds import DmdsDriver

log = structlog.get_logger("gateway.app")


@dataclass
class App:
    settings: Settings
    drivers: dict[str, DmdsDriver] = field(default_factory=dict)
    listeners: Listeners | None = None
    spool: Spool | None = None
    worker: RetryWorker | None = None
    operator: OperatorEndpoint | None = None
    _campaigns: dict[tuple[str, int], tuple[bool, float]] = field(default_factory=dict)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        for name, account in self.settings.accounts.items():
            self.drivers[name] = DmdsDriver(
                account.base_url,
                account.apikey.get_secret_value(),
                timeout=account.http_timeout,
                max_connections=account.max_connections,
                transport=account.http_client,
                account=name,
            )
        self.authenticator = Authenticator(self.settings.accounts, self._campaign_key)
        drivers: dict[str, Driver] = dict(self.drivers)
        dns_settings = self.settings.dns
        self.resolver = DnsResolver(
            dns_settings.nameservers or None,
            dns_settings.port,
            dns_settings.timeout,
            dns_settings.max_ttl,
            dns_settings.negative_ttl,
        )
        delivery = Delivery(drivers)
        # Store-and-forward (gateway/spool/): opened before listening; whatever the last run left is resumed.
        dsettings = self.settings.delivery
        self.spool = Spool(dsettings)
        await self.spool.open()
        self.worker = RetryWorker(
            self.spool, delivery, list(self.settings.accounts), dsettings.concurrency, dsettings.poll_interval
        )
        self.worker.start()
        self.pipeline = Pipeline(
            self.settings, delivery, self._campaign_known, spool=self.spool, resolver=self.resolver
        )
        self.listeners = Listeners(self.settings, self.pipeline, self.authenticator)
        await self.listeners.start()
        if self.settings.http.port is not None:
            self.operator = OperatorEndpoint()
            port = await self.operator.start(self.settings.http.address, self.settings.http.port)
            self.operator.is_ready = True
            log.info("operator_endpoint_started", address=self.settings.http.address, port=port)
        if self.settings.dns.check_sender_domain:
            self._background.add(asyncio.get_running_loop().create_task(self._log_domain_findings()))

    async def _log_domain_findings(self) -> None:
        """The same findings as `smtp-gateway check-domains`, logged once at startup."""
        for name, account in self.settings.accounts.items():
            for report in await check_domains(self.resolver, dict(account.sender_domains)):
                fields = {"account": name, "domain": report.domain, "return_path": report.return_path}
                if report.problems:
                    log.error("sender_domain_problem", problems=report.problems, **fields)
                elif report.warnings:
                    log.warning("sender_domain_warning", warnings=report.warnings, **fields)
                else:
                    log.info("sender_domain_ok", **fields)

    async def _campaign_key(self, account: str, numid: int) -> str | None:
        return await self.drivers[account].campaign_apikey(numid)

    async def _campaign_known(self, account: str, numid: int) -> bool:
        """Whether DMDS has this API campaign (cached like credentials)."""
        loop = asyncio.get_running_loop()
        cached = self._campaigns.get((account, numid))
        if cached is not None and cached[1] > loop.time():
            return cached[0]
        known = await self.drivers[account].campaign_apikey(numid) is not None
        ttl = self.settings.accounts[account]
        self._campaigns[(account, numid)] = (
            known, loop.time() + (ttl.credential_cache_ttl if known else ttl.negative_cache_ttl)
        )
        return known

    def reload_tls(self) -> None:
        """SIGHUP: load the TLS certificate files again (renewals) without a restart."""
        listeners = self.listeners
        if listeners is None:
            return

        async def reload() -> None:
            await listeners.reload_tls()  # logs its outcome

        task = asyncio.get_running_loop().create_task(reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
            await self.worker.stop(self.settings.delivery.shutdown_timeout)
        if self.spool is not None:
            await self.spool.close(self.settings.delivery.shutdown_timeout)
        for driver in self.drivers.values():
            with contextlib.suppress(Exception):
                await driver.aclose()
        log.info("stopped")


async def run(app: App, drain_timeout: float = 30.0) -> None:
    """Start, wait for SIGTERM/SIGINT, then drain and stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    loop.add_signal_handler(signal.SIGHUP, app.reload_tls)
    log.info("ready", listeners=app.ports)
    try:
        await stop.wait()
    finally:
        log.info("shutting_down", drain_timeout=drain_timeout)
        await app.stop(drain_timeout)
