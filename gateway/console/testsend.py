"""Test send: a message from a configured login, sent over a real SMTP session to one of the gateway's own
listeners (AUTH with a one-time password, gateway/auth/onetime.py), so it takes exactly the way a device's
message takes: the listener's TLS and AUTH rules, the login's own controls, the policies, the parser, the
provider, the queue and the ledger. The replies are shown as the client saw them."""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from gateway.config import ListenerSettings, Settings
from gateway.config.base import UserSettings

TIMEOUT = 60.0


@dataclass
class Outcome:
    listener: str
    transcript: list[tuple[str, str]] = field(default_factory=list)  # (what the client sent, the reply)
    reply: str = ""  # the final reply (the message's, or the first refusal)
    reply_id: str | None = None  # the id a 250 named
    error: str | None = None  # the session could not be held (connection refused, timeout, TLS)

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("250")


def listeners(settings: Settings) -> list[ListenerSettings]:
    """Listeners a loopback session can AUTH on: not behind PROXY headers; TLS, or AUTH allowed without it."""
    return [
        lsn for lsn in settings.listeners if not lsn.proxy_protocol and (lsn.tls != "none" or lsn.allow_insecure_auth)
    ]


def users(settings: Settings) -> list[tuple[str, UserSettings]]:
    return [(name, user) for name, account in settings.accounts.items() for user in account.configured_users]


def default_sender(settings: Settings, account: str, user: UserSettings) -> str:
    if user.default_from:
        return user.default_from
    for allowed in user.allowed_senders:
        if "@" in allowed and not allowed.startswith("@"):
            return allowed
    domains = [a.lstrip("@") for a in user.allowed_senders] or list(settings.accounts[account].return_paths())
    return f"console-test@{domains[0]}" if domains else ""


def host_of(address: str) -> str:
    """Where to reach a listener from this machine: its own address, or loopback for a wildcard one."""
    if address in ("", "0.0.0.0"):
        return "127.0.0.1"
    if address == "::":
        return "::1"
    return address


# One bare address (name@domain): no spaces, line breaks or other control characters, nothing SMTP or a
# header would read as syntax (smtplib and the email package raise ValueError on a line break: a 500).
_ADDRESS = re.compile(r"[^\s\x00-\x1f\x7f<>()\[\],;:\\\"@]+@[^\s\x00-\x1f\x7f<>()\[\],;:\\\"@]+")


# What a header value must not hold: every character str.splitlines() breaks a line at (the email package
# refuses a header value it splits: ValueError, a 500), and the other C0 and C1 controls (NUL, ESC, DEL...), which
# no subject is meant to carry. A tab is kept: it is folding whitespace, valid in a header.
_NOT_IN_A_LINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# A lone surrogate (a form field can carry one) has no UTF-8 encoding: compose would raise UnicodeEncodeError.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def login_error(login: str, user: UserSettings, now: float) -> str | None:
    """Why `user` cannot log in at all now, or None: every one of its passwords has expired. The one-time
    password would still log it in, so the test would say "accepted" where a device gets 535."""
    entries = user.credentials()
    expired = [label for entry, label in entries if (at := entry.expires_at) is not None and at <= now]
    if entries and len(expired) == len(entries):
        return (
            f"Every password of {login} has expired ({', '.join(expired)}): a device logging in as it gets "
            "535 (expired password). Give it a password that has not expired to test it."
        )
    return None


def form_error(sender: str, recipient: str, subject: str, body: str = "") -> str | None:
    """Why the test send's fields cannot make a message and an SMTP session, or None."""
    for name, value in (("sender", sender), ("recipient", recipient)):
        if not _ADDRESS.fullmatch(value):
            return f"The {name} must be one address (name@domain), without spaces or line breaks."
        if not value.isascii():
            # The session is plain ESMTP (smtplib cannot send these in MAIL or RCPT without SMTPUTF8).
            return (
                f"The {name} must be an ASCII address: write an internationalised domain in its xn-- form; "
                "a local part with other characters cannot be tested here."
            )
    if _NOT_IN_A_LINE.search(subject) or _SURROGATE.search(subject):
        return "The subject must be one line, without line separators or control characters."
    if _SURROGATE.search(body):
        return "The body must be text: it holds a character with no UTF-8 form (a lone surrogate)."
    return None


def compose(sender: str, recipient: str, subject: str, body: str, admin: str, hostname: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    domain = sender.rpartition("@")[2] or hostname
    msg["Message-ID"] = make_msgid("console", domain=domain)
    msg.set_content(f"{body}\n\n-- \nSent from the smtp-gateway console by {admin}.\n")
    return bytes(msg)


def _text(reply: tuple[int, bytes]) -> str:
    code, message = reply
    lines = message.decode("utf-8", "replace").splitlines() or [""]
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    return f"{code} {lines[0]}{more}"


class _Client(smtplib.SMTP):
    """smtplib's client, keeping the greeting its constructor reads."""

    greeting: tuple[int, bytes] = (0, b"")

    def connect(self, host: str = "localhost", port: int = 0, source_address: Any = None) -> tuple[int, bytes]:
        self.greeting = super().connect(host, port, source_address)
        return self.greeting


class _TlsClient(smtplib.SMTP_SSL):
    greeting: tuple[int, bytes] = (0, b"")

    def connect(self, host: str = "localhost", port: int = 0, source_address: Any = None) -> tuple[int, bytes]:
        self.greeting = super().connect(host, port, source_address)
        return self.greeting


def converse(
    outcome: Outcome,
    host: str,
    port: int,
    tls: str,
    login: str,
    password: str,
    sender: str,
    recipient: str,
    data: bytes,
) -> None:
    """The SMTP session (blocking: run in a thread). Stops at the first refusal; fills `outcome`."""
    # The gateway's own listener on this machine: its certificate is not what is being tested here.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    log = outcome.transcript
    try:
        client: _Client | _TlsClient
        if tls == "implicit":
            client = _TlsClient(host, port, timeout=TIMEOUT, context=context)
        else:
            client = _Client(host, port, timeout=TIMEOUT)
    except (OSError, smtplib.SMTPException) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return
    try:
        log.append((f"(connect to {host}:{port})", _text(client.greeting)))
        log.append(("EHLO console.smtp-gateway", _text(client.ehlo("console.smtp-gateway"))))
        if tls == "starttls":
            reply = client.starttls(context=context)
            log.append(("STARTTLS", _text((reply[0], reply[1]))))
            log.append(("EHLO console.smtp-gateway", _text(client.ehlo("console.smtp-gateway"))))
        blob = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode()).decode()
        steps: list[tuple[str, Callable[[], tuple[int, bytes]], int]] = [
            ("AUTH PLAIN (one-time password)", lambda: client.docmd("AUTH", f"PLAIN {blob}"), 235),
            (f"MAIL FROM:<{sender}>", lambda: client.mail(sender), 250),
            (f"RCPT TO:<{recipient}>", lambda: client.rcpt(recipient), 250),
            (f"DATA ({len(data)} bytes)", lambda: client.data(data), 250),
        ]
        for command, run, wanted in steps:
            code, message = run()
            outcome.reply = _text((code, message))
            log.append((command, outcome.reply))
            if code != wanted:
                break
        else:
            outcome.reply_id = outcome.reply.split()[-1] if "queued as" in outcome.reply else None
        log.append(("QUIT", _text(client.quit())))
    except (OSError, smtplib.SMTPException) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


async def send(
    settings: Settings,
    ports: dict[str, int],
    listener: ListenerSettings,
    login: str,
    password: str,
    sender: str,
    recipient: str,
    data: bytes,
) -> Outcome:
    outcome = Outcome(listener.name)
    port = ports.get(listener.name, listener.port)
    await asyncio.to_thread(
        converse, outcome, host_of(listener.address), port, listener.tls, login, password, sender, recipient, data
    )
    return outcome
