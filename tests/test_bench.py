"""The benchmark's own checks (bench/): a point is only published as valid when its messages are known to
have been passed on. No server is started here: the sandbox's port is a closed one, and the load generator
and the servers' settle() are stand-ins."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
# bench/ is no package: its scripts import each other as top-level modules.
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import gateway_target  # noqa: E402


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_settle_warns_when_the_sandbox_cannot_be_asked(tmp_path: Path) -> None:
    """The sandbox died: in store-and-forward the gateway queued every message and answered 250. settle()
    cannot tell whether any message reached the upstream, and must say so."""
    gw = gateway_target.Gateway(tmp_path, 0, ["smtp-gateway"], [])
    gw.sandbox_port = _closed_port()  # nothing listens: upstream_requests() == -1
    assert gw.upstream_requests() == -1
    assert "could not be asked" in str(gw.settle(5000, 0, timeout=0.5))
