"""The delivery status notice (RFC 3464) as bytes: a golden copy, its parts as a mail client's parser (the
standard library's, policy.default) reads them, and what the gateway's own parser makes of it, which is what
an upstream API taking HTML and attachments receives."""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway import mime
from gateway.ledger import dsn

GOLDEN = Path(__file__).parent / "fixtures" / "dsn" / "hard-bounce.eml"
HEADERS = (
    "From: Billing <billing@acme.example>\r\n"
    "To: bounce-hard+x@example.com\r\n"
    "Subject: =?utf-8?q?Factura_n=C2=BA_7?=\r\n"
    "Message-ID: <inv-7@acme.example>\r\n"
    "X-Ref: 42\r\n"
)


def notice(**changes: object) -> bytes:
    values: dict[str, object] = {
        "original": dsn.Original("C8BF29D9738D628F", 1_700_000_000.0, HEADERS, "Factura nº 7", "inv-7@acme.example"),
        "failures": [
            dsn.Failure(
                "bounce-hard+x@example.com",
                "bounced",
                "550 5.1.1 <bounce-hard+x@example.com>: Recipient address rejected: User unknown",
                1_700_000_060.0,
            )
        ],
        "reporting_mta": "gw.acme.example",
        "sender": "MAILER-DAEMON@nl.acme.example",
        "to": "billing@acme.example",
        "now": 1_700_000_100.0,
        "message_id": "dsn.0123456789ABCDEF.C8BF29D9738D628F@gw.acme.example",
        "boundary": "----=_smtp-gateway-notice",
    }
    values.update(changes)
    return dsn.build(**values)  # type: ignore[arg-type]


def test_the_notice_is_the_golden_copy() -> None:
    # A deliberate change of the notice: write the new golden copy with GOLDEN.write_bytes(notice()) and review it.
    assert notice() == GOLDEN.read_bytes()


def test_a_mail_client_reads_a_multipart_report_with_the_three_parts() -> None:
    msg = email.message_from_bytes(notice(), policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied" and msg["In-Reply-To"] == "<inv-7@acme.example>"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@nl.acme.example>"
    human, status, headers = msg.iter_parts()
    assert human.get_content_type() == "text/plain" and "Factura nº 7" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status.get_payload()  # type: ignore[misc]
    assert per_message["Reporting-MTA"] == "dns; gw.acme.example" and per_message["Arrival-Date"]
    assert per_recipient["Final-Recipient"] == "rfc822; bounce-hard+x@example.com"
    assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.1.1")
    assert per_recipient["Diagnostic-Code"].startswith("X-Gateway; 550 5.1.1 <bounce-hard+x@example.com>")
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_content().replace("\r\n", "\n") == HEADERS.replace("\r\n", "\n")


def test_each_way_of_failing_has_its_status_and_words() -> None:
    failures = [
        dsn.Failure("a@example.com", "not_sent", "the upstream reported Not-Sent", 1.0),
        dsn.Failure("b@example.com", "expired", "expired after 7 attempts in 432000s", 2.0),
        dsn.Failure("c@example.com", "refused", "refused by upstream: invalid email", 3.0),
    ]
    msg = email.message_from_bytes(notice(failures=failures), policy=policy.default)
    _, status, _ = msg.iter_parts()  # type: ignore[attr-defined]
    blocks = status.get_payload()[1:]
    assert [(b["Final-Recipient"], b["Status"]) for b in blocks] == [
        ("rfc822; a@example.com", "5.7.1"),
        ("rfc822; b@example.com", "4.4.7"),
        ("rfc822; c@example.com", "5.0.0"),
    ]
    text = msg.iter_parts().__next__().get_content()  # type: ignore[attr-defined]
    assert "could not be delivered to some of its recipients" in text
    assert "it could not be delivered in time and was given up" in text


def test_the_upstream_gets_the_notice_as_html_and_one_attachment() -> None:
    parsed = mime.parse(notice())
    assert parsed.subject == dsn.SUBJECT and parsed.from_ is not None
    assert parsed.from_.email == "MAILER-DAEMON@nl.acme.example"
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("delivery-status.txt", "message/delivery-status")
    ]
    assert b"Final-Recipient: rfc822; bounce-hard+x@example.com" in parsed.attachments[0].decoded()
    # The text for people and the quoted headers make the HTML body (8-bit header text as UTF-8).
    assert "User unknown" in parsed.html and "X-Ref: 42" in parsed.html
    non_ascii = mime.parse(notice(original=dsn.Original("X", 0.0, "Subject: Größe\r\n", "Größe")))
    assert "Subject: Größe" in non_ascii.html


def _status_blocks(raw: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(raw, policy=policy.default)
    _, status, _ = msg.iter_parts()  # type: ignore[attr-defined]
    assert status.get_content_type() == "message/delivery-status"
    return list(status.get_payload()[1:])


def test_a_vendors_words_in_spanish_make_an_ascii_diagnostic_and_stay_whole_for_people() -> None:
    """DMDS answers in Spanish: Diagnostic-Code is US-ASCII (RFC 3464), so it has the words without their
    accents (anything else escaped); the part for people has them as they were. Before, the notice could not
    be made (UnicodeEncodeError) and the sender was never told."""
    words = "Dirección de correo inválida: buzón 名 inexistente"
    raw = notice(failures=[dsn.Failure("jose@example.net", "bounced", words, 1.0)])
    raw.decode("ascii")  # 7-bit, as message/delivery-status must be
    [block] = _status_blocks(raw)
    assert block["Final-Recipient"] == "rfc822; jose@example.net"
    # (Folded by the email package, sometimes before the value: compared unfolded.)
    diagnostic = " ".join(block["Diagnostic-Code"].split())
    assert diagnostic == "X-Gateway; Direccion de correo invalida: buzon \\x{540D} inexistente"
    human = next(email.message_from_bytes(raw, policy=policy.default).iter_parts())  # type: ignore[attr-defined]
    assert words in human.get_content()
    assert words in mime.parse(raw).html


def test_an_internationalized_recipient_is_a_utf8_address_in_xtext_form() -> None:
    """RFC 6533: the `utf-8` address type, in message/delivery-status in its utf-8-addr-xtext form (non-ASCII
    characters and `+`, `=`, `\\` as \\x{HEX})."""
    raw = notice(failures=[dsn.Failure("josé+1@exämple.net", "bounced", "550 5.1.1 user unknown", 1.0)])
    raw.decode("ascii")
    [block] = _status_blocks(raw)
    assert block["Final-Recipient"] == "utf-8; jos\\x{E9}\\x{2B}1@ex\\x{E4}mple.net"
    assert "josé+1@exämple.net" in mime.parse(raw).html


def test_a_notice_to_or_from_an_internationalized_address_has_utf8_headers() -> None:
    """Neither has an ASCII form: the headers are UTF-8 (RFC 6532), as the gateway's parser reads them."""
    raw = notice(to="josé@exämple.net", sender="MAILER-DAEMON@exämple.net")
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg["To"] == "josé@exämple.net" and msg["From"] == "Mail Delivery System <MAILER-DAEMON@exämple.net>"
    parsed = mime.parse(raw)
    assert parsed.from_ is not None and parsed.from_.email == "MAILER-DAEMON@exämple.net"
    assert [a.email for a in parsed.to] == ["josé@exämple.net"]


@pytest.mark.parametrize(
    ("how", "words", "expected"),
    [
        ("bounced", "552 5.2.2 <a@example.com>: mailbox full", "5.2.2"),
        ("bounced", "550 5.7.1 blocked by policy", "5.7.1"),
        ("bounced", "452 4.2.2 Mailbox full", "5.2.2"),  # a hard bounce: permanent whatever the code's class
        ("bounced", "550 <a@example.com>: Recipient address rejected: User unknown", "5.1.1"),
        ("bounced", "Dirección inválida: buzón inexistente", "5.1.1"),
        ("bounced", "rejected by the receiving server", "5.0.0"),
        ("bounced", "server 10.4.5.6 said no", "5.0.0"),  # a dotted number is no code
        ("expired", "expired after 7 attempts in 432000s; last error: 452 4.2.2 mailbox full", "4.2.2"),
        ("expired", "expired after 7 attempts in 432000s; last error: HTTP 503", "4.4.7"),
        ("refused", "refused by upstream: invalid email", "5.0.0"),
        ("not_sent", "the upstream reported Not-Sent", "5.7.1"),
        ("internal_error", "5.1.1 in the gateway's own words", "5.3.0"),
    ],
)
def test_the_status_is_the_receiving_servers_own_code_when_its_words_carry_one(
    how: str, words: str, expected: str
) -> None:
    """Before, every hard bounce said 5.1.1 (a bad mailbox), whatever the server's code: software cleaning its
    lists on the Status would drop a good address whose mailbox was full or whose mail was blocked."""
    raw = notice(failures=[dsn.Failure("a@example.com", how, words, 1.0)])
    [block] = _status_blocks(raw)
    assert block["Status"] == expected
    assert f"(status {expected}," in mime.parse(raw).html
