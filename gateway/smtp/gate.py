"""The first protocol of every connection: it learns who the client is, then hands the connection over.

Directly connected clients are who the socket says. Behind a load balancer (a listener with
`proxy_protocol`), the connection must come from a `proxy_trusted` address and start with a PROXY protocol
header, v1 (text) or v2 (binary), naming the real client; others are closed without a word. The header is
read here, before anything else, because on an implicit-TLS listener the TLS handshake follows it: aiosmtpd
reads PROXY headers inside its SMTP session (`proxy_protocol_timeout`), after our handshake would have
started, so only its parser is used (`aiosmtpd.proxy_protocol.get_proxy`, v1 and v2, TLVs skipped).

Then `open(transport, peer)` (the listener's) admits or refuses the client by its real address and returns
the session's protocol; the rest of the bytes already read go to it. The session sees the real client as
`peername` through ProxiedTransport, so limits, logs, AUTH throttling and trusted networks all use it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiosmtpd.proxy_protocol import V2_CMD, get_proxy

from gateway.limits.clients import LogSampler, client_ip
from gateway.ops.metrics import CONNECTIONS_REFUSED

log = structlog.get_logger("gateway.smtp")

# A v1 header is at most 107 bytes; a v2 header 16 + 65535. The reader's line limit bounds a v1 header
# that never ends; v2 reads exactly its announced length.
_V1_LIMIT = 108
# The balancer sends the header with its first packet; a client that says nothing is cut off after this.
PROXY_HEADER_TIMEOUT = 10.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Opener = Callable[[asyncio.BaseTransport, Any], "asyncio.BaseProtocol | None"]


def in_networks(ip: str, networks: Sequence[Network]) -> bool:
    address = client_ip(ip)
    return address is not None and any(address in network for network in networks)


class ProxiedTransport(asyncio.Transport):
    """The connection's transport as the session sees it: the real client as `peername`, the balancer as
    `proxy_peer`; everything else is the socket's own transport."""

    def __init__(self, inner: asyncio.Transport, peer: Any, balancer: Any) -> None:
        super().__init__()
        self._inner = inner
        self._peer = peer
        self._balancer = balancer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        if name == "proxy_peer":
            return self._balancer
        return self._inner.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def write_eof(self) -> None:
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def abort(self) -> None:
        self._inner.abort()

    def __getattr__(self, name: str) -> Any:
        # Private helpers asyncio's SSLProtocol calls on its transport (_force_close, ...).
        return getattr(self._inner, name)


def feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give bytes already read to the next protocol, whichever interface it has."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)


class Gate(asyncio.Protocol):
    """Admission (and the PROXY header, where the listener has one) before the session protocol takes over."""

    def __init__(
        self,
        listener: str,
        opener: Opener,
        on_end: Callable[[Gate], None],
        sampler: LogSampler,
        proxy_trusted: Sequence[Network] | None = None,
        timeout: float = PROXY_HEADER_TIMEOUT,
    ) -> None:
        self._listener = listener
        self._opener = opener
        self._on_end = on_end
        self._sampler = sampler
        self._trusted = proxy_trusted
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._reader: asyncio.StreamReader | None = None
        self._task: asyncio.Task[None] | None = None
        self._ended = False
        self._lost = False  # connection_lost has come: the transport is closed and tells nobody else

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        peer = transport.get_extra_info("peername")
        if self._trusted is None:
            self._hand_over(transport, peer, b"")
            return
        balancer = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if not in_networks(balancer, self._trusted):
            self._refuse("proxy_untrusted", balancer, "connection from an address not in proxy_trusted")
            return
        self._reader = asyncio.StreamReader(limit=_V1_LIMIT)
        self._task = asyncio.get_running_loop().create_task(self._read_header(peer))

    def data_received(self, data: bytes) -> None:
        if self._reader is not None:
            self._reader.feed_data(data)

    def eof_received(self) -> bool | None:
        if self._reader is not None:
            self._reader.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_end(self)

    async def _read_header(self, balancer_peer: Any) -> None:
        assert self._reader is not None and self._transport is not None
        balancer = str(balancer_peer[0])
        try:
            data = await asyncio.wait_for(get_proxy(self._reader), self._timeout)
        except asyncio.IncompleteReadError:
            # The balancer's TCP health check: connected and left. Nothing to report.
            self._close()
            return
        except TimeoutError:
            self._refuse("proxy_timeout", balancer, f"no PROXY header within {self._timeout:g} s")
            return
        if not data.valid:
            self._refuse("proxy_invalid", balancer, f"not a valid PROXY header: {data.error or 'unknown'}")
            return
        peer = balancer_peer
        # v2 LOCAL is the balancer's own connection (a health check) whatever it carries: the spec
        # (proxy-protocol.txt 2.2) says an address block after LOCAL must be ignored, and aiosmtpd parses one.
        local = data.version == 2 and data.command == V2_CMD.LOCAL
        if not local and isinstance(data.src_addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            peer = (str(data.src_addr), data.src_port or 0)
        # else: v2 LOCAL or v1 UNKNOWN, the balancer's own connection: it is the client.
        leftover = bytes(self._reader._buffer)  # type: ignore[attr-defined]  # read past the header
        self._reader = None
        # On Python 3.11, wait_for swallows connection_lost's cancel when the header had already been read:
        # a balancer's health check (or its client) that sent the header and left gets here too. _hand_over
        # sees its transport is closing and hands nothing over.
        self._hand_over(ProxiedTransport(self._transport, peer, balancer_peer), peer, leftover)

    def _hand_over(self, transport: asyncio.BaseTransport, peer: Any, leftover: bytes) -> None:
        assert self._transport is not None
        if self._lost or self._transport.is_closing():
            # The client has gone (or is going): a session attached now would never hear connection_lost,
            # which has been or will be delivered to this gate, so its slots would be held for ever (and
            # on uvloop its first write would raise on the closed handle). Nothing to admit.
            self._close()
            self._end()
            return
        protocol = self._opener(transport, peer)
        self._end()  # from here the session (or nobody, if refused) holds the connection
        if protocol is None:
            return
        self._transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if leftover:
            feed(protocol, leftover)

    def _refuse(self, reason: str, address: str, detail: str) -> None:
        CONNECTIONS_REFUSED.labels(listener=self._listener, reason=reason).inc()
        suppressed = self._sampler.allow((reason, address))
        if suppressed is not None:
            log.warning(
                "connection_refused",
                listener=self._listener,
                peer=address,
                reason=reason,
                detail=detail,
                suppressed=suppressed,
            )
        self._close()

    def close(self) -> None:
        """Hang up before the session began (drain): the balancer's header never came, or came too late."""
        self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
