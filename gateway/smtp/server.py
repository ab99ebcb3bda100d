"""Listeners: one asyncio server per configured listener, all on the one event loop, with graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import cast

import structlog

from gateway import replies
from gateway.credentials import Authenticator
from gateway.observability import SESSIONS
from gateway.pipeline import Pipeline
from gateway.settings import ConfigError, Settings, TlsSettings
from gateway.smtp.handler import GatewayHandler
from gateway.smtp.protocol import GatewaySMTP

log = structlog.get_logger("gateway.smtp")

# aiosmtpd counts calls per session; MAIL/RCPT/DATA/RSET stay unlimited for persistent sessions.
COMMAND_LIMITS = {"NOOP": 100, "HELP": 20, "VRFY": 20, "EXPN": 5, "AUTH": 10, "STARTTLS": 2,
                  "EHLO": 20, "HELO": 20, "*": 10**9}


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert tls.cert_file and tls.key_file
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.cert_file / tls.key_file cannot be loaded: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Refuse(asyncio.Protocol):
    """Answers one line and hangs up: used while draining or when too many sessions are open."""

    def __init__(self, line: str) -> None:
        self.line = line

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.WriteTransport subclasses: no isinstance check here.
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(self.line.encode() + b"\r\n")
        writer.close()


@dataclass
class Listeners:
    """All SMTP servers of the process and the sessions they have open."""

    settings: Settings
    pipeline: Pipeline
    authenticator: Authenticator
    servers: list[asyncio.Server] = field(default_factory=list)
    sessions: set[GatewaySMTP] = field(default_factory=set)
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    ports: dict[str, int] = field(default_factory=dict)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        context = None
        if any(listener.tls != "none" for listener in self.settings.listeners):
            context = tls_context(self.settings.tls)
        limits = self.settings.limits
        for listener in self.settings.listeners:
            handler = GatewayHandler(listener, limits, self.pipeline, self.authenticator)
            starttls = listener.tls == "starttls"
            implicit = listener.tls == "implicit"

            def factory(
                handler: GatewayHandler = handler, starttls: bool = starttls, implicit: bool = implicit
            ) -> asyncio.Protocol:
                if self.draining.is_set():
                    return _Refuse(str(replies.SHUTTING_DOWN))
                if len(self.sessions) >= limits.max_sessions:
                    return _Refuse("421 4.7.0 Too many connections, try again later")
                listener = handler.listener
                proto = GatewaySMTP(
                    handler,
                    draining=self.draining,
                    on_close=self.sessions.discard,
                    hostname=self.settings.hostname,
                    ident="smtp-gateway ESMTP",
                    data_size_limit=limits.max_message_size,
                    enable_SMTPUTF8=True,
                    decode_data=False,
                    tls_context=context if starttls else None,
                    require_starttls=False,
                    # Implicit TLS is encrypted from the first byte: aiosmtpd cannot tell (aiosmtpd #281).
                    auth_require_tls=not (implicit or listener.allow_insecure_auth),
                    auth_required=False,  # enforced in handle_MAIL, which also knows trusted networks
                    timeout=limits.session_timeout,
                    command_call_limit=COMMAND_LIMITS,
                    loop=loop,
                )
                self.sessions.add(proto)
                SESSIONS.labels(listener=listener.name).inc()
                return proto

            server = await loop.create_server(
                factory,
                host=listener.address,
                port=listener.port,
                ssl=context if implicit else None,
                reuse_address=True,
                reuse_port=listener.reuse_port or None,
                backlog=1024,
            )
            self.servers.append(server)
            self.ports[listener.name] = server.sockets[0].getsockname()[1]
            log.info("listener_started", listener=listener.name, address=listener.address,
                     port=self.ports[listener.name], tls=listener.tls)

    async def drain(self, timeout: float) -> None:
        """Stop taking mail: new sessions get 421, sessions in DATA may finish within `timeout`."""
        self.draining.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(s.in_data or _busy(s) for s in self.sessions if s.transport is not None):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                with contextlib.suppress(Exception):
                    session._writer.write(str(replies.SHUTTING_DOWN).encode() + b"\r\n")
                session.transport.close()
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)


def _busy(session: GatewaySMTP) -> bool:
    envelope = session.envelope
    return bool(envelope is not None and envelope.content is not None)
