"""The return path of one process: its event pollers (one per account whose events are read), the DMDS
invalid-contact reads, the notice sender, the webhook sender and the suppression copy, started and stopped
with the server and reconfigured on SIGHUP. Every instance runs all of them: leases in the shared tables
make each account's poll, each notice decision and each webhook delivery one instance's at a time."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Coroutine, Mapping
from typing import Any

import structlog

from gateway.config import EventSettings, Settings, WebhookSettings
from gateway.core.waits import idle
from gateway.delivery.leaseowners import dead_local_owners
from gateway.delivery.owner import DeliveryOwner
from gateway.ledger.announce import Subscriptions
from gateway.ledger.backends import open_returns
from gateway.ledger.recorder import Recorder
from gateway.ledger.store import LedgerStore, LedgerUnavailable
from gateway.ledger.suppression import SuppressionSet
from gateway.ops import tasks as background
from gateway.providers.base import Provider
from gateway.returnpath.contacts import InvalidContacts
from gateway.returnpath.notices import NoticeSender
from gateway.returnpath.poller import Context, EventPoller
from gateway.returnpath.webhooks import WebhookSender
from gateway.upstream.client import HttpClient

log = structlog.get_logger("gateway.returnpath")

PENDING_EVERY = 10.0  # how often the webhook pending gauge is read from the shared outbox
DEAD_OWNER_CHECK = 5.0  # how often leases of this instance's processes that are gone are looked for


class ReturnPath:
    def __init__(
        self, settings: Settings, ledger: LedgerStore, owner: DeliveryOwner, recorder: Recorder, actor: str
    ) -> None:
        self.settings = settings
        self.owner = owner
        self.recorder = recorder
        self.returns = open_returns(ledger)
        self.suppressions = SuppressionSet()
        self.subscriptions = Subscriptions(settings.webhooks)
        recorder.subscriptions = self.subscriptions
        # The one HTTP client of every webhook (each delivery gives its own timeout).
        self.http = HttpClient(
            "", upstream="webhook", account="webhooks", timeout=30.0, max_connections=64, vendor=False
        )
        self.webhooks = WebhookSender(
            self.returns,
            self.http,
            actor,
            self._hooks,
            concurrency=settings.return_path.webhook_concurrency,
            poll_interval=lambda: self.settings.return_path.poll_interval,
        )
        self.notices = NoticeSender(
            self.returns, owner, lambda: self._providers, lambda: self.settings, self.suppressions, actor=actor
        )
        self.ctx = Context(self.returns, actor, lambda: self.subscriptions, self.suppressions, self._written)
        self.pollers: dict[str, EventPoller] = {}
        self._account_tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._providers: Mapping[str, Provider] = {}

    def _hooks(self) -> dict[str, WebhookSettings]:
        return {w.name: w for w in self.settings.webhooks}

    def _written(self) -> None:
        self.webhooks.wakeup.set()
        self.notices.wakeup.set()

    def _spawn(
        self, coro: Coroutine[Any, Any, None], into: set[asyncio.Task[None]] | None = None
    ) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        tasks = self._tasks if into is None else into
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(background.report_failure)  # a bug: logged and counted, not left to asyncio
        return task

    def start(self, providers: Mapping[str, Provider]) -> None:
        self._spawn(self.suppressions.run(self.returns, lambda: self.settings.return_path.suppression_refresh))
        self._spawn(self.webhooks.run())
        self._spawn(self.notices.run())
        self._spawn(self._pending())
        self._spawn(self._reap())
        self._accounts(providers)

    def _accounts(self, providers: Mapping[str, Provider]) -> None:
        """A poller (and a contacts read) per account whose events are read, with its current provider."""
        for name in list(self._account_tasks):
            if providers.get(name) is not self._providers.get(name):
                for task in self._account_tasks.pop(name):
                    task.cancel()
                self.pollers.pop(name, None)
        for name, provider in providers.items():
            if name in self._account_tasks:
                continue
            source = provider.event_source()
            if source is None:
                continue
            contacts = provider.contacts()
            poller = EventPoller(
                name,
                source,
                contacts,
                functools.partial(self._events, name),
                functools.partial(self._suppress, name),
                self.ctx,
            )
            self.pollers[name] = poller
            tasks: set[asyncio.Task[None]] = set()
            self._spawn(poller.run(), tasks)
            if contacts is not None:
                sync = InvalidContacts(
                    name,
                    contacts,
                    functools.partial(self._invalid_interval, name),
                    self.returns,
                    self.ctx.owner,
                    self.suppressions,
                )
                self._spawn(sync.run(), tasks)
            self._account_tasks[name] = list(tasks)
            log.info("events_polling", account=name, interval=self.settings.accounts[name].events.interval)
        self._providers = dict(providers)

    def _events(self, account: str) -> EventSettings:
        return self.settings.accounts[account].events

    def _suppress(self, account: str) -> bool:
        return self.settings.accounts[account].suppress_recipients

    def _invalid_interval(self, account: str) -> float:
        """Seconds between reads of the vendor's invalid contacts (a DMDS setting; 0: none)."""
        return float(getattr(self.settings.accounts[account].events, "invalid_interval", 0.0))

    def configure(self, settings: Settings, providers: Mapping[str, Provider]) -> None:
        """A reload: the webhooks and pacing now; an account whose provider was replaced gets a new poller."""
        self.settings = settings
        self.subscriptions = Subscriptions(settings.webhooks)
        self.recorder.subscriptions = self.subscriptions
        self._accounts(providers)

    def poll_now(self) -> None:
        """Every poller polls now (tests; an operator's nudge)."""
        for poller in self.pollers.values():
            poller.wakeup.set()

    async def _pending(self) -> None:
        while True:
            try:
                await self.webhooks.count_pending()
            except LedgerUnavailable:
                pass
            except Exception as exc:  # a bug: counted and logged; the gauges go on next round
                background.loop_failed("webhook_pending", exc)
            await idle(PENDING_EVERY)

    async def _reap(self) -> None:
        """Leases of this instance's processes that are gone (killed) end now, not after their time: a restarted
        gateway resumes their polls, notices and webhook deliveries at once (as the retry worker does for the
        queue's messages)."""
        while True:
            try:
                dead = dead_local_owners(self.ctx.owner, await self.returns.owners())
                if dead:
                    count = await self.returns.expire_owners(dead, time.time())
                    log.warning("return_path_dead_owners_expired", owners=dead, leases=count)
            except LedgerUnavailable:
                pass
            except Exception as exc:  # a bug: counted and logged; the reaper goes on next round
                background.loop_failed("return_path_reaper", exc)
            await idle(DEAD_OWNER_CHECK)

    async def stop(self) -> None:
        tasks = [*self._tasks, *(t for ts in self._account_tasks.values() for t in ts)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._account_tasks.clear()
        with contextlib.suppress(Exception):
            await self.http.aclose()
