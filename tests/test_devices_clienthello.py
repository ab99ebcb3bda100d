"""The ClientHello reader behind the handshake-failure log, on real hellos from OpenSSL and on odd input; on
any input it returns an Offer and never raises (its caller counts and logs the failed handshake)."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tests.fuzzing  # noqa: F401  (the hypothesis profiles)
from gateway.smtp.clienthello import Offer, parse_client_hello
from gateway.smtp.handshake import _hint
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


def test_an_sslv2_hello_is_reported_as_sslv2() -> None:
    """A pure SSL 2.0 CLIENT-HELLO carries version 0x0002 (SSLv2's own numbering): reported as SSLv2, so its
    hint says no profile accepts it."""
    # msg type 1, version 0x0002, cipher-spec length 3, session-id 0, challenge 16, SSL_CK_RC4_128_WITH_MD5.
    body = b"\x01" + struct.pack("!HHHH", 0x0002, 3, 0, 16) + b"\x01\x00\x80" + b"\x22" * 16
    offer = parse_client_hello(struct.pack("!H", 0x8000 | len(body)) + body)
    assert offer.version == "SSLv2"
    assert (
        _hint("UNSUPPORTED_PROTOCOL", offer, "intermediate")
        == "the client offers at most SSLv2, which no profile accepts"
    )


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


def odd_length_hello(field: str) -> bytes:
    """A TLS 1.2 ClientHello record whose cipher-suite list (or supported_versions list) has an odd length."""
    suites = b"\x00\x03\xc0\x2f\x00" if field == "suites" else b"\x00\x02\xc0\x2f"
    ext = b"\x00\x2b\x00\x02\x01\x03" if field == "versions" else b""
    return record(b"\x03\x03" + b"\x00" * 32 + b"\x00" + suites + b"\x01\x00" + struct.pack("!H", len(ext)) + ext)


def record(body: bytes) -> bytes:
    """`body` as a ClientHello handshake message in one TLS record."""
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def test_odd_length_lists_yield_what_was_read_before_them() -> None:
    suites = parse_client_hello(odd_length_hello("suites"))
    assert (suites.version, suites.ciphers) == ("TLSv1.2", ())
    versions = parse_client_hello(odd_length_hello("versions"))
    assert (versions.version, versions.versions) == ("TLSv1.2", ("TLSv1.2",))
    assert versions.ciphers == ("ECDHE-RSA-AES128-GCM-SHA256",)


_BYTES = st.binary(max_size=40)


def _vector(length_bytes: int, content: st.SearchStrategy[bytes] = _BYTES) -> st.SearchStrategy[bytes]:
    """A length-prefixed vector whose length may lie (too long, odd, zero)."""
    return st.tuples(content, st.integers(-2, 2)).map(
        lambda c: max(0, len(c[0]) + c[1]).to_bytes(length_bytes, "big")[-length_bytes:] + c[0]
    )


_EXTENSION = st.tuples(st.sampled_from([0x0000, 0x002B, 0x000A, 0x1A1A]), _vector(1)).map(
    lambda e: struct.pack("!HH", e[0], len(e[1])) + e[1]
)
# Hellos shaped like real ones, with every length free to lie: random bytes alone seldom get past the header.
_HELLO_BODY = st.tuples(
    st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x7f\x7f"]),
    st.binary(min_size=32, max_size=32),
    _vector(1, st.binary(max_size=32)),
    _vector(2),
    _vector(1, st.binary(max_size=2)),
    _vector(2, st.lists(_EXTENSION, max_size=4).map(b"".join)),
).map(b"".join)


@given(
    st.one_of(
        st.binary(max_size=300),
        _HELLO_BODY.map(record),
        st.tuples(_HELLO_BODY.map(record), st.integers(0, 400)).map(lambda h: h[0][: h[1]]),
    )
)
def test_any_input_yields_an_offer(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), Offer)
