"""The ClientHello reader behind the handshake-failure log, on real hellos from OpenSSL and on odd input."""

from __future__ import annotations

import ssl
import struct

import pytest

from gateway.smtp.clienthello import parse_client_hello
from tests.test_tls_profiles import client_context


def hello(context: ssl.SSLContext, server_name: str | None = None) -> bytes:
    """The exact bytes a client with `context` sends first."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1", "TLSv1.2"])
def test_old_clients_offer_one_version(version: str) -> None:
    offer = parse_client_hello(hello(client_context(version)))
    assert offer.version == version
    assert offer.versions == (version,)
    assert "ECDHE-ECDSA-AES128-SHA" in offer.ciphers
    assert "0x00FF" not in offer.ciphers  # the renegotiation signal is not a suite


def test_modern_client_offers_its_range_in_supported_versions() -> None:
    context = client_context()  # TLS 1.0 .. 1.3
    offer = parse_client_hello(hello(context, "mail.acme.example"))
    assert offer.version == "TLSv1.3"
    assert set(offer.versions) == {"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}
    assert offer.server_name == "mail.acme.example"
    assert "TLS_AES_128_GCM_SHA256" in offer.ciphers


def test_truncated_hello_yields_what_it_can() -> None:
    data = hello(client_context("TLSv1"))
    assert parse_client_hello(data[:11]).version == "TLSv1"  # up to the client version
    assert parse_client_hello(data[:60]).ciphers == ()
    assert parse_client_hello(data[:6]).version == "unknown"


def test_grease_values_are_skipped() -> None:
    data = bytearray(hello(client_context("TLSv1.2")))
    suites_at = 5 + 4 + 2 + 32 + 1 + data[5 + 4 + 2 + 32] + 2
    data[suites_at : suites_at + 2] = b"\x1a\x1a"  # GREASE (RFC 8701) in place of the first suite
    offer = parse_client_hello(bytes(data))
    assert not any("1A1A" in c for c in offer.ciphers)


def test_sslv2_framed_hello() -> None:
    body = b"\x01" + struct.pack("!HHHH", 0x0301, 3, 0, 16) + b"\x00\x00\x2f" + b"r" * 16
    data = struct.pack("!H", 0x8000 | len(body)) + body
    assert parse_client_hello(data).version == "TLSv1"


@pytest.mark.parametrize(
    ("data", "version"),
    [
        (b"EHLO printer.lan\r\n", "plaintext"),
        (b"GET / HTTP/1.1\r\n", "plaintext"),
        (b"", "none"),
        (b"\x00\x01\x02\x03", "unknown"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "unknown"),
    ],
)
def test_not_a_client_hello(data: bytes, version: str) -> None:
    assert parse_client_hello(data).version == version
