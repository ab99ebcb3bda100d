"""Listeners: one asyncio server per configured listener, all on the one event loop, with graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from gateway.auth.controls import LoginControls
from gateway.auth.credentials import Authenticator
from gateway.config import ConfigFileError, LimitsSettings, Settings, TlsSettings
from gateway.core import replies
from gateway.limits.budget import ByteBudget
from gateway.limits.clients import Defenses, client_key
from gateway.limits.quotas import QuotaTracker
from gateway.ops.metrics import (
    CONNECTIONS_REFUSED,
    REFUSALS,
    SESSIONS,
    SESSIONS_ACTIVE,
    TLS_CERTIFICATE_EXPIRY,
)
from gateway.pipeline import Pipeline
from gateway.smtp.descriptors import DescriptorWatch
from gateway.smtp.gate import Gate
from gateway.smtp.handler import GatewayHandler
from gateway.smtp.handshake import HandshakeFailures, ListenerTls
from gateway.smtp.logins import PerLogin
from gateway.smtp.protocol import GatewaySMTP
from gateway.smtp.tls import NOT_BEFORE_SLACK, CertificateError, Profile, describe_certificate, server_context, validity

if TYPE_CHECKING:
    from gateway.auth.oauth import OAuthVerifier

log = structlog.get_logger("gateway.smtp")

# asyncio's default; shorter when the session timeout is (an idle half-open handshake holds a session slot).
HANDSHAKE_TIMEOUT = 60.0
# Drain: how long a client gets to complete the close (a TLS client answers close_notify) before the
# connection is aborted.
CLOSE_GRACE = 1.0
# Drain: how long storing a message whose inline budget ran out may take (SQLite's busy timeout and
# PostgreSQL's pool wait are both 10 s), added to delivery.inline_budget for a session past its final ".".
STORE_GRACE = 10.0


def certificate_chains(tls: TlsSettings) -> list[tuple[Path, Path]]:
    assert tls.cert_file and tls.key_file
    chains = [(tls.cert_file, tls.key_file)]
    if tls.extra_cert_file and tls.extra_key_file:
        chains.append((tls.extra_cert_file, tls.extra_key_file))
    return chains


CERT_KEYS = ["tls.cert_file / tls.key_file:", "tls.extra_cert_file / tls.extra_key_file:"]


def check_current(tls: TlsSettings, now: datetime.datetime | None = None) -> None:
    """Raise CertificateError when a certificate the listeners would serve has expired or is not valid yet: a
    reload keeps the one it has (`serve` refuses either at start, gateway/config/preflight.py, so a reload
    that took it would only defer the failure to the next restart)."""
    now = now or datetime.datetime.now(datetime.UTC)
    for (cert, _), name in zip(certificate_chains(tls), ("tls.cert_file", "tls.extra_cert_file"), strict=False):
        try:
            begins, ends = validity(cert)
        except (ValueError, OSError):
            continue  # OpenSSL loaded it: a format only it knows (as the preflight's check)
        if ends <= now:
            raise CertificateError(f"{name} {cert} expired on {ends:%Y-%m-%d %H:%M} UTC: renew the certificate")
        if begins > now + NOT_BEFORE_SLACK:
            raise CertificateError(
                f"{name} {cert} is not valid before {begins:%Y-%m-%d %H:%M} UTC (its notBefore): check the "
                "machine's clock or the certificate"
            )


def certificate_expiry(tls: TlsSettings) -> float | None:
    """When the first of the certificates the listeners serve expires (Unix time), None if none can be read."""
    ends = []
    for cert, _ in certificate_chains(tls):
        with contextlib.suppress(ValueError, OSError):
            ends.append(validity(cert)[1].timestamp())
    return min(ends) if ends else None


def load_contexts(
    tls: TlsSettings, profiles: dict[str, Profile], *, current: bool = False
) -> tuple[dict[str, ssl.SSLContext], dict[str, str]]:
    """One new SSLContext per listener (name -> profile), and what the main certificate is, for the log.
    With `current` (a reload), a certificate that has expired or is not valid yet is refused too.

    Raises CertificateError: nothing is half-replaced by a file that does not load.
    """
    chains = certificate_chains(tls)
    if current:
        check_current(tls)
    contexts = {name: server_context(profile, chains, CERT_KEYS) for name, profile in profiles.items()}
    try:
        described = describe_certificate(chains[0][0])
    except ValueError as exc:
        raise CertificateError(f"{chains[0][0]}: {exc}") from None
    return contexts, described


class _Refuse(asyncio.Protocol):
    """Answers one line and hangs up: used while draining or when too many sessions are open.

    No line on an implicit-TLS port (None): the client waits for a TLS handshake, a plaintext line is noise.
    """

    def __init__(self, line: str | None) -> None:
        self.line = line

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refuse(transport, self.line)


def refuse(transport: asyncio.BaseTransport, line: str | None) -> None:
    # uvloop's transports are not asyncio.WriteTransport subclasses: no isinstance check here.
    writer = cast(asyncio.WriteTransport, transport)
    if line is not None:
        REFUSALS.labels(code=replies.codes(line) or line[:3]).inc()
        writer.write(line.encode() + b"\r\n")
    writer.close()


@dataclass
class Listeners:
    """All SMTP servers of the process and the sessions they have open.

    What a new session needs (settings, pipeline, authenticator, each listener's handler and TLS context)
    is read when it starts; `apply` swaps them (SIGHUP) and sessions already open keep what they began with.
    """

    settings: Settings
    pipeline: Pipeline
    authenticator: Authenticator
    servers: list[asyncio.Server] = field(default_factory=list)
    sessions: set[GatewaySMTP] = field(default_factory=set)
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    ports: dict[str, int] = field(default_factory=dict)

    tls: dict[str, ListenerTls] = field(default_factory=dict)
    handshake_failures: HandshakeFailures = field(default_factory=HandshakeFailures)
    defenses: Defenses | None = None
    # Per-login quota counts (shared through the queue store when the app gives one), kept across reloads.
    quotas: QuotaTracker = field(default_factory=lambda: QuotaTracker(None))
    # Token logins (AUTH XOAUTH2, OAUTHBEARER) when [oauth] names issuers; set before apply() on a reload.
    oauth: OAuthVerifier | None = None
    handlers: dict[str, GatewayHandler] = field(default_factory=dict)
    # Connections waiting for their PROXY header (not sessions yet, but they hold a slot).
    gates: set[Gate] = field(default_factory=set)
    # Out of file descriptors: logged once per episode (accept() failing is otherwise silent).
    descriptors: DescriptorWatch = field(default_factory=DescriptorWatch)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _session_metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict, init=False, repr=False)
    # Set while no session is open (drain waits for it).
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        limits = self.settings.limits
        if self.defenses is None:
            self.defenses = Defenses(limits)
        # Bytes of large messages held at once (gateway/limits/budget.py), shared by every session.
        self.budget = ByteBudget(limits.max_large_bytes, limits.large_message_threshold)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle.set()
        limits = self.settings.limits
        profiles = {lsn.name: lsn.tls_profile for lsn in self.settings.listeners if lsn.tls != "none"}
        if profiles:
            try:
                contexts, described = load_contexts(self.settings.tls, profiles)
            except CertificateError as exc:  # checked by the preflight: changed since
                raise ConfigFileError(f"a TLS certificate cannot be loaded: {exc}") from None
            log.info("tls_certificate_loaded", **described)
            self._export_expiry(self.settings.tls, profiles)
            timeout = handshake_timeout(limits)
            for name, profile in profiles.items():
                self.tls[name] = ListenerTls(name, profile, contexts[name], self.handshake_failures, timeout)
                if profile == "legacy":
                    log.warning(
                        "tls_legacy_profile",
                        listener=name,
                        protocols="TLSv1 TLSv1.1 TLSv1.2 TLSv1.3",
                        note="TLS 1.0/1.1 and CBC suites are enabled for old devices; keep this listener for them only",
                    )
        self._build_handlers()
        self.descriptors.start(loop)
        for listener in self.settings.listeners:
            if listener.allow_wide_trusted_network and listener.trusted_map:
                log.warning(
                    "trusted_network_wide_allowed",
                    listener=listener.name,
                    networks=[str(network) for network, _ in listener.trusted_map],
                )
            if listener.allow_wide_proxy_trusted and listener.proxy_protocol:
                # At each start, a listener with allow_wide_proxy_trusted: every host in these networks can claim
                # any client address in a PROXY header (a trusted network's, a fresh one per AUTH guess).
                log.warning(
                    "proxy_trusted_wide_allowed",
                    listener=listener.name,
                    networks=[str(network) for network in listener.proxy_trusted],
                )

            def factory(name: str = listener.name) -> asyncio.BaseProtocol:
                return self._connected(name)

            server = await loop.create_server(
                factory,
                host=listener.address,
                port=listener.port,
                reuse_address=True,
                reuse_port=listener.reuse_port or None,
                backlog=1024,
            )
            self.servers.append(server)
            self.ports[listener.name] = server.sockets[0].getsockname()[1]
            log.info(
                "listener_started",
                listener=listener.name,
                address=listener.address,
                port=self.ports[listener.name],
                tls=listener.tls,
                tls_profile=listener.tls_profile if listener.name in self.tls else None,
                proxy_protocol=listener.proxy_protocol or None,
            )

    def _build_handlers(self) -> None:
        assert self.defenses is not None
        controls = LoginControls(self.settings)
        self.quotas.configured = controls.configured_quotas()
        per_login = PerLogin(controls, self.quotas)
        self.handlers = {
            listener.name: GatewayHandler(
                listener, self.settings.limits, self.pipeline, self.authenticator, self.defenses, per_login, self.oauth
            )
            for listener in self.settings.listeners
        }

    # -- a new connection ----------------------------------------------------------------------------------

    def _connected(self, name: str) -> asyncio.BaseProtocol:
        """The protocol of a new connection: a Gate (admission, PROXY header) or a refusal."""
        self.descriptors.available()  # a connection was accepted: descriptors were free
        listener = self.handlers[name].listener
        implicit = listener.tls == "implicit"
        if self.draining.is_set():
            CONNECTIONS_REFUSED.labels(listener=name, reason="draining").inc()
            return _Refuse(None if implicit else str(replies.SHUTTING_DOWN))
        if len(self.sessions) + len(self.gates) >= self.settings.limits.max_sessions:
            CONNECTIONS_REFUSED.labels(listener=name, reason="max_sessions").inc()
            assert self.defenses is not None
            suppressed = self.defenses.sampler.allow(("max_sessions", name))
            if suppressed is not None:
                log.warning(
                    "connection_refused",
                    listener=name,
                    reason="max_sessions",
                    limit=self.settings.limits.max_sessions,
                    suppressed=suppressed,
                )
            return _Refuse(None if implicit else str(replies.TOO_MANY_SESSIONS))
        assert self.defenses is not None
        gate = Gate(
            name,
            lambda transport, peer: self._open(name, transport, peer),
            self.gates.discard,
            self.defenses.sampler,
            listener.proxy_trusted if listener.proxy_protocol else None,
        )
        self.gates.add(gate)
        return gate

    def _open(self, name: str, transport: asyncio.BaseTransport, peer: Any) -> asyncio.BaseProtocol | None:
        """The session for a client the gate knows (the real one behind a balancer), or None: refused."""
        assert self.defenses is not None
        handler = self.handlers[name]
        listener, limits = handler.listener, self.settings.limits
        implicit = listener.tls == "implicit"
        if self.draining.is_set():  # its PROXY header came after the drain began
            CONNECTIONS_REFUSED.labels(listener=name, reason="draining").inc()
            refuse(transport, None if implicit else str(replies.SHUTTING_DOWN))
            return None
        ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        key = client_key(ip)
        if not self.defenses.sessions.admit(key, limits.max_sessions_per_ip):
            CONNECTIONS_REFUSED.labels(listener=name, reason="max_sessions_per_ip").inc()
            suppressed = self.defenses.sampler.allow(("max_sessions_per_ip", key))
            if suppressed is not None:
                log.warning(
                    "connection_refused",
                    listener=name,
                    peer=ip,
                    client=key,
                    reason="max_sessions_per_ip",
                    limit=limits.max_sessions_per_ip,
                    suppressed=suppressed,
                )
            refuse(transport, None if implicit else str(replies.TOO_MANY_FROM_ADDRESS))
            return None
        tls = self.tls.get(name)
        proto = GatewaySMTP(
            handler,
            draining=self.draining,
            on_close=self._release,
            tls=tls,
            implicit_tls=implicit,
            listener=name,
            client_key=key,
            budget=self.budget,
            spill_above=limits.spill_above,
            spill_dir=limits.spill_dir,
            data_timeout=limits.data_timeout,
            max_commands_before_data=limits.max_commands_before_data,
            hostname=self.settings.hostname,
            ident="smtp-gateway ESMTP",
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            require_starttls=False,
            # Implicit TLS is encrypted from the first byte: aiosmtpd cannot tell (aiosmtpd #281).
            auth_require_tls=not (implicit or listener.allow_insecure_auth),
            auth_required=False,  # enforced in handle_MAIL, which also knows trusted networks
            auth_exclude_mechanism=() if handler.oauth else ("XOAUTH2", "OAUTHBEARER"),
            timeout=limits.command_timeout,
            loop=asyncio.get_running_loop(),
        )
        self.sessions.add(proto)
        self._idle.clear()
        opened, active = self._metrics(name)
        opened.inc()
        active.inc()
        if implicit and tls is not None:
            # The session exists once the handshake succeeded; a failed one must not keep its slot.
            proto.handshake = tls.handshake(proto, lambda: proto.tls_up, lambda: self._release(proto))
            return proto.handshake
        return proto

    def _metrics(self, listener: str) -> tuple[Any, Any]:
        """The listener's session counters, bound once (labels() takes a lock and walks a dict)."""
        found = self._session_metrics.get(listener)
        if found is None:
            found = self._session_metrics[listener] = (
                SESSIONS.labels(listener=listener),
                SESSIONS_ACTIVE.labels(listener=listener),
            )
        return found

    def _release(self, session: GatewaySMTP) -> None:
        """A session ended (closed, or its TLS handshake failed): its slots are free at once."""
        if session in self.sessions:
            self.sessions.remove(session)
            assert self.defenses is not None
            self.defenses.sessions.release(session.client_key)
            self._metrics(session.listener)[1].dec()
            self._released.set()
            if not self.sessions:
                self._idle.set()

    async def ended(self, sessions: set[GatewaySMTP]) -> None:
        """Wait until all of `sessions` have ended."""
        while sessions & self.sessions:
            self._released.clear()
            await self._released.wait()

    # -- reload ----------------------------------------------------------------------------------------------

    def prepare_tls(self, settings: Settings) -> tuple[dict[str, ssl.SSLContext], dict[str, str]] | None:
        """New TLS contexts for every TLS listener under `settings` (raises CertificateError), or None."""
        profiles = {lsn.name: lsn.tls_profile for lsn in settings.listeners if lsn.name in self.tls}
        return load_contexts(settings.tls, profiles, current=True) if profiles else None

    def apply(
        self,
        settings: Settings,
        pipeline: Pipeline,
        authenticator: Authenticator,
        contexts: tuple[dict[str, ssl.SSLContext], dict[str, str]] | None,
    ) -> None:
        """New sessions use these from now on; open sessions keep the ones they started with. The
        listeners' sockets stay as they are (their addresses and TLS modes need a restart)."""
        assert self.defenses is not None
        self.settings, self.pipeline, self.authenticator = settings, pipeline, authenticator
        self.defenses.configure(settings.limits)
        limits = settings.limits
        self.budget.limit, self.budget.threshold = limits.max_large_bytes, limits.large_message_threshold
        self._build_handlers()
        timeout = handshake_timeout(settings.limits)
        if contexts is not None:
            by_name = {lsn.name: lsn for lsn in settings.listeners}
            for name, context in contexts[0].items():
                self.tls[name].context = context
                self.tls[name].profile = by_name[name].tls_profile
                self.tls[name].handshake_timeout = timeout
            log.info("tls_reloaded", listeners=sorted(contexts[0]), **contexts[1])
            self._export_expiry(settings.tls, contexts[0])

    async def reload_tls(self) -> bool:
        """Load the certificate files again (SIGHUP): new handshakes use them, open sessions keep theirs.

        A file that does not load leaves every listener on its current certificate; the reason is logged.
        """
        if not self.tls:
            return True
        profiles = {name: tls.profile for name, tls in self.tls.items()}
        try:
            contexts, described = await asyncio.to_thread(
                functools.partial(load_contexts, self.settings.tls, profiles, current=True)
            )
        except CertificateError as exc:
            log.error("tls_reload_failed", reason=str(exc), action="kept the certificate already loaded")
            return False
        for name, context in contexts.items():
            self.tls[name].context = context
        log.info("tls_reloaded", listeners=sorted(contexts), **described)
        self._export_expiry(self.settings.tls, contexts)
        return True

    @staticmethod
    def _export_expiry(tls: TlsSettings, listeners: Iterable[str]) -> None:
        """The certificates' expiry, per TLS listener, for the alert before they expire."""
        expiry = certificate_expiry(tls)
        if expiry is not None:
            for name in listeners:
                TLS_CERTIFICATE_EXPIRY.labels(listener=name).set(expiry)

    @property
    def reply_grace(self) -> float:
        """The longest a session past its final "." waits for its reply: the inline budget, then the store."""
        return self.settings.delivery.inline_budget + STORE_GRACE

    async def drain(self, timeout: float) -> None:
        """Stop taking mail: new sessions get 421, sessions in DATA may finish within `timeout`, and a session
        past its final "." gets the reply about its message (up to `reply_grace` seconds more) before its 421.

        When it returns, every connection the listeners accepted is closed (or, for a client that does not
        finish the TLS close within CLOSE_GRACE seconds, aborted) and every session slot is released.
        """
        self.draining.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(s.in_data or s.replying for s in self.sessions if s.transport is not None):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        await self._stop_accepting()
        await self.descriptors.stop()
        for gate in list(self.gates):  # still waiting for a PROXY header: no session yet, nothing to say
            gate.close()
        # A session past its final "." is owed the reply about its message: a 421 instead would tell the
        # client to resend a message whose delivery goes on (a second copy). That reply comes within the
        # inline budget plus the time to store the message; everyone else is told 421 now.
        grace_until = loop.time() + self.reply_grace
        told: set[GatewaySMTP] = set()
        while True:
            owed = False
            for session in list(self.sessions):
                if session.replying and session.transport is not None:
                    owed = True
                elif session not in told:
                    told.add(session)
                    session.shut_down()
            if not owed or loop.time() >= grace_until:
                break
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session not in told:
                session.shut_down()
        try:
            await asyncio.wait_for(self._idle.wait(), CLOSE_GRACE)
        except TimeoutError:
            for session in list(self.sessions):
                session.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CLOSE_GRACE)
        if self.sessions:
            log.warning("sessions_left_open", sessions=len(self.sessions))
        for server in self.servers:
            # Python 3.12+ waits here for the connections to be gone; 3.11 returns at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _stop_accepting(self) -> None:
        """Close the listening sockets without dropping a connection accepted a moment before.

        asyncio's selector loop accepts a connection in one loop iteration and builds its transport in a
        task that runs in a later one. A Server.close() in between makes that transport's constructor fail
        an assertion (Server._attach; CPython gh-109564, open; 3.11 also hides the error unless in debug
        mode): the accepted socket is never closed, and the protocol the factory made for it never hears of
        it. So the listening sockets stop being polled first; one iteration later every accepted connection
        has its transport (the tasks were scheduled before this coroutine's wake-up; call_soon is FIFO) and
        a protocol that refuses it (draining); only then are the servers closed. uvloop builds the
        transport in the accept callback itself: it has no such window.
        """
        loop = asyncio.get_running_loop()
        if isinstance(loop, asyncio.SelectorEventLoop):
            for server in self.servers:
                for sock in server.sockets:
                    loop.remove_reader(sock.fileno())
            await asyncio.sleep(0)
        for server in self.servers:
            server.close()


def handshake_timeout(limits: LimitsSettings) -> float:
    return min(HANDSHAKE_TIMEOUT, limits.command_timeout)
