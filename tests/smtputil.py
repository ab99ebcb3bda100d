"""Helpers for end-to-end tests: smtplib sessions on each listener and a raw line-level SMTP client."""

from __future__ import annotations

import base64
import contextlib
import re
import smtplib
import socket
import ssl
import struct
from collections.abc import Iterator

from tests.harness import PASSWORD, USER, Running

# A final (non-intermediate) reply line with an RFC 3463 enhanced status code.
ENHANCED = re.compile(r"^\d{3} [245]\.\d+\.\d+ ")
SENDER = "billing@acme.example"
RECIPIENT = "client@example.com"


def insecure_context() -> ssl.SSLContext:
    """Client TLS context for the fixture's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect(running: Running, listener: str = "plain", timeout: float = 10.0) -> smtplib.SMTP:
    """An smtplib client on a listener, after EHLO (and STARTTLS on the starttls listener)."""
    port = running.port(listener)
    client: smtplib.SMTP
    if listener == "implicit":
        client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=timeout, context=insecure_context())
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=timeout)
    client.ehlo("client.test")
    if listener == "starttls":
        client.starttls(context=insecure_context())
        client.ehlo("client.test")
    return client


@contextlib.contextmanager
def session(
    running: Running, listener: str = "plain", user: str | None = USER, password: str = PASSWORD
) -> Iterator[smtplib.SMTP]:
    client = connect(running, listener)
    try:
        if user is not None:
            client.login(user, password)
        yield client
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


def message(
    subject: str = "Hello",
    to: str = RECIPIENT,
    sender: str = SENDER,
    body: str = "Hello there",
    extra: str = "",
) -> bytes:
    headers = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
    return (headers + "\r\n" + body + "\r\n").encode()


def send(client: smtplib.SMTP, raw: bytes, rcpts: list[str] | None = None, mail_from: str = SENDER) -> tuple[int, str]:
    """MAIL/RCPT/DATA; returns the reply to the first refused command, else to DATA."""
    code, text = client.mail(mail_from)
    if code != 250:
        return code, text.decode()
    for rcpt in rcpts or [RECIPIENT]:
        code, text = client.rcpt(rcpt)
        if code != 250:
            client.rset()
            return code, text.decode()
    code, text = client.data(raw)
    return code, text.decode()


def reset_on_close(sock: socket.socket) -> None:
    """SO_LINGER on with 0 s: closing the socket sends a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class RawClient:
    """Speaks SMTP line by line so tests see every reply exactly as sent (smtplib hides some)."""

    def __init__(
        self,
        running: Running,
        listener: str = "plain",
        timeout: float = 10.0,
        source: str | None = None,
        proxy: bytes | None = None,
        tls: bool | None = None,
    ) -> None:
        # `source`: a loopback alias (127.0.0.2, ...) to connect from, for per-client-address behaviour.
        # `proxy`: a PROXY protocol header sent first, as a load balancer does (before TLS on implicit TLS).
        sock = socket.create_connection(
            ("127.0.0.1", running.port(listener)), timeout=timeout, source_address=(source, 0) if source else None
        )
        if proxy is not None:
            sock.sendall(proxy)
        if tls if tls is not None else listener == "implicit":
            sock = insecure_context().wrap_socket(sock)
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> list[str]:
        """One reply: every line of a multi-line reply, CRLF stripped."""
        lines = []
        while True:
            raw = self.file.readline()
            if not raw:
                raise ConnectionError(f"connection closed after {lines!r}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        """Send one command; return the reply's last line."""
        self.write(line.encode() + b"\r\n")
        return self.reply()[-1]

    def starttls(self) -> None:
        assert self.cmd("STARTTLS").startswith("220")
        self.file.close()
        self.sock = insecure_context().wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def login(self, user: str = USER, password: str = PASSWORD) -> str:
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {blob}")

    def open_data(self) -> None:
        """EHLO, AUTH as the test login, one sender and one recipient, DATA: ready for the message's bytes."""
        self.cmd("EHLO client.test")
        assert self.login().startswith("235")
        assert self.cmd(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert self.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250")
        assert self.cmd("DATA").startswith("354")

    def reset_on_close(self) -> None:
        """Leave as a crashed client does: the close that ends the `with` block sends a TCP reset."""
        reset_on_close(self.sock)

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF)."""
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
