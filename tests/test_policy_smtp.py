"""Sender policy end to end over SMTP (smtplib on the plain listener): the exact reply a client sees."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.configs import listener
from tests.harness import PASSWORD_HASH, USER, Running
from tests.ops_util import captured_with_context, sample
from tests.smtputil import RECIPIENT, SENDER, RawClient, message, send, session

Factory = Callable[..., Running]


def account(**user: Any) -> dict[str, Any]:
    """The test account `acme`, with settings for the login `scanner` (allowed_senders, default_from...)."""
    return {
        "acme": {  # merged into the usual test account
            "sender_domains": {
                "acme.example": "dmds-acme@nl.acme.example",
                "other.example": "bounce@rp.other.example",
                "bücher.example": "dmds-buecher@nl.bücher.example",
            },
            "users": [{"username": USER, "password_hash": PASSWORD_HASH, "campaign": 22, **user}],
        }
    }


def start(factory: Factory, **user: Any) -> Running:
    running = factory()  # lends its sandbox: the config names the upstream's port before the start
    accounts = account(**user)
    accounts["acme"]["api_base"] = running.sandbox_url
    gw = factory(accounts=accounts)
    gw.extra["upstream"] = running
    return gw


@pytest.fixture
def gw(gateway_factory: Factory) -> Running:
    return start(gateway_factory)


@pytest.fixture
def client(gw: Running) -> Iterator[smtplib.SMTP]:
    with session(gw) as c:
        yield c


def line(reply: tuple[int, bytes]) -> str:
    code, text = reply
    return f"{code} {text.decode()}"


def data(client: smtplib.SMTP, raw: bytes) -> str:
    try:
        return line(client.data(raw))
    except smtplib.SMTPDataError as exc:
        return f"{exc.smtp_code} {exc.smtp_error.decode()}"


def sent(gw: Running) -> list[dict[str, Any]]:
    upstream: Running = gw.extra["upstream"]
    return [r["body"] for r in upstream.sent]


def deliver(client: smtplib.SMTP, raw: bytes, mail_from: str = SENDER, rcpt: str = RECIPIENT) -> str:
    assert line(client.mail(mail_from)) == "250 2.1.0 Ok"
    assert line(client.rcpt(rcpt)) == "250 2.1.5 Ok"
    return data(client, raw)


# ---- MAIL FROM ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mail_from", "reply"),
    [
        ("x@evil.example", "553 5.7.1 <x@evil.example>: Sender address rejected: not owned by scanner"),
        ("x@nl.acme.example", "553 5.7.1 <x@nl.acme.example>: Sender address rejected: not owned by scanner"),
        ("", "553 5.7.1 Null sender <> not accepted: this gateway does not relay bounces"),
        ("a..b@acme.example", "553 5.1.3 <a..b@acme.example>: An email address cannot have two periods in a row."),
        ("x@localhost", "553 5.1.3 <x@localhost>: The part after the @-sign is not valid. It should have a period."),
    ],
)
def test_mail_from_refused(client: smtplib.SMTP, gw: Running, mail_from: str, reply: str) -> None:
    assert line(client.mail(mail_from)) == reply
    # nothing was started: RCPT needs a MAIL first
    assert line(client.rcpt(RECIPIENT)) == "503 5.5.1 Need MAIL command first"
    assert sent(gw) == []


@pytest.mark.parametrize("mail_from", ["billing@acme.example", "dmds-acme@nl.acme.example", "x@other.example"])
def test_mail_from_accepted_and_sent(client: smtplib.SMTP, gw: Running, mail_from: str) -> None:
    assert deliver(client, message(), mail_from=mail_from).startswith("250 2.0.0 Ok: queued as ")
    assert [b["remitente"] for b in sent(gw)] == [SENDER]


@pytest.mark.parametrize(
    ("mail_from", "reply"),
    [
        ("billing@acme.example", "250 2.1.0 Ok"),
        ("dmds-acme@nl.acme.example", "250 2.1.0 Ok"),  # the domain's return-path
        ("sales@acme.example", "553 5.7.1 <sales@acme.example>: Sender address rejected: not owned by scanner"),
        ("x@other.example", "553 5.7.1 <x@other.example>: Sender address rejected: not owned by scanner"),
        (
            "bounce@rp.other.example",
            "553 5.7.1 <bounce@rp.other.example>: Sender address rejected: not owned by scanner",
        ),
    ],
)
def test_allowed_senders_limit_mail_from(gateway_factory: Factory, mail_from: str, reply: str) -> None:
    gw = start(gateway_factory, allowed_senders=["billing@acme.example"])
    with session(gw) as c:
        assert line(c.mail(mail_from)) == reply


def test_allowed_senders_limit_header_from(gateway_factory: Factory) -> None:
    gw = start(gateway_factory, allowed_senders=["billing@acme.example"])
    with session(gw) as c:
        reply = deliver(c, message(sender="sales@acme.example"))
    assert reply == "550 5.7.1 From: header <sales@acme.example> is not owned by scanner"
    assert sent(gw) == []


# ---- header From and Sender at the end of DATA --------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (
            message(sender="ceo@evil.example"),
            "550 5.7.1 From: header domain evil.example is not a permitted sender domain for this account",
        ),
        (
            message(extra="Sender: relay@evil.example\r\n"),
            "550 5.7.1 Sender: header domain evil.example is not a permitted sender domain for this account",
        ),
        (
            message(sender="a..b@acme.example"),
            "550 5.1.3 From: header <a..b@acme.example>: An email address cannot have two periods in a row.",
        ),
        (
            message(extra="Reply-To: help@localhost\r\n"),
            "550 5.1.3 Reply-To: header <help@localhost>: The part after the @-sign is not valid. "
            "It should have a period.",
        ),
        (
            message(extra="Cc: a..b@example.com\r\n"),
            "550 5.1.3 Cc: header address <a..b@example.com>: An email address cannot have two periods in a row. "
            "(the address is not a recipient of this message)",
        ),
    ],
)
def test_header_refused_at_end_of_data(client: smtplib.SMTP, gw: Running, raw: bytes, reply: str) -> None:
    assert deliver(client, raw) == reply
    assert sent(gw) == []


# One reading of a malformed From on every Python (gateway/mime/addresses.py): an unquoted display name may
# hold an @, the address is the one in <...>; anything else that is not an address list is refused.
@pytest.mark.parametrize(
    ("from_", "reply"),
    [
        (
            "billing@acme.example <ceo@evil.example>",
            "550 5.7.1 From: header domain evil.example is not a permitted sender domain for this account",
        ),
        (
            "Billing <billing@acme.example> Sales <sales@acme.example>",
            "550 5.1.3 From: header is not a valid address list: text after the address <billing@acme.example> "
            "(put the name before it, or separate addresses with commas)",
        ),
        (
            '"Billing <billing@acme.example>',
            '550 5.1.3 From: header is not a valid address list: a quoted name is not closed with "',
        ),
        (
            "Billing billing@acme.example",
            "550 5.1.3 From: header is not a valid address list: a name before the address without <...> "
            "around it (write Name <address>)",
        ),
    ],
)
def test_malformed_from_is_read_one_way(client: smtplib.SMTP, gw: Running, from_: str, reply: str) -> None:
    assert deliver(client, message(sender=from_)) == reply
    assert sent(gw) == []


def test_an_address_as_unquoted_display_name_is_a_name(client: smtplib.SMTP, gw: Running) -> None:
    reply = deliver(client, message(sender="ceo@evil.example <billing@acme.example>"))
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    (body,) = sent(gw)
    assert (body["remitente"], body["remitente_nombre"]) == ("billing@acme.example", "ceo@evil.example")


def test_malformed_to_header_is_refused(client: smtplib.SMTP, gw: Running) -> None:
    assert deliver(client, message(to=f"<{RECIPIENT}")) == (
        "550 5.1.3 To: header is not a valid address list: an address in <...> is not closed with >"
    )
    assert sent(gw) == []


def test_from_without_a_domain_counts_as_missing(client: smtplib.SMTP, gw: Running) -> None:
    """cron's `From: root (Cron Daemon)`: no address, so the envelope sender is the From (as sendmail)."""
    assert deliver(client, message(sender="root (Cron Daemon)"), mail_from="billing@acme.example").startswith("250 ")
    assert [b["remitente"] for b in sent(gw)] == ["billing@acme.example"]


def test_sender_header_in_permitted_domain_is_accepted(client: smtplib.SMTP, gw: Running) -> None:
    reply = deliver(client, message(extra="Sender: ops@other.example\r\nReply-To: help@example.com\r\n"))
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    (body,) = sent(gw)
    assert body["remitente"] == SENDER
    assert body["reply-to"] == "help@example.com"


def test_return_path_header_is_not_forwarded(client: smtplib.SMTP, gw: Running) -> None:
    raw = b"Return-Path: <spoof@evil.example>\r\n" + message()
    assert deliver(client, raw, mail_from="dmds-acme@nl.acme.example").startswith("250 ")
    (body,) = sent(gw)
    assert "spoof@evil.example" not in repr(body)
    assert "Return-Path" not in repr(body)


# ---- default and forced From --------------------------------------------------------------------


def no_from(to: str = RECIPIENT) -> bytes:
    return f"To: {to}\r\nSubject: scan\r\n\r\nscanned\r\n".encode()


def test_missing_from_uses_envelope_sender(client: smtplib.SMTP, gw: Running) -> None:
    assert deliver(client, no_from(), mail_from="billing@acme.example").startswith("250 ")
    assert [b["remitente"] for b in sent(gw)] == ["billing@acme.example"]


def test_missing_from_uses_default_from(gateway_factory: Factory) -> None:
    gw = start(gateway_factory, default_from="scanner@acme.example")
    with session(gw) as c:
        assert deliver(c, no_from(), mail_from="dmds-acme@nl.acme.example").startswith("250 ")
        # a From that is there wins over the default
        assert deliver(c, message(sender="billing@acme.example")).startswith("250 ")
        assert deliver(c, message(sender="root@printer.example.net")) == (
            "550 5.7.1 From: header domain printer.example.net is not a permitted sender domain for this account"
        )
    assert [b["remitente"] for b in sent(gw)] == ["scanner@acme.example", "billing@acme.example"]


def test_forced_from_replaces_any_from(gateway_factory: Factory) -> None:
    gw = start(gateway_factory, default_from="scanner@acme.example", force_from=True)
    with session(gw) as c:
        raw = message(sender='"Printer 3F" <root@printer.example.net>')
        assert deliver(c, raw).startswith("250 ")
        assert deliver(c, no_from()).startswith("250 ")
    bodies = sent(gw)
    assert [b["remitente"] for b in bodies] == ["scanner@acme.example"] * 2
    assert bodies[0].get("remitente_nombre") == "Printer 3F"


# ---- recipients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        ("a..b@example.com", "553 5.1.3 <a..b@example.com>: An email address cannot have two periods in a row."),
        ("nobody", "553 5.1.3 <nobody>: An email address must have an @-sign."),
        (
            "x@acme.test",
            "553 5.1.3 <x@acme.test>: The part after the @-sign is a special-use or reserved name that cannot "
            "be used with email.",
        ),
    ],
)
def test_rcpt_syntax_refused(client: smtplib.SMTP, rcpt: str, reply: str) -> None:
    assert line(client.mail(SENDER)) == "250 2.1.0 Ok"
    assert line(client.rcpt(rcpt)) == reply
    assert line(client.rcpt(RECIPIENT)) == "250 2.1.5 Ok"  # the transaction goes on


# ---- internationalized addresses ----------------------------------------------------------------


def test_smtputf8_idn_domains_travel_as_xn(client: smtplib.SMTP, gw: Running) -> None:
    assert "smtputf8" in client.esmtp_features
    assert line(client.mail("info@bücher.example", ["SMTPUTF8"])) == "250 2.1.0 Ok"
    assert line(client.rcpt("kunde@münchen.example")) == "250 2.1.5 Ok"
    raw = (
        "From: info@bücher.example\r\nTo: kunde@münchen.example\r\nSubject: Grüße\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHallo\r\n"
    ).encode()
    assert data(client, raw).startswith("250 2.0.0 Ok: queued as ")
    (body,) = sent(gw)
    assert body["remitente"] == "info@xn--bcher-kva.example"
    contacts = body.get("contactos") or [body["contacto"]]
    # the To header matched the envelope recipient: a contact, not a blind copy
    assert [c["email"] for c in contacts] == ["kunde@xn--mnchen-3ya.example"]


@pytest.mark.parametrize("command", ["mail", "rcpt"])
def test_smtputf8_non_ascii_local_part_refused_early(client: smtplib.SMTP, command: str) -> None:
    if command == "mail":
        reply = client.mail("jörg@acme.example", ["SMTPUTF8"])
        address = "jörg@acme.example"
    else:
        assert line(client.mail(SENDER, ["SMTPUTF8"])) == "250 2.1.0 Ok"
        reply = client.rcpt("jörg@example.com")
        address = "jörg@example.com"
    assert line(reply) == (
        f"553 5.6.7 <{address}>: Internationalized characters before the @-sign are not supported by the upstream API"
    )


@pytest.mark.parametrize("command", ["MAIL FROM", "RCPT TO"])
def test_8bit_bytes_in_an_address_are_named_as_bytes(gw: Running, command: str) -> None:
    # Latin-1 "ö" (0xF6), not UTF-8: the reply names the byte, not the code point U+DCF6 that aiosmtpd's
    # surrogateescape decoding made of it (the reply shows the byte itself as "?": it is no text).
    with RawClient(gw) as raw:
        raw.cmd("EHLO client.test")
        assert raw.login().startswith("235 ")
        if command == "RCPT TO":
            assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        raw.write(command.encode() + b":<j\xf6rg\xe9@example.com>\r\n")
        reply = raw.reply()[-1]
    assert reply == "553 5.1.3 <j?rg?@example.com>: The address contains 8-bit bytes that are not UTF-8: 0xF6, 0xE9"


def test_non_ascii_header_from_local_part_refused(client: smtplib.SMTP, gw: Running) -> None:
    assert line(client.mail(SENDER, ["SMTPUTF8"])) == "250 2.1.0 Ok"
    assert line(client.rcpt(RECIPIENT)) == "250 2.1.5 Ok"
    raw = f"From: jörg@acme.example\r\nTo: {RECIPIENT}\r\nSubject: x\r\n\r\nx\r\n".encode()
    assert data(client, raw) == (
        "553 5.6.7 From: header <jörg@acme.example>: Internationalized characters before the @-sign are not "
        "supported by the upstream API"
    )
    assert sent(gw) == []


def test_header_only_invalid_address_refused_or_dropped_per_listener(gateway_factory: Callable[..., Running]) -> None:
    # A scanner's own .local name in To beside the real recipient: the envelope decides who receives.
    raw = message(to="Scanner <scan@printer.local>, client@example.com")
    gw = gateway_factory(listeners=[listener("plain"), listener("scanners", drop_invalid_header_addresses=True)])
    with session(gw, "plain") as client:
        code, text = send(client, raw)
    assert (code, text) == (
        550,
        "5.1.3 To: header address <scan@printer.local>: The part after the @-sign is a special-use or reserved name "
        "that cannot be used with email. (the address is not a recipient of this message)",
    )
    dropped = sample("smtp_gateway_fields_not_sent_total", account="acme", field="header_addresses")
    with captured_with_context() as logs, session(gw, "scanners") as client:
        code, text = send(client, raw)
    assert code == 250, text
    [call] = gw.sent
    assert call["body"]["contacto"] == {"email": "client@example.com"}
    [repaired] = [e for e in logs if e["event"] == "message_repaired"]
    assert repaired["defects"][0].startswith("header_address_dropped: To <scan@printer.local>: ")
    assert sample("smtp_gateway_fields_not_sent_total", account="acme", field="header_addresses") == dropped + 1
