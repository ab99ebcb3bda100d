"""Pure: what a client offered in its TLS ClientHello (versions, cipher suites), for handshake-failure logs."""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass
from functools import cache

# SSL 2.0's CLIENT-HELLO carries 0x0002 (its own numbering; a v2-framed hello from a TLS-capable stack carries
# 0x0300 or 0x0301); 0x0200 never occurs on the wire.
VERSIONS = {0x0002: "SSLv2", 0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
_HANDSHAKE, _CLIENT_HELLO, _SUPPORTED_VERSIONS, _SERVER_NAME = 0x16, 0x01, 0x002B, 0x0000


@dataclass(frozen=True, slots=True)
class Offer:
    """The client's side of a failed handshake, as far as its first bytes tell."""

    # Highest protocol offered ("TLSv1", "TLSv1.3", ...), "plaintext" for a client speaking SMTP or HTTP in
    # clear, "unknown" for anything else, "none" when the client sent nothing.
    version: str
    versions: tuple[str, ...] = ()
    ciphers: tuple[str, ...] = ()
    server_name: str | None = None


class MalformedHello(ValueError):
    """The hello is cut short or breaks its own framing (a list of 2-byte values of odd length): what was
    read before it is kept (parse_client_hello never raises it)."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedHello(f"{n} bytes wanted at {self.pos}, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def u16s(self, n: int) -> list[int]:
        """The `n` bytes of a list of 2-byte values (cipher suites, versions)."""
        chunk = self.take(n)
        if n % 2:
            raise MalformedHello(f"a list of 2-byte values of {n} bytes")
        return [code for (code,) in struct.iter_unpack("!H", chunk)]

    def u24(self) -> int:
        high, low = struct.unpack("!BH", self.take(3))
        return int(high << 16 | low)


def parse_client_hello(data: bytes) -> Offer:
    """Read the versions and suites a ClientHello offers from the first bytes of a connection.

    Tolerant: a truncated or malformed hello yields what could be read; bytes that are no TLS yield
    "plaintext"/"unknown". Never raises: its caller is the handshake-failure report, which must count and log.
    """
    if not data:
        return Offer("none")
    if data[0] & 0x80 and len(data) > 2 and data[2] == _CLIENT_HELLO:
        # SSLv2-framed hello (sent by some very old stacks even when they can do TLS 1.0): version at 3..4.
        version = VERSIONS.get(int.from_bytes(data[3:5], "big"), "unknown") if len(data) >= 5 else "unknown"
        return Offer(version, (version,))
    if data[0] != _HANDSHAKE:
        printable = data[:4].isascii() and data[:4].decode("ascii").isprintable()
        return Offer("plaintext" if printable else "unknown")
    # Handshake messages may span records: join the payloads of the leading handshake records.
    payload, pos = bytearray(), 0
    while pos + 5 <= len(data) and data[pos] == _HANDSHAKE:
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        payload += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    reader = _Reader(bytes(payload))
    try:
        if reader.u8() != _CLIENT_HELLO:
            return Offer("unknown")
        reader.u24()
        legacy = VERSIONS.get(reader.u16(), "unknown")
    except MalformedHello:
        return Offer("unknown")
    versions: tuple[str, ...] = (legacy,)
    ciphers: tuple[str, ...] = ()
    server_name = None
    try:
        reader.take(32)  # random
        reader.take(reader.u8())  # session id
        suites = reader.u16s(reader.u16())
        ciphers = tuple(_cipher_name(code) for code in suites if not _grease(code) and code not in _SIGNALS)
        reader.take(reader.u8())  # compression methods
        end = reader.u16() + reader.pos
        while reader.pos < end:
            kind, body = reader.u16(), _Reader(reader.take(reader.u16()))
            if kind == _SUPPORTED_VERSIONS:
                codes = body.u16s(body.u8())
                versions = tuple(VERSIONS.get(c, hex(c)) for c in codes if not _grease(c))
            elif kind == _SERVER_NAME:
                body.u16()
                if body.u8() == 0:
                    server_name = body.take(body.u16()).decode("ascii", "replace")
    except MalformedHello:
        pass
    known = [v for v in versions if v in _ORDER]
    best = max(known, key=_ORDER.index) if known else legacy
    return Offer(best, versions, ciphers, server_name)


_ORDER = list(VERSIONS.values())
# Signalling values in the suite list, not suites: renegotiation info (RFC 5746), fallback (RFC 7507).
_SIGNALS = frozenset({0x00FF, 0x5600})


def _grease(code: int) -> bool:
    # RFC 8701 GREASE values (0x0A0A, 0x1A1A, ...): random filler clients add, never a real offer.
    return code & 0x0F0F == 0x0A0A and code >> 8 == code & 0xFF


def _cipher_name(code: int) -> str:
    return _cipher_names().get(code, f"0x{code:04X}")


@cache
def _cipher_names() -> dict[int, str]:
    """IANA suite number -> OpenSSL name, for every suite this OpenSSL knows (built once)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:@SECLEVEL=0")
    return {cipher["id"] & 0xFFFF: cipher["name"] for cipher in context.get_ciphers()}
