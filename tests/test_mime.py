"""MIME -> DMDS payload: bodies, attachments and cid images, header decoding, X-Gateway-* options."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from email.message import EmailMessage

import pytest

from gateway import mime
from tests.harness import PASSWORD, PASSWORD_HASH, USER, Running
from tests.smtputil import SENDER, send, session

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def submit(running: Running, raw: bytes, user: str = USER, password: str = PASSWORD) -> dict[str, object]:
    with session(running, user=user, password=password) as client:
        code, text = send(client, raw)
    assert code == 250, text
    return running.sent[-1]["body"]


def test_html_part_becomes_html(gateway: Running) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, "client@example.com", "alt"
    msg.set_content("plain version")
    msg.add_alternative("<p>Rich <b>version</b></p>", subtype="html")
    body = submit(gateway, msg.as_bytes())
    assert body["html"].strip() == "<p>Rich <b>version</b></p>"


def test_text_only_becomes_escaped_html_keeping_line_breaks(gateway: Running) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, "client@example.com", "text"
    msg.set_content("a < b & c\nsecond line\n  indented")
    body = submit(gateway, msg.as_bytes())
    assert "a &lt; b &amp; c\nsecond line\n  indented" in body["html"]
    assert "white-space:pre-wrap" in body["html"]


def test_attachments_and_inline_cid_images(gateway: Running) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, "client@example.com", "images"
    msg.set_content("fallback")
    msg.add_alternative('<p>Logo: <img src="cid:logo123@acme"></p>', subtype="html")
    msg.get_payload()[1].add_related(PNG, "image", "png", cid="<logo123@acme>", filename="logo.png")
    msg.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="invoice.pdf")
    body = submit(gateway, msg.as_bytes())
    attachments = {a["nombre"]: a for a in body["adjuntos"]}
    assert base64.b64decode(attachments["invoice.pdf"]["contenido"]) == b"%PDF-1.4 fake"
    assert attachments["invoice.pdf"]["tipo"] == "application/pdf"
    assert "cid" not in attachments["invoice.pdf"]
    logo = attachments["logo.png"]
    assert (logo["cid"], logo["tipo"], base64.b64decode(logo["contenido"])) == ("logo123@acme", "image/png", PNG)
    # No cid: reference in the html is left without its part.
    cids = {a.get("cid") for a in body["adjuntos"]}
    assert set(re.findall(r"cid:([^\"'>\s]+)", body["html"])) <= cids


def test_encoded_headers_and_charsets(gateway: Running) -> None:
    raw = (
        (
            b"From: =?ISO-8859-1?Q?Jos=E9_P=E9rez?= <billing@acme.example>\r\n"
            b"To: =?UTF-8?B?w5Zyc2Vs?= <client@example.com>\r\n"
            b"Reply-To: Support <support@acme.example>\r\n"
            b"Subject: =?iso-8859-1?q?Caf=E9?= =?utf-8?b?4oKs?= au lait\r\n"
            b"MIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain; charset=iso-8859-15\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        )
        + "Prix: 5 € – merci\r\n".encode("iso-8859-15", errors="replace").replace(b"?", b"-")
        + (
            b"--b\r\nContent-Type: text/plain\r\n"
            b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.txt\r\n\r\nhello\r\n--b--\r\n"
        )
    )
    body = submit(gateway, raw)
    assert body["asunto"] == "Café€ au lait"
    assert body["remitente_nombre"] == "José Pérez"
    assert body["contacto"]["nombre"] == "Örsel"
    assert body["reply-to"] == "support@acme.example"
    assert "Prix: 5 €" in body["html"]
    assert [a["nombre"] for a in body["adjuntos"]] == ["résumé.txt"]


def test_8bit_latin1_header_is_decoded() -> None:
    raw = b"From: a@acme.example\r\nSubject: Fr\xf6sche\r\n\r\nx\r\n"
    assert mime.parse(raw).subject == "Frösche"


def test_folded_boundary_parameter() -> None:
    raw = (
        b'Content-Type: multipart/mixed; boundary="simple\r\n boundary"\r\n\r\n'
        b"--simple boundary\r\n\r\nfirst part\r\n--simple boundary--\r\n"
    )
    assert mime.parse(raw).text == "first part"


def test_empty_html_part_still_gives_a_body() -> None:
    raw = b"Content-Type: text/html\r\n\r\n"
    assert mime.parse(raw).html.strip()


def test_gateway_headers_are_consumed(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory()
    chooser = {"username": "chooser", "password_hash": PASSWORD_HASH, "campaign": 22, "may_choose_campaign": True}
    other = gateway_factory(extra_users=[chooser], accounts={"acme": {"api_base": running.sandbox_url}})
    batch = "3ABC993D-8E88-45E8-A6C9-E879378ABBA5"
    extra = f"X-Gateway-Archive: yes\r\nX-Gateway-Batch: {batch}\r\nX-Gateway-Campaign: 23\r\n"
    raw = (f"From: {SENDER}\r\nTo: client@example.com\r\nSubject: opts\r\n{extra}\r\nbody\r\n").encode()
    with session(other, user="chooser") as client:
        code, text = send(client, raw)
    assert code == 250, text
    body = running.sent[-1]["body"]
    assert body["campana_id"] == 23
    assert body["archive"] is True
    assert (body["reuse_eeid"], body["eeid"]) == (True, batch.lower())
    assert "X-Gateway" not in str(body)
    # A login that may not choose the campaign is refused, not silently sent elsewhere.
    with session(other) as client:
        code, text = send(client, raw)
    assert code == 550
    assert text.startswith("5.7.1 ")
    assert len(running.sent) == 1


@pytest.mark.parametrize("batch", ["3abc993d-batch", "3abc993d-8i88-45e8-a6c9-e879378abba5", "12345"])
def test_batch_that_is_no_eeid_is_refused_at_data(gateway: Running, batch: str) -> None:
    raw = (f"From: {SENDER}\r\nTo: client@example.com\r\nSubject: b\r\nX-Gateway-Batch: {batch}\r\n\r\nx\r\n").encode()
    with session(gateway) as client:
        code, text = send(client, raw)
    assert (code, text) == (
        554,
        "5.6.0 X-Gateway-Batch must be a DMDS batch id (the eeid of an earlier message: a UUID)",
    )
    assert gateway.sent == []


@pytest.mark.corpus
def test_address_headers_read_as_email_utils_reads_well_formed_ones_on_the_corpus() -> None:
    """The gateway's address parser (and its one-mailbox fast path) gives what email.utils' lenient
    getaddresses gives on every corpus header, but for the ones its rule reads differently or refuses
    (gateway/mime/addresses.py): the same on every Python patch level."""
    import email.utils
    from email import message_from_bytes

    from gateway.mime.addresses import AddressSyntaxError, parse_address_list
    from gateway.mime.parser import _POLICY, _mailboxes
    from tests.conftest import CORPUS

    def lenient(values: list[str]) -> list[tuple[str, str]]:
        if getattr(email.utils, "supports_strict_parsing", False):  # with the CVE-2023-27043 fix
            return email.utils.getaddresses(values, strict=False)
        return email.utils.getaddresses(values)

    def addresses(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [pair for pair in pairs if "@" in pair[1]]

    checked, differ, refused = 0, {}, {}
    for line in (CORPUS / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        name = line.split("\t", 1)[0]
        msg = message_from_bytes((CORPUS / name).read_bytes(), policy=_POLICY)
        for header in ("From", "Sender", "Reply-To", "To", "Cc"):
            values = [str(v) for v in msg.get_all(header) or []]
            if not values:
                continue
            try:
                ours = _mailboxes(values)
            except AddressSyntaxError as exc:
                refused[name] = str(exc)
                continue
            assert ours == parse_address_list(", ".join(values)), values  # the fast path agrees
            try:
                expected = lenient(values)
            except RecursionError:  # mimekit/stack-overflow.txt: the reference itself gives up
                continue
            if addresses(ours) != addresses(expected):
                differ[name] = ours
            checked += 1
    assert checked > 500
    # A phishing message's From: the display name is an address, the address is in <...>.
    assert differ == {
        "spamscope-mail-parser/mail_test_15.eml": [("purchasing@aquillaindustries.com", "do-not-reply@ncs.gov.ng")]
    }
    assert refused == {
        "enmime/mail-malformed-multiple-address-header-values.raw": "text after the address <bob@extern> (put the "
        "name before it, or separate addresses with commas)",
        "mimekit/stack-overflow.txt": "a group inside a group",
        "ruby-mail/error_emails__missing_body.eml": "':' inside an address",
    }


@pytest.mark.parametrize("value", ["²", "٢٢", "22a", ""])
def test_a_campaign_header_that_is_not_a_number_is_refused_not_an_internal_error(
    gateway_factory: Callable[..., Running], value: str
) -> None:
    running = gateway_factory()
    chooser = {"username": "chooser", "password_hash": PASSWORD_HASH, "campaign": 22, "may_choose_campaign": True}
    other = gateway_factory(accounts={"acme": {"api_base": running.sandbox_url, "users": [chooser]}})
    raw = f"From: {SENDER}\r\nTo: client@example.com\r\nSubject: x\r\nX-Gateway-Campaign: {value}\r\n\r\nb\r\n"
    with session(other, user="chooser") as client:
        code, text = send(client, raw.encode())
    assert code == 554 and text.startswith("5.6.0 "), text
