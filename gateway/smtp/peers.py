"""How a connection's endpoints (a client's, a load balancer's) are written in log lines."""

from __future__ import annotations

from typing import Any


def peer_text(peer: Any) -> str:
    """`host:port` for a socket address (aiosmtpd's session.peer, a transport's peername); else as it is."""
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def balancer_text(balancer: Any) -> str | None:
    """The load balancer that relayed a connection (a proxy_protocol listener's `proxy_peer`), or None."""
    return peer_text(balancer) if isinstance(balancer, tuple) else None
