"""Composition root: build every part from Settings, serve on one event loop, shut down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field

import structlog

from gateway.credentials import Authenticator
from gateway.delivery import Delivery
from gateway.pipeline import Pipeline
from gateway.settings import Settings
from gateway.smtp.server import Listeners
from gateway.upstream.base import Driver, Transport
from gateway.upstream.dmds import DmdsDriver

log = structlog.get_logger("gateway.app")


@dataclass
class App:
    settings: Settings
    transport: Transport = "httpx"
    drivers: dict[str, DmdsDriver] = field(default_factory=dict)
    listeners: Listeners | None = None
    _campaigns: dict[tuple[str, int], tuple[bool, float]] = field(default_factory=dict)

    async def start(self) -> None:
        for name, account in self.settings.accounts.items():
            self.drivers[name] = DmdsDriver(
                account.base_url,
                account.apikey.get_secret_value(),
                timeout=account.http_timeout,
                max_connections=account.max_connections,
                transport=self.transport,
            )
        self.authenticator = Authenticator(self.settings.accounts, self._campaign_key)
        drivers: dict[str, Driver] = dict(self.drivers)
        self.pipeline = Pipeline(self.settings, Delivery(drivers), self._campaign_known)
        self.listeners = Listeners(self.settings, self.pipeline, self.authenticator)
        await self.listeners.start()

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

    @property
    def ports(self) -> dict[str, int]:
        return self.listeners.ports if self.listeners else {}

    async def stop(self, drain_timeout: float = 30.0) -> None:
        if self.listeners is not None:
            await self.listeners.drain(drain_timeout)
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
    log.info("ready", listeners=app.ports)
    try:
        await stop.wait()
    finally:
        log.info("shutting_down", drain_timeout=drain_timeout)
        await app.stop(drain_timeout)
