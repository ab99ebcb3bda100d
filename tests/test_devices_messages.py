"""What devices put in DATA, pinned end to end (raw socket in, the sandbox's recorded request out): 8-bit
bodies without 8BITMIME, no Date/Message-ID, bare LF lines, lines over 998 octets, and devices that cannot
set a proper From (the login's default_from / force_from)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.devices_util import raw_send
from tests.harness import PASSWORD, PASSWORD_HASH, Running
from tests.smtputil import RECIPIENT, SENDER, RawClient

DEVICE_FROM = "scanner@acme.example"
USERS = [
    {"username": "printer", "password_hash": PASSWORD_HASH, "campaign": 22, "default_from": DEVICE_FROM},
    {
        "username": "copier",
        "password_hash": PASSWORD_HASH,
        "campaign": 22,
        "default_from": DEVICE_FROM,
        "force_from": True,
    },
]


def authenticated(running: Running, user: str = "scanner") -> RawClient:
    client = RawClient(running)
    client.cmd("EHLO device.lan")
    assert client.login(user, PASSWORD).startswith("235 ")
    return client


def test_8bit_body_without_8bitmime(gateway: Running) -> None:
    """No BODY=8BITMIME on MAIL, raw Latin-1 and UTF-8 bytes in the body: decoded by the declared charset."""
    latin1 = (
        b"From: " + SENDER.encode() + b"\r\nTo: " + RECIPIENT.encode() + b"\r\nSubject: Escaneo\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nDocumento escaneado: a\xf1o 2024, p\xe1gina 1\r\n"
    )
    utf8 = (
        latin1.replace(b"iso-8859-1", b"utf-8")
        .replace(b"a\xf1o", "año".encode())
        .replace(b"p\xe1gina", "página".encode())
    )
    with authenticated(gateway) as client:
        assert raw_send(client, latin1).startswith("250 2.0.0 ")
        assert raw_send(client, utf8).startswith("250 2.0.0 ")
    for sent in gateway.sent:
        assert "Documento escaneado: año 2024, página 1" in sent["body"]["html"]


def test_no_date_no_message_id(gateway: Running) -> None:
    bare = f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: minimal\r\n\r\nonly three headers\r\n".encode()
    with authenticated(gateway) as client:
        assert raw_send(client, bare).startswith("250 2.0.0 ")
    [sent] = gateway.sent
    assert sent["body"]["asunto"] == "minimal"
    assert "only three headers" in sent["body"]["html"]


def test_no_headers_at_all(gateway_factory: Callable[..., Running]) -> None:
    """A device that sends only a body: From comes from the login's default_from, no Subject is fine."""
    running = gateway_factory(extra_users=USERS)
    with authenticated(running, "printer") as client:
        assert raw_send(client, b"\r\nscan attached nowhere\r\n").startswith("250 2.0.0 ")
    [sent] = running.sent
    assert sent["body"]["remitente"] == DEVICE_FROM
    assert sent["body"]["contacto"]["email"] == RECIPIENT


def test_bare_lf_lines(gateway: Running) -> None:
    content = f"From: {SENDER}\nTo: {RECIPIENT}\nSubject: bare LF\n\nline one\nline two\n.leading dot\n".encode()
    with authenticated(gateway) as client:
        # Only CRLF.CRLF ends the data: a bare-LF "\n.\n" inside would not.
        assert raw_send(client, content.replace(b"\n.leading", b"\n..leading")).startswith("250 2.0.0 ")
    [sent] = gateway.sent
    assert sent["body"]["asunto"] == "bare LF"
    html = sent["body"]["html"]
    assert "line one" in html and "line two" in html and ".leading dot" in html


def test_lines_longer_than_998_octets(gateway: Running) -> None:
    long_line = "0123456789" * 500  # 5000 octets, no folding
    content = f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: long line\r\n\r\n{long_line}\r\nend\r\n".encode()
    with authenticated(gateway) as client:
        assert raw_send(client, content).startswith("250 2.0.0 ")
    [sent] = gateway.sent
    assert long_line in sent["body"]["html"]


@pytest.fixture
def devices(gateway_factory: Callable[..., Running]) -> Running:
    return gateway_factory(extra_users=USERS)


def test_default_from_fills_a_missing_from(devices: Running) -> None:
    content = f"To: {RECIPIENT}\r\nSubject: no From\r\n\r\nscan\r\n".encode()
    with authenticated(devices, "printer") as client:
        # The envelope sender is the return-path, which may not be a header From: default_from is used.
        assert raw_send(client, content, mail_from="dmds-acme@nl.acme.example").startswith("250 2.0.0 ")
    [sent] = devices.sent
    assert sent["body"]["remitente"] == DEVICE_FROM


def test_default_from_leaves_a_proper_from_alone(devices: Running) -> None:
    content = f"From: Billing <{SENDER}>\r\nTo: {RECIPIENT}\r\nSubject: own From\r\n\r\nx\r\n".encode()
    with authenticated(devices, "printer") as client:
        assert raw_send(client, content).startswith("250 2.0.0 ")
    [sent] = devices.sent
    assert (sent["body"]["remitente"], sent["body"]["remitente_nombre"]) == (SENDER, "Billing")


@pytest.mark.parametrize(
    ("from_header", "name"),
    [
        ("Copier 3rd floor <copier@printer.local>", "Copier 3rd floor"),  # a domain the account does not own
        ("someone@elsewhere.example", ""),
        ('"Scan to mail" <>', ""),  # no address at all: the header counts as missing
    ],
)
def test_force_from_replaces_what_the_device_sets(devices: Running, from_header: str, name: str) -> None:
    content = f"From: {from_header}\r\nTo: {RECIPIENT}\r\nSubject: forced\r\n\r\nscan\r\n".encode()
    with authenticated(devices, "copier") as client:
        assert raw_send(client, content).startswith("250 2.0.0 ")
    [sent] = devices.sent
    assert sent["body"]["remitente"] == DEVICE_FROM
    assert sent["body"].get("remitente_nombre", "") == name


def test_without_force_from_a_foreign_from_is_refused(devices: Running) -> None:
    for from_header, reply in [
        ("copier@vendor.example", "550 5.7.1 From: header domain vendor.example is not a permitted sender domain"),
        ("copier@printer.local", "550 5.1.3 From: header <copier@printer.local>: "),
    ]:
        content = f"From: {from_header}\r\nTo: {RECIPIENT}\r\nSubject: refused\r\n\r\nscan\r\n".encode()
        with authenticated(devices, "printer") as client:
            assert raw_send(client, content).startswith(reply)
    assert devices.sent == []
