"""SMTP smuggling and broken DATA: only <CRLF>.<CRLF> ends a message; nothing incomplete goes upstream;
nothing pipelined behind STARTTLS is read inside TLS."""

from __future__ import annotations

import base64
import socket
import time
from typing import BinaryIO

import pytest

from tests.harness import PASSWORD, USER, Running
from tests.smtputil import RECIPIENT, SENDER, RawClient, insecure_context, message

VICTIM = "victim@example.com"
# After a false end of data, a smuggling client goes on with a second transaction of its own.
SMUGGLED = (
    f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{VICTIM}>\r\nDATA\r\n"
    f"From: {SENDER}\r\nTo: {VICTIM}\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
).encode()
# The end-of-data look-alikes of the SMTP smuggling research (SEC Consult, 2023) and a few more.
FALSE_ENDS = [
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\n",
    b"\n.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n .\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
]


def open_data(client: RawClient) -> None:
    client.cmd("EHLO client.test")
    assert client.login().startswith("235 ")
    assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
    assert client.cmd("DATA").startswith("354 ")


@pytest.mark.parametrize("false_end", FALSE_ENDS, ids=[repr(e)[2:-1] for e in FALSE_ENDS])
def test_false_end_of_data_neither_ends_the_message_nor_injects_another(gateway: Running, false_end: bytes) -> None:
    first = message(subject="first", body="first body").rstrip(b"\r\n")
    with RawClient(gateway) as client:
        open_data(client)
        client.write(first + false_end + SMUGGLED + b".\r\nNOOP\r\n")
        replies = [client.reply()[-1], client.reply()[-1]]
    # One reply for the one message, then NOOP's: a smuggled MAIL/RCPT/DATA would have answered in between.
    assert replies[0].startswith("250 2.0.0 Ok: queued as "), replies
    assert replies[1] == "250 2.0.0 Ok", replies
    (request,) = gateway.requests
    body = request["body"]
    assert body["asunto"] == "first"
    assert body["contacto"]["email"] == RECIPIENT
    assert "smuggled body" in body["html"]  # what looked like a second message is text of the first


def test_no_bdat_chunking_is_offered(gateway: Running) -> None:
    """BDAT would be a second way to end a message; the gateway offers only DATA."""
    with RawClient(gateway) as client:
        client.write(b"EHLO client.test\r\n")
        keywords = [line[4:].split(" ")[0].upper() for line in client.reply()[1:]]
        assert "CHUNKING" not in keywords
        assert client.cmd("BDAT 10 LAST").startswith("500 5.5.2 ")


def wait_for_sessions_to_close(running: Running, deadline: float = 10.0) -> None:
    """The server has noticed every client that went away (its protocol object is gone)."""
    end = time.monotonic() + deadline
    while running.app.listeners is not None and running.app.listeners.sessions:
        assert time.monotonic() < end, "a session is still open"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "partial",
    [b"", b"From: a@acme.example\r\n", b"body\r\n.", b"body\r\n.\r", b"body\r\n.\n", b"body\n.\r\n"],
    ids=["nothing", "headers", "dot", "dot-cr", "dot-lf", "lf-dot-crlf"],
)
def test_client_vanishing_mid_data_sends_nothing(gateway: Running, partial: bytes) -> None:
    with RawClient(gateway) as client:
        open_data(client)
        client.write(message(subject="never finished") + partial if partial else b"")
    wait_for_sessions_to_close(gateway)
    assert gateway.requests == []
    # The server goes on serving: the next client's message is the only one sent.
    with RawClient(gateway) as client:
        open_data(client)
        client.write(message(subject="complete") + b".\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 ")
    assert [r["body"]["asunto"] for r in gateway.requests] == ["complete"]


def test_commands_pipelined_behind_starttls_are_never_answered_inside_tls(gateway: Running) -> None:
    """STARTTLS plaintext injection (CVE-2011-0411 in Postfix, CVE-2024-34083 in aiosmtpd): whatever the
    client wrote behind STARTTLS in the same packet, before the handshake, is discarded, not read as the
    first commands of the encrypted session."""
    injected = (
        f"STARTTLS\r\nEHLO injected.test\r\nAUTH PLAIN {b64login()}\r\n".encode()
        + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{VICTIM}>\r\nDATA\r\n".encode()
        + SMUGGLED.split(b"DATA\r\n", 1)[1]
        + b".\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", gateway.port("starttls")), timeout=10)
    opened: list[socket.socket | BinaryIO] = [sock]
    try:
        plain = sock.makefile("rb", buffering=0)
        opened.append(plain)
        assert plain.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        while not (line := plain.readline()).startswith(b"250 "):
            assert line.startswith(b"250-")
        sock.sendall(injected)  # one write: one packet on loopback
        assert plain.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        tls = insecure_context().wrap_socket(sock)
        encrypted = tls.makefile("rb")
        opened += [tls, encrypted]
        tls.sendall(b"NOOP\r\n")
        # The first line inside TLS answers our NOOP: nothing answers the injected EHLO, AUTH or MAIL.
        assert encrypted.readline() == b"250 2.0.0 Ok\r\n"
        tls.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
        assert encrypted.readline() == b"503 5.5.1 send HELO first\r\n"  # the injected EHLO was not read
        tls.sendall(f"EHLO client.test\r\nMAIL FROM:<{SENDER}>\r\n".encode())
        while not encrypted.readline().startswith(b"250 "):
            pass
        assert encrypted.readline().startswith(b"530 5.7.0 ")  # nor the injected AUTH
        tls.sendall(b"QUIT\r\n")
        assert encrypted.readline().startswith(b"221 ")
    finally:
        for each in reversed(opened):
            each.close()
    assert gateway.requests == []


def b64login() -> str:
    return base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
