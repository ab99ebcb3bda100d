"""Composition root: build every part from Settings, serve on one event loop, reload on SIGHUP, shut down
gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from gateway.auth.credentials import Authenticator
from gateway.auth.onetime import OneTimeLogins
from gateway.config import ConfigError, ConfigFileError, DnsSettings, Settings, preflight
from gateway.config.oauth import OAuthSettings
from gateway.config.reload import ConfigStatus, ReloadPlan, plan_reload
from gateway.core.errors import QueueTooNew, SpoolUnavailable
from gateway.core.waits import idle
from gateway.delivery.health import AccountHealth
from gateway.delivery.leaseowners import owner_id
from gateway.delivery.owner import DeliveryOwner
from gateway.delivery.worker import RetryWorker
from gateway.ledger import retention
from gateway.ledger.backends import open_ledger
from gateway.ledger.recorder import Recorder
from gateway.ledger.returns import ReturnStore
from gateway.ledger.store import LedgerStore
from gateway.ledger.suppression import SuppressionSet
from gateway.ledger.writer import LedgerWriter
from gateway.limits.clients import AuthGuard, Defenses, ScopedLedger
from gateway.limits.lockouts import LocalLockouts, Lockouts
from gateway.limits.quotas import QuotaTracker
from gateway.ops import logs, tasks
from gateway.ops.clockskew import ClockWatch
from gateway.ops.memory import MmapThreshold, set_mmap_threshold
from gateway.ops.metrics import AUTH_TRACKED, CONFIG_RELOADS, INTERNAL_ERRORS, zero_alerted
from gateway.ops.queuestats import QUEUE_STATS
from gateway.ops.quotastats import QUOTA_STATS
from gateway.ops.signals import Hangups, StopSignals
from gateway.pipeline import Pipeline
from gateway.policy.dns import DnsResolver
from gateway.policy.domaincheck import check_domains
from gateway.providers import registry
from gateway.providers.base import Provider
from gateway.queue.backends import open_store
from gateway.queue.store import QueueStore
from gateway.returnpath.service import ReturnPath
from gateway.smtp import tickets
from gateway.smtp.protocol import GatewaySMTP
from gateway.smtp.server import Listeners
from gateway.smtp.tls import CertificateError, server_context
from gateway.upstream.client import HttpClient

if TYPE_CHECKING:
    from gateway.auth.oauth import OAuthVerifier
    from gateway.console.web import Console
    from gateway.ops.apiauth import TokenAuth
    from gateway.ops.http import OperatorEndpoint

log = structlog.get_logger("gateway.app")

# How often the queue's depth and ages are read for /metrics (a scrape reads the last figures).
QUEUE_STATS_EVERY = 10.0


def resolver_for(d: DnsSettings) -> DnsResolver:
    return DnsResolver(d.nameservers or None, d.port, d.timeout, d.max_ttl, d.negative_ttl)


def oauth_verifier(settings: OAuthSettings) -> OAuthVerifier | None:
    """Token logins of the configured issuers, each fetching its keys with an HTTP client of its own.

    Raises ConfigFileError (naming the key) for a `ca_file` that cannot be loaded, before any client is made:
    at start a one-line refusal, at a reload a refused reload (the running configuration kept)."""
    if not settings.issuers:
        return None
    problems = preflight.oauth_ca_files(settings)
    if problems:
        raise ConfigFileError("\n".join(f.text for f in problems))
    # Here, not at the top: a process without token logins never loads them.
    from gateway.auth.jwks import JwksKeys
    from gateway.auth.oauth import OAuthVerifier

    keys = {}
    for issuer in settings.issuers:
        url = urlsplit(issuer.jwks_url)
        client = HttpClient(
            f"{url.scheme}://{url.netloc}",
            upstream=f"JWKS of {issuer.name}",
            account=issuer.name,
            timeout=issuer.http_timeout,
            max_connections=2,
            ca_file=issuer.ca_file,
            vendor=False,  # timed apart from the accounts' vendor calls
        )
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        fetch = functools.partial(client.request, "jwks", "GET", path, headers={"Accept": "application/json"})
        keys[issuer.name] = JwksKeys(issuer, fetch, client.aclose)
    return OAuthVerifier(settings.issuers, keys)


@dataclass
class App:
    settings: Settings
    # Reads the configuration again (file + environment) for a reload; None: only certificates reload.
    source: Callable[[], Settings] | None = None
    providers: dict[str, Provider] = field(default_factory=dict)
    listeners: Listeners | None = None
    store: QueueStore | None = None
    owner: DeliveryOwner | None = None
    worker: RetryWorker | None = None
    operator: OperatorEndpoint | None = None
    ledger: LedgerStore | None = None
    ledger_writer: LedgerWriter | None = None
    api_auth: TokenAuth | None = None
    returnpath: ReturnPath | None = None
    console: Console | None = None
    # When the configuration was loaded and what the last reload did (the console shows it).
    config_status: ConfigStatus = field(default_factory=ConfigStatus)
    # The console's test send logs in with these (gateway/auth/onetime.py), keyed by the secret the workers of
    # `serve --workers N` share, so any worker takes a password another one's console issued.
    onetime: OneTimeLogins = field(default_factory=lambda: OneTimeLogins(shared=tickets.shared_secrets))
    lockouts: Lockouts = field(init=False)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _clock_watch: ClockWatch = field(default_factory=ClockWatch)  # this host's clock against the queue database's
    _retired: list[Provider] = field(default_factory=list)
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock)
    # run() froze what was alive at the start (gc.freeze): only then does a reload touch the collector. An App
    # started inside another program (the tests) leaves that program's collector alone.
    _frozen: bool = False
    # Set when the queue or its ledger turns out written by a newer version after the start (opened lazily
    # after an outage): run() stops the process with it, as the start would have refused it.
    too_new: QueueTooNew | None = None
    _too_new_seen: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.lockouts = LocalLockouts(self._guards)

    def _newer_version(self, reason: str) -> None:
        """The queue (or ledger) was migrated by a newer version while this one ran: serving on would answer
        452 to every message that needs the queue and retry the ledger for ever. Said once; run() stops."""
        if self.too_new is not None:
            return
        self.too_new = QueueTooNew(reason)
        # Fatal: the queue (or its ledger) was migrated by a newer version after this process started; /readyz
        # answers 503 with the reason and the process drains and exits 1, as a start on that queue is refused.
        log.critical("queue_too_new", error=reason, effect="stopping (exit 1), as a start on it is refused")
        self._too_new_seen.set()

    async def newer_version(self) -> QueueTooNew:
        """Wait until the queue turns out written by a newer version (see _newer_version)."""
        await self._too_new_seen.wait()
        assert self.too_new is not None
        return self.too_new

    def freeze(self) -> None:
        """Everything alive now (modules, configuration, pools) lives as long as the process: out of the cyclic
        collector's generations, so its full collections walk only what sessions and messages allocate. For
        the program that owns the process (run()); a reload then refreezes what lives on."""
        gc.freeze()
        self._frozen = True

    def thaw(self) -> None:
        """Undo freeze(): every object back within the collector's reach, and reloads leave it alone."""
        gc.unfreeze()
        self._frozen = False

    def _guards(self) -> list[tuple[str, AuthGuard]]:
        """The per-IP AUTH throttles of this process, by what they guard."""
        found = []
        if self.listeners is not None and self.listeners.defenses is not None:
            found.append(("smtp", self.listeners.defenses.auth))
        if self.api_auth is not None:
            found.append(("api", self.api_auth.guard))
        if self.console is not None:
            found.append(("console", self.console.signin.guard))
        return found

    async def start(self) -> None:
        settings = self.settings
        tuned = set_mmap_threshold(settings.limits.malloc_mmap_threshold)
        if tuned is not MmapThreshold.SET:
            log.info("malloc_mmap_threshold", result=tuned.value, configured=settings.limits.malloc_mmap_threshold)
        # The queue is opened before listening; what another instance (or the last run) left is resumed.
        self.store = open_store(settings.delivery)
        try:
            await self.store.open()
        except QueueTooNew:
            raise  # written by a newer version: refused (serve exits 1 naming it), never served on
        except SpoolUnavailable as exc:
            # Not fatal: the healthy path needs no queue; messages that need it get 452 4.3.1 until it can
            # be opened (each use tries again).
            log.error("queue_unavailable", queue=self.store.url, error=exc.reason)
            self.store.health.record("read", exc.reason)
        # From here on a queue found newer (opened lazily) stops the process rather than refusing every use.
        self.store.health.on_too_new = self._newer_version
        self.health = AccountHealth(list(settings.accounts))
        for name, account in settings.accounts.items():
            self.providers[name] = registry.build(name, account, self.store, self.health)
            for note in account.notes():
                log.warning("account_note", account=name, note=note)
        self.authenticator = Authenticator(settings.accounts, self.providers, onetime=self.onetime)
        self.resolver = resolver_for(settings.dns)
        # The message ledger beside the queue: rows buffered here, written by the writer's task. On a full
        # disk it leaves the queue's reserve alone.
        store = self.store
        self.ledger = open_ledger(
            settings.delivery, disk_full=lambda: store.health.reserve_released, too_new=store.health.newer_version
        )
        self.ledger_writer = LedgerWriter(self.ledger, settings.ledger)
        self.ledger_writer.start()
        owner = owner_id(settings.delivery.instance_name)
        recorder = Recorder(
            self.ledger_writer.put,
            owner,
            enabled=settings.ledger.enabled,
            keep_requests=settings.ledger.keep_requests,
            keep_bodies=settings.ledger.keep_bodies,
        )
        self._spawn(retention.run(self.ledger, lambda: self.settings.ledger))
        self.owner = DeliveryOwner(
            self.providers, self.store, settings.delivery, self.health, owner=owner, ledger=recorder
        )
        # After the 250: events read back, suppressions, notices, webhooks (docs/after-250.md).
        self.returnpath = ReturnPath(settings, self.ledger, self.owner, recorder, owner)
        self.returnpath.start(self.providers)
        dsettings = settings.delivery
        self.worker = RetryWorker(
            self.owner,
            list(settings.accounts),
            dsettings.concurrency,
            dsettings.poll_interval,
            dsettings.probe_interval,
        )
        self.worker.start()
        self._spawn(self._unconfigured_queued())
        # Another instance made something due: wake the worker now rather than at its next poll.
        self._spawn(self.store.listen(lambda account: self.owner.wakeup.set() if self.owner else None))
        self._spawn(self._queue_stats())
        self.pipeline = Pipeline(
            settings, self.providers, self.owner, resolver=self.resolver, suppressions=self.returnpath.suppressions
        )
        quotas = QuotaTracker(self.store)  # per-login quotas, counted with every instance on the queue
        QUOTA_STATS.track(quotas)
        oauth = await asyncio.to_thread(oauth_verifier, settings.oauth)  # reads any ca_file
        # AUTH failures per client IP are counted for every process and instance on the queue.
        defenses = Defenses(settings.limits, shared=ScopedLedger(self.store, None))
        self.listeners = Listeners(
            settings, self.pipeline, self.authenticator, quotas=quotas, oauth=oauth, defenses=defenses
        )
        await self.listeners.start()
        # The alerted counters' series at 0 from the start, so that increase() sees their first event.
        zero_alerted(settings.accounts, self.listeners.ports)
        http = settings.http
        if http.port is not None:
            # Here, not at the top: the console's templates (jinja2), aiohttp's web server and the API's token
            # checks cost memory a process without an operator endpoint never uses.
            from gateway.console.web import Console
            from gateway.ops.api import MessageApi
            from gateway.ops.apiauth import TokenAuth
            from gateway.ops.http import OperatorEndpoint

            self.api_auth = TokenAuth(http.api_tokens, settings.limits, ScopedLedger(self.store, "api"))
            self.console = Console(self)
            api = MessageApi(self.ledger, self.api_auth, self.returnpath.returns, self.returnpath.suppressions)
            self.operator = OperatorEndpoint(
                problems=self.problems, degraded=self.degraded, api=api, console=self.console
            )
            tls = None
            if http.tls_cert_file is not None and http.tls_key_file is not None:
                try:
                    tls = server_context("intermediate", [(http.tls_cert_file, http.tls_key_file)])
                except CertificateError as exc:  # checked by the preflight: changed since
                    raise ConfigFileError(f"http.tls_cert_file / http.tls_key_file cannot be loaded: {exc}") from None
            port = await self.operator.start(http.address, http.port, tls)
            self.operator.is_ready = True
            log.info(
                "operator_endpoint_started",
                address=http.address,
                port=port,
                tls=tls is not None,
                api="on" if http.api_tokens else "off (no http.api_tokens)",
                console="on" if settings.console.enabled else "off (console.enabled)",
            )
        if settings.dns.check_sender_domain:
            self._spawn(self._log_domain_findings())

    def problems(self) -> list[str]:
        """Why this instance cannot take mail now, so the balancer should send it elsewhere (/readyz 503): its
        own queue (a SQLite file on its disk) failing or its disk full. Draining is the endpoint's own flag."""
        return self.store.health.problems() if self.store is not None else []

    def degraded(self) -> list[str]:
        """Faults every instance shares, said by /readyz and /healthz while the instance stays ready (taking
        them all out would leave the balancer no server, while each can still take mail): an upstream refusing
        the account's key (messages are queued with a 250), the shared PostgreSQL queue down (inline delivery
        goes on with a 250; only messages that need the queue get 452 4.3.1)."""
        found = self.health.degraded()
        if self.store is not None:
            found += self.store.health.degraded()
        return found

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(tasks.report_failure)  # a bug: logged and counted, not left to asyncio

    async def _queue_stats(self) -> None:
        """Keep the queue figures for /metrics fresh (and notice a queue that cannot be read), and the count of
        client IPs with AUTH failures remembered."""
        assert self.store is not None
        while True:
            try:
                self._auth_figures()
                await self._queue_figures()
            except Exception as exc:  # a bug: counted and logged; the figures go on next round
                tasks.loop_failed("queue_stats", exc)
            await idle(QUEUE_STATS_EVERY)

    async def _queue_figures(self) -> None:
        assert self.store is not None
        try:
            QUEUE_STATS.update(await self.store.counts(time.time()))
        except SpoolUnavailable as exc:
            self.store.health.record("read", exc.reason)
        else:
            self.store.health.record("read", None)
            await self._measure_clock()

    def _auth_figures(self) -> None:
        """smtp_gateway_auth_failure_ips, read again: the guard forgets failures when their time is up but only
        notices when read (an AUTH failure sets the gauge too), so a wave's addresses would stay counted until
        the next failure. Reading it here prunes what expired."""
        if self.listeners is not None and self.listeners.defenses is not None:
            AUTH_TRACKED.set(len(self.listeners.defenses.auth))

    async def _measure_clock(self) -> None:
        """This host's clock against the shared queue database's (exported and logged: the queue's leases and due
        times are on the database's clock, but ledger timestamps and quota windows are on this host's)."""
        assert self.store is not None
        try:
            offset = await self.store.clock_offset()
        except SpoolUnavailable:
            return  # the stats poll just read the queue; an outage now is the next poll's to report
        if offset is not None:
            self._clock_watch.observe(offset)

    async def _unconfigured_queued(self) -> None:
        """Messages queued for accounts no longer configured (removed by a reload, or before a restart): said
        once per account, and handed to the retry worker with the configured accounts, so they are dead letters
        at max_lifetime like any other (or delivered, if their account comes back before)."""
        assert self.store is not None and self.worker is not None
        try:
            waiting = await self.store.waiting()
        except SpoolUnavailable as exc:
            # The queue could not say which accounts have messages: those of accounts no longer configured are
            # looked for again at the next reload or start (the worker reports the queue's outage itself).
            log.warning("queue_unconfigured_check_failed", reason=exc.reason)
            return
        configured = self.settings.accounts
        unconfigured = {account: n for account, n in sorted(waiting.items()) if account not in configured}
        for account, count in unconfigured.items():
            # Messages of an account not in the configuration: each attempt is deferred ("account X is no
            # longer configured") and they become dead letters at delivery.max_lifetime, unless the account is
            # configured again before.
            log.warning(
                "queue_account_not_configured",
                account=account,
                messages=count,
                max_lifetime=self.settings.delivery.max_lifetime,
                action="dead-lettered at max_lifetime unless the account is configured again",
            )
        self.worker.set_accounts(list(configured), list(unconfigured))

    async def _log_domain_findings(self) -> None:
        """The same findings as `smtp-gateway check-domains`, logged once at startup (and after a reload)."""
        for name, account in self.settings.accounts.items():
            for report in await check_domains(self.resolver, dict(account.return_paths())):
                fields = {"account": name, "domain": report.domain, "return_path": report.return_path}
                if report.problems:
                    log.error("sender_domain_problem", problems=report.problems, **fields)
                elif report.warnings:
                    log.warning("sender_domain_warning", warnings=report.warnings, **fields)
                else:
                    log.info("sender_domain_ok", **fields)

    # -- reload (SIGHUP) -------------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP: read the configuration again and apply it (or, without a source, the certificates)."""

        async def reload() -> None:
            try:
                await self.reload()  # logs its outcome
            except Exception as exc:  # a bug: the running configuration stays; said once, counted
                INTERNAL_ERRORS.labels(where="reload").inc()
                log.error("config_reload_internal_error", action="kept the running configuration", exc_info=exc)

        self._spawn(reload())

    async def reload(self) -> bool:
        """Apply the configuration as it is now, if it is valid; else keep the running one and say why.

        New sessions get the new logins, accounts, limits and certificates; sessions in progress finish with
        what they started with. What needs a restart is kept and named (gateway/config/reload.py)."""
        listeners = self.listeners
        if listeners is None:
            return False
        async with self._reloading:
            if self.source is None:  # no configuration file: the certificates only, counted like a reload's
                loaded = await listeners.reload_tls()
                CONFIG_RELOADS.labels(result="ok" if loaded else "tls_failed").inc()
                return loaded
            oauth = listeners.oauth
            try:
                new = await asyncio.to_thread(self.source)  # reads the file and any *_file secrets
                plan = plan_reload(self.settings, new)
                # Every other file the new configuration names is read here too, before anything is applied:
                # each raises ConfigError (a ConfigFileError for a file) like the configuration's own text.
                if plan.settings.oauth != self.settings.oauth:
                    oauth = await asyncio.to_thread(oauth_verifier, plan.settings.oauth)  # reads any ca_file
            except (ConfigError, ValueError) as exc:
                CONFIG_RELOADS.labels(result="invalid").inc()
                self.config_status.record("invalid", str(exc))
                log.error("config_reload_failed", reason=str(exc), action="kept the running configuration")
                return False
            try:
                contexts = await asyncio.to_thread(listeners.prepare_tls, plan.settings)
            except CertificateError as exc:
                if oauth is not None and oauth is not listeners.oauth:
                    await oauth.aclose()  # built for this reload, never used
                CONFIG_RELOADS.labels(result="tls_failed").inc()
                self.config_status.record("tls_failed", str(exc))
                log.error(
                    "tls_reload_failed",
                    reason=str(exc),
                    action="kept the certificate and the configuration already loaded",
                )
                return False
            self._apply(plan, listeners, contexts, oauth)
            if self._frozen:
                # The replaced configuration was frozen with the rest at the start: back within the
                # collector's reach, its cycles collected, and what lives on frozen again.
                gc.unfreeze()
                gc.collect()
                gc.freeze()
            CONFIG_RELOADS.labels(result="ok").inc()
            self.config_status.record("ok", plan=plan)
            log.info("config_reloaded", changed=plan.changed, restart_needed=plan.restart_needed)
            if plan.restart_needed:
                log.warning(
                    "config_reload_restart_needed",
                    keys=plan.restart_needed,
                    note="these changes take effect at the next restart; the running values are kept",
                )
            return True

    def _apply(
        self,
        plan: ReloadPlan,
        listeners: Listeners,
        contexts: tuple[dict[str, ssl.SSLContext], dict[str, str]] | None,
        oauth: OAuthVerifier | None,
    ) -> None:
        old, new = self.settings, plan.settings
        assert self.owner is not None and self.worker is not None and self.store is not None
        # An account whose settings did not change keeps its provider: its token, caches and HTTP pool.
        providers: dict[str, Provider] = {}
        for name, account in new.accounts.items():
            current = self.providers.get(name)
            if current is None or old.accounts.get(name) != account:
                current = registry.build(name, account, self.store, self.health)
            providers[name] = current
        retired = [p for name, p in self.providers.items() if providers.get(name) is not p]
        sessions_before = set(listeners.sessions)
        self.providers = providers
        self.authenticator = Authenticator(new.accounts, providers, onetime=self.onetime)
        if new.dns != old.dns:
            self.resolver = resolver_for(new.dns)
        self.health.track(list(new.accounts))
        zero_alerted(new.accounts)  # an added account's alerted series at 0 too
        self.owner.providers = providers
        self.owner.ledger.enabled = new.ledger.enabled
        self.owner.ledger.keep_requests = new.ledger.keep_requests
        self.owner.ledger.keep_bodies = new.ledger.keep_bodies
        if self.ledger_writer is not None:
            self.ledger_writer.configure(new.ledger)
        if self.api_auth is not None:
            self.api_auth.configure(new.http.api_tokens, new.limits)
        if self.console is not None:
            self.console.configure(new)
        self.worker.set_accounts(list(new.accounts))
        self._spawn(self._unconfigured_queued())
        suppressions = None
        if self.returnpath is not None:
            self.returnpath.configure(new, providers)
            suppressions = self.returnpath.suppressions
        self.pipeline = Pipeline(new, providers, self.owner, resolver=self.resolver, suppressions=suppressions)
        retired_oauth, listeners.oauth = listeners.oauth, oauth
        listeners.apply(new, self.pipeline, self.authenticator, contexts)
        logs.reconfigure(new.log)
        self.settings = new
        if retired or (retired_oauth is not None and retired_oauth is not oauth):
            self._retired += retired
            self._spawn(self._retire(retired, sessions_before, retired_oauth if retired_oauth is not oauth else None))
        if new.dns.check_sender_domain and new.accounts != old.accounts:
            self._spawn(self._log_domain_findings())

    async def _retire(
        self, providers: list[Provider], sessions: set[GatewaySMTP], oauth: OAuthVerifier | None = None
    ) -> None:
        """Close replaced providers (and token verifier) once nothing can use them: the sessions that were open
        at the reload have ended and the delivery attempts running then have finished."""
        assert self.listeners is not None and self.owner is not None
        await self.listeners.ended(sessions)
        if oauth is not None:
            with contextlib.suppress(Exception):
                await oauth.aclose()
        await self.owner.running()
        for provider in providers:
            with contextlib.suppress(Exception):
                await provider.aclose()
            self._retired.remove(provider)

    @property
    def ports(self) -> dict[str, int]:
        return self.listeners.ports if self.listeners else {}

    @property
    def returns(self) -> ReturnStore | None:
        return self.returnpath.returns if self.returnpath is not None else None

    @property
    def suppressions(self) -> SuppressionSet | None:
        return self.returnpath.suppressions if self.returnpath is not None else None

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
        if self.returnpath is not None:
            await self.returnpath.stop()  # before the owner: a notice being handed to it finishes or is retaken
        if self.owner is not None:
            await self.owner.stop(self.settings.delivery.shutdown_timeout)
        if self.ledger_writer is not None:
            await self.ledger_writer.stop()  # what the attempts recorded up to here
        if self.ledger is not None:
            await self.ledger.close()
        if self.store is not None:
            await self.store.close()
        QUEUE_STATS.clear()
        QUOTA_STATS.track(None)
        for provider in [*self.providers.values(), *self._retired]:
            with contextlib.suppress(Exception):
                await provider.aclose()
        if self.listeners is not None and self.listeners.oauth is not None:
            with contextlib.suppress(Exception):
                await self.listeners.oauth.aclose()
        log.info("stopped")


async def run(
    app: App,
    drain_timeout: float = 30.0,
    started: Callable[[App], None] | None = None,
    hangups: Hangups | None = None,
    unready_delay: float = 0.0,
) -> signal.Signals:
    """Start, wait for SIGTERM/SIGINT, then drain and stop; returns the signal. SIGHUP reloads (one received
    while starting, here or in `hangups` before, once started). `started` is called once the listeners are
    bound (before the `ready` event). `unready_delay`: seconds /readyz answers 503 before the drain, while
    new sessions are still served (a second stop signal ends it)."""
    stop = StopSignals()
    stop.install()  # before the start: a signal while starting stops it right after
    hangups = hangups or Hangups()
    hangups.install()  # before the start too: SIGHUP's default action would end the process
    try:
        await app.start()
    except BaseException:
        # A start that fails part-way (a port taken, a certificate) stops what it had started: open listeners
        # (a shared SO_REUSEPORT port would hand this process connections), the retry worker's claims.
        with contextlib.suppress(Exception):  # the start's own error is the one to report
            await app.stop(0.0)
        raise
    if hangups.started(app.request_reload):
        # A SIGHUP came while starting (systemctl reload during the queue's open): the configuration is read
        # again now, as it may have changed after the start read it.
        log.info("reload_after_start", reason="SIGHUP received while starting")
        app.request_reload()
    if started is not None:
        started(app)
    app.freeze()
    # The bound ports (a port configured as 0 is any free one): what a supervisor or a test connects to.
    log.info("ready", listeners=app.ports, **({"http": app.operator.port} if app.operator else {}))
    try:
        received = await _stop_or_too_new(stop, app)
        if unready_delay > 0 and app.operator is not None and app.too_new is None:
            # A load balancer learns from /readyz that this instance is leaving only at its next health checks
            # (HAProxy `inter 5s fall 2`: up to 10 s): meanwhile it still sends sessions, served as before
            # rather than refused with 421.
            app.operator.is_ready = False
            log.info("unready", seconds=unready_delay, then="drain")
            if await stop.again(unready_delay):
                log.info("unready_cut_short", reason="a second stop signal")
    finally:
        log.info("shutting_down", drain_timeout=drain_timeout, signal=stop.received.name if stop.received else None)
        await app.stop(drain_timeout)
    if app.too_new is not None:
        raise app.too_new  # serve exits 1 naming it, as when the start finds it
    return received


async def _stop_or_too_new(stop: StopSignals, app: App) -> signal.Signals:
    """The first stop signal, or SIGTERM's part when the queue turns out written by a newer version."""
    signalled = asyncio.ensure_future(stop.wait())
    newer = asyncio.ensure_future(app.newer_version())
    try:
        await asyncio.wait({signalled, newer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (signalled, newer):
            task.cancel()
    if signalled.done() and not signalled.cancelled():
        return signalled.result()
    return signal.SIGTERM
