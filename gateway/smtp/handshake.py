"""Server-side TLS handshakes run by the gateway itself, for implicit TLS and STARTTLS alike.

asyncio and uvloop report a failed handshake to nobody useful: implicit-TLS failures vanish (and the
session object created for the connection was never released), STARTTLS failures surface in aiosmtpd as
an exception with a traceback. Here the event loop's SSLProtocol runs behind a thin protocol that keeps the
first bytes the client sent (its ClientHello), so a failure is logged once per client IP, at info level, with
the protocol versions and suites the client offered, and the application protocol only hears of a success.

Under uvloop that is uvloop's own SSLProtocol (its TLS record layer is compiled; asyncio's is Python, and
cost a fifth of the CPU of a connection that sends one message over TLS); once the handshake is over the
socket's transport talks to it directly.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, cast

import structlog

from gateway.ops.metrics import TLS_HANDSHAKE_FAILURES
from gateway.smtp.clienthello import Offer, parse_client_hello
from gateway.smtp.peers import balancer_text
from gateway.smtp.tls import PROFILES, Profile

try:
    import uvloop
    import uvloop.loop
except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
    uvloop = None  # type: ignore[assignment]


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """The running loop's own SSLProtocol: uvloop's on uvloop (same interface as asyncio's), else asyncio's."""
    if uvloop is not None and isinstance(loop, uvloop.Loop):
        native: Callable[..., Any] | None = getattr(uvloop.loop, "SSLProtocol", None)
        if native is not None:
            return native
    return sslproto.SSLProtocol


log = structlog.get_logger("gateway.smtp")

# A ClientHello fits in a few hundred bytes (post-quantum key shares: ~1.8 KB); keep a bit more.
_HEAD_LIMIT = 8192
_LOGGED_CIPHERS = 40


@dataclass
class HandshakeFailures:
    """Logs failed handshakes at most once per client IP per `interval` seconds (counted every time)."""

    interval: float = 600.0
    max_peers: int = 10_000
    clock: Callable[[], float] = time.monotonic
    # client IP -> (when its last line was logged, failures since then that were not logged)
    _seen: dict[str, tuple[float, int]] = field(default_factory=dict)

    def report(
        self, listener: str, profile: Profile, peer: Any, head: bytes, error: BaseException | None, balancer: Any = None
    ) -> None:
        """`balancer`: the load balancer that relayed the connection (a proxy_protocol listener's), or None."""
        offer = parse_client_hello(head)
        # Behind a balancer, as on every session line (logs.md): which one relayed it.
        relay = balancer_text(balancer)
        relayed = {"proxy_peer": relay} if relay is not None else {}
        TLS_HANDSHAKE_FAILURES.labels(listener=listener, offered=offer.version).inc()
        ip, port = (str(peer[0]), peer[1]) if isinstance(peer, tuple) else (str(peer), None)
        if offer.version == "none":
            # Connected and left without a word: TCP health checks and port scanners. Counted only.
            log.debug("tls_handshake_abandoned", listener=listener, peer=ip, **relayed)
            return
        now = self.clock()
        last = self._seen.get(ip)
        if last is not None and now - last[0] < self.interval:
            self._seen[ip] = (last[0], last[1] + 1)
            return
        if len(self._seen) >= self.max_peers:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
            if len(self._seen) >= self.max_peers:  # a flood from many addresses: forget, keep memory bounded
                self._seen.clear()
        self._seen[ip] = (now, 0)
        reason = _reason(error)
        log.info(
            "tls_handshake_failed",
            listener=listener,
            profile=profile,
            peer=f"{ip}:{port}" if port is not None else ip,
            offered=offer.version,
            offered_versions=list(offer.versions),
            offered_ciphers=list(offer.ciphers[:_LOGGED_CIPHERS]),
            sni=offer.server_name,
            reason=reason,
            hint=_hint(reason, offer, profile),
            suppressed=last[1] if last is not None else 0,
            **relayed,
        )


def _reason(error: BaseException | None) -> str:
    if isinstance(error, ssl.SSLError):
        return str(error.reason or error.strerror or type(error).__name__)
    if isinstance(error, ConnectionAbortedError):
        return "HANDSHAKE_TIMEOUT"
    if error is None or isinstance(error, ConnectionResetError):
        return "CLOSED_BY_CLIENT"
    return type(error).__name__


def _hint(reason: str, offer: Offer, profile: Profile) -> str | None:
    """A sentence for the operator, for the causes that have a configuration answer."""
    if offer.version == "plaintext":
        return "the client speaks plain SMTP to a TLS port: use the STARTTLS or plain listener for it"
    if reason == "UNSUPPORTED_PROTOCOL" and offer.version in ("SSLv2", "SSLv3"):
        return f"the client offers at most {offer.version}, which no profile accepts"
    if reason == "UNSUPPORTED_PROTOCOL" and profile != "legacy":
        return f'the client offers at most {offer.version}; tls_profile = "legacy" accepts TLS 1.0 and 1.1'
    if reason == "NO_SHARED_CIPHER":
        return _cipher_hint(offer, profile)
    return None


_RSA_CERT = "an RSA certificate (tls.extra_cert_file)"


def _cipher_hint(offer: Offer, profile: Profile) -> str:
    """NO_SHARED_CIPHER: `legacy` only for a client whose suites are not in the listener's profile but in
    legacy's (CBC, RSA key exchange); an RSA certificate alone for one whose suites are in the profile but
    need it (ECDHE-RSA against an ECDSA certificate): legacy would add TLS 1.0/1.1, CBC and @SECLEVEL=0 for
    nothing."""
    offered = frozenset(offer.ciphers)
    if not offered:  # the suites could not be read (an SSLv2-framed or cut-short hello)
        return (
            f"no cipher suite in common; a device limited to RSA needs {_RSA_CERT}, one limited to CBC suites or "
            'TLS 1.0/1.1 also tls_profile = "legacy"'
        )
    usable = offered & profile_suites(profile)
    if usable:
        if any(_needs_rsa(name) for name in usable):
            return f"no cipher suite in common with the certificate: the client's suites need {_RSA_CERT}"
        return (
            "no cipher suite in common, though the client offers suites of this profile (its signature algorithms "
            f"may not fit the certificate): {_RSA_CERT} may suit it"
        )
    old = offered & profile_suites("legacy") if profile != "legacy" else frozenset()
    if old:
        also = f" and {_RSA_CERT}" if all(_needs_rsa(name) for name in old) else ""
        return f'the client offers only CBC or RSA key-exchange suites: tls_profile = "legacy"{also}'
    return "the client offers no cipher suite any profile accepts"


def _needs_rsa(suite: str) -> bool:
    """A TLS 1.2-and-older suite authenticated by an RSA certificate (ECDHE-RSA, static RSA key exchange);
    TLS 1.3's suites (TLS_...) go with any certificate."""
    return not suite.startswith("TLS_") and "ECDSA" not in suite


@cache
def profile_suites(profile: Profile) -> frozenset[str]:
    """The OpenSSL names of the suites a listener of `profile` accepts."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers(PROFILES[profile].ciphers)
    return frozenset(cipher["name"] for cipher in context.get_ciphers())


class TlsHandshake(asyncio.BufferedProtocol):
    """Sits between a TCP transport and asyncio's SSLProtocol until the handshake is over.

    It copies the client's first bytes aside, then steps out of the way (the transport talks to the
    SSLProtocol directly) once the handshake succeeded. `result` resolves to True on success; on failure
    the client is reported to `failures` and the connection is closed. `abort()` (shutdown) closes it
    whatever the handshake's state, without a report.
    """

    def __init__(
        self,
        tls: ListenerTls,
        app: asyncio.BaseProtocol,
        established: Callable[[], bool],
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._listener = tls
        self._established = established
        self._on_failure = on_failure
        self._head = bytearray()
        self._view: memoryview | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._peer: Any = None
        self._balancer: Any = None
        self._aborted = False
        self.result: asyncio.Future[bool] = loop.create_future()
        waiter: asyncio.Future[None] = loop.create_future()
        waiter.add_done_callback(self._finished)
        self.tls: Any = _ssl_protocol(loop)(
            loop,
            app,
            tls.context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=tls.handshake_timeout,
        )

    @property
    def app_transport(self) -> asyncio.Transport:
        """The encrypted transport the application writes to (created by SSLProtocol with itself)."""
        transport: asyncio.Transport = self.tls._get_app_transport()
        return transport

    @property
    def _extra(self) -> dict[str, Any]:
        """What aiosmtpd's connection_made() reads from `_tls_protocol._extra` after STARTTLS (uvloop's
        SSLProtocol keeps its own to itself): the TLS facts of the encrypted transport."""
        transport = self.app_transport
        return {name: transport.get_extra_info(name) for name in ("sslcontext", "ssl_object", "peercert", "cipher")}

    # -- the TCP transport's protocol while the handshake runs ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        # Read now: once the client has reset the connection, uvloop's transport cannot tell any more
        # (its get_extra_info("peername") raises AttributeError on the closed socket).
        self._peer = transport.get_extra_info("peername")
        self._balancer = transport.get_extra_info("proxy_peer")  # a ProxiedTransport's (gate.py); else None
        self.tls.connection_made(transport)
        if self._aborted:  # aborted between the accept and now
            cast(asyncio.Transport, transport).abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        self._view = memoryview(self.tls.get_buffer(sizehint))
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        room = _HEAD_LIMIT - len(self._head)
        if room > 0 and self._view is not None:
            self._head += self._view[: min(nbytes, room)]
        self.tls.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        # SSLProtocol returns True while the application has paused reading.
        keep_open: bool | None = self.tls.eof_received()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.tls.connection_lost(exc)

    def pause_writing(self) -> None:
        self.tls.pause_writing()

    def resume_writing(self) -> None:
        self.tls.resume_writing()

    # -- outcome ------------------------------------------------------------------------------------------

    def abort(self) -> None:
        """Cut the TCP connection off now (or as soon as it is made): the listener is shutting down.

        During the handshake, it then ends as a failure (`result` False, `on_failure` called) that is not
        reported. After a successful one this is how the TLS session is aborted: SSLProtocol hears of it
        (connection_lost) and tells the session. The TLS transport's own abort() cannot be used for that:
        aiosmtpd closes it twice after QUIT (the command, then its cancelled task), the second close() drops
        its SSLProtocol, and early 3.11 releases (Debian 12's 3.11.2; 3.11.7 has the guard) then raise
        AttributeError from abort(). The TCP transport underneath has no such state.
        """
        self._aborted = True
        if self._transport is None or (self.result.done() and not self.result.result()):
            return  # not connected yet (connection_made aborts), or failed and closed already
        cast(asyncio.Transport, self._transport).abort()

    def _finished(self, waiter: asyncio.Future[None]) -> None:
        error = None if waiter.cancelled() else waiter.exception()
        # SSLProtocol also resolves the waiter without error when the client hangs up mid-handshake:
        # only the application protocol having been connected means success.
        ok = error is None and not waiter.cancelled() and self._established()
        transport = self._transport
        try:
            if ok and transport is not None:
                transport.set_protocol(self.tls)
            elif not ok and not self._aborted:
                self._listener.failures.report(
                    self._listener.name, self._listener.profile, self._peer, bytes(self._head), error, self._balancer
                )
        finally:
            # Whatever the report did: the connection is closed, its session slot freed, the waiter told.
            if not ok:
                if transport is not None:
                    transport.close()
                if self._on_failure is not None:
                    self._on_failure()
            self._head = bytearray()
            self._view = None
            if not self.result.done():
                self.result.set_result(ok)


@dataclass
class ListenerTls:
    """A listener's TLS: its profile and current SSLContext (replaced when certificates are reloaded)."""

    name: str
    profile: Profile
    context: ssl.SSLContext
    failures: HandshakeFailures
    handshake_timeout: float = 60.0

    def handshake(
        self,
        app: asyncio.BaseProtocol,
        established: Callable[[], bool],
        on_failure: Callable[[], None] | None = None,
    ) -> TlsHandshake:
        """A handshake with the context current now: sessions started before a reload keep theirs."""
        return TlsHandshake(self, app, established, on_failure)
