"""Helpers for the operations tests: log capture with the session context, metric samples, PROXY headers."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import struct
from collections.abc import Iterator
from typing import Any

import structlog

from gateway.ops.metrics import REGISTRY
from tests.smtputil import RECIPIENT, SENDER, RawClient

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@contextlib.contextmanager
def captured_with_context() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event meanwhile, with the contextvars bound where it was logged (session, peer,
    listener): what a JSON log line of `serve` carries."""
    capture = structlog.testing.LogCapture()
    processors = structlog.get_config()["processors"]
    saved = list(processors)
    # In place: loggers already used hold this very list.
    processors[:] = [structlog.contextvars.merge_contextvars, capture]
    structlog.configure(processors=processors)
    try:
        yield capture.entries
    finally:
        processors[:] = saved
        structlog.configure(processors=processors)


def sample(name: str, **labels: str) -> float:
    """A metric's current value in this process's registry (0 when it has no such sample yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scraped(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, from a /metrics page."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        if want <= {p for p in (m.group(2) or "").split(",") if p}:
            total += float(m.group(3))
    return total


def start_data(client: RawClient, ehlo: str = "client.test") -> None:
    """EHLO, AUTH as the test user, MAIL, RCPT: the client is at DATA's 354."""
    client.cmd(f"EHLO {ehlo}")
    assert client.login().startswith("235 ")
    assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
    assert client.cmd("DATA").startswith("354 ")


def proxy_v1(src: str, sport: int, dst: str = "192.0.2.1", dport: int = 25) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def proxy_v2(src: str | None, sport: int = 0, dst: str = "192.0.2.1", dport: int = 25, tlv: bytes = b"") -> bytes:
    """A binary v2 header: PROXY over TCP from src:sport, or LOCAL (a balancer's health check) when src is None."""
    if src is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlv)) + tlv
    address = ipaddress.ip_address(src)
    if address.version == 4:
        body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
        family = 0x11
    else:
        body = (
            socket.inet_pton(socket.AF_INET6, src)
            + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!HH", sport, dport)
        )
        family = 0x21
    body += tlv
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body
