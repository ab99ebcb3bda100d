"""Faithful messages: what the API receives is what a mail client would show, and carries no control characters."""

from __future__ import annotations

import base64
import re

import pytest

from gateway import mime
from gateway.core.errors import ContentRejected
from gateway.core.model import Message
from gateway.mime import parser, sanitize
from tests.harness import Running
from tests.smtputil import SENDER, send, session

HEAD = b"From: Billing <billing@acme.example>\r\nTo: client@example.com\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def mixed(*parts: bytes, kind: str = "mixed") -> bytes:
    body = b"".join(b"--b\r\n" + part + b"\r\n" for part in parts)
    return HEAD + f'Content-Type: multipart/{kind}; boundary="b"\r\n\r\n'.encode() + body + b"--b--\r\n"


def header_fields(msg: Message) -> list[str]:
    """Every string the API receives that comes from a header."""
    fields = [msg.subject, *(msg.options.values()), msg.message_id or ""]
    for addr in (msg.from_, msg.sender, msg.reply_to, *msg.to, *msg.cc):
        if addr is not None:
            fields += [addr.name]
    for att in msg.attachments:
        fields += [att.filename, att.content_type, att.content_id or ""]
    return fields


# -- control characters ------------------------------------------------------------------------------------


def test_rfc2231_filename_with_crlf_and_nul_is_one_clean_line() -> None:
    raw = mixed(
        b"Content-Type: text/plain\r\n\r\nbody",
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''evil%0D%0AContent-Type%3A%20text%2Fhtml%00.txt\r\n"
        b"\r\nAAAA",
    )
    (att,) = mime.parse(raw).attachments
    assert not _CONTROL.search(att.filename)
    # The slash of "text/html" makes the rest a directory path: only the base name is left.
    assert att.filename == "html.txt"


def test_controls_in_every_header_field_are_removed_or_spaced() -> None:
    raw = (
        b"From: =?utf-8?q?Evil=00Name=0D=0AX-Injected=3A_1?= <billing@acme.example>\r\n"
        b"To: =?utf-8?q?Tab=09Name?= <client@example.com>\r\n"
        b"Subject: =?utf-8?q?Hello=00World=0D=0ABcc=3A_victim=40example=2Ecom=C2=85?=\r\n"
        b"Message-ID: <id\x01@acme.example>\r\n"
        b"X-Gateway-Batch: =?utf-8?q?abc=00def?=\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
        b"--b\r\nContent-Type: image/pn\x7fg\r\nContent-ID: <logo\x00@acme>\r\n"
        b'Content-Disposition: inline; filename="lo\x1bgo.png"\r\n\r\nAAAA\r\n--b--\r\n'
    )
    msg = mime.parse(raw)
    for value in header_fields(msg):
        assert not _CONTROL.search(value), value
    assert msg.subject == "HelloWorld Bcc: victim@example.com"
    assert msg.from_ is not None and msg.from_.name == "EvilName X-Injected: 1"
    assert msg.to[0].name == "Tab Name"
    assert msg.options["batch"] == "abcdef"
    assert msg.message_id == "<id@acme.example>"
    (att,) = msg.attachments
    assert (att.filename, att.content_type, att.content_id) == ("logo.png", "image/pn", "logo@acme")


def test_nul_in_subject_never_reaches_the_api(gateway: Running) -> None:
    raw = f"From: {SENDER}\r\nTo: client@example.com\r\nSubject: a\x00b\x07c\r\n\r\nbody\r\n".encode()
    with session(gateway) as client:
        code, text = send(client, raw)
    assert code == 250, text
    assert gateway.sent[-1]["body"]["asunto"] == "abc"


def test_body_controls_removed_tab_and_line_breaks_kept() -> None:
    raw = HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\ncol1\tcol2\r\nnul\x00here\x0cform\x1bfeed\r\n"
    msg = mime.parse(raw)
    assert msg.text == "col1\tcol2\nnulhereformfeed\n"
    html = mime.parse(mixed(b"Content-Type: text/html\r\n\r\n<p>a\x00b\x01c\tdone</p>")).html
    assert html == "<p>abc\tdone</p>"


# -- attachment names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("/tmp/whoa", "whoa"),
        ("C:\\TEMP\\nsmail39.png", "nsmail39.png"),
        ("1234/../../1234.txt", "1234.txt"),
        ("..", "attachment.bin"),
        (".", "attachment.bin"),
        ("dir/", "attachment.bin"),
        ("   ", "attachment.bin"),
        ("invoice\u202efdp.exe", "invoicefdp.exe"),  # a right-to-left override would show "invoiceexe.pdf"
    ],
)
def test_attachment_names_are_base_names(given: str, sent: str) -> None:
    encoded = given.encode()
    quoted = encoded.replace(b"\\", b"\\\\")
    raw = mixed(
        b"Content-Type: text/plain\r\n\r\nbody",
        b'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="' + quoted + b'"\r\n'
        b"\r\nAAAA",
    )
    (att,) = mime.parse(raw).attachments
    assert att.filename == sent


def test_very_long_name_keeps_its_extension() -> None:
    name = b"x" * 400 + b".pdf"
    raw = mixed(b'Content-Type: application/pdf; name="' + name + b'"\r\n\r\nAAAA')
    (att,) = mime.parse(raw).attachments
    assert len(att.filename) == 255
    assert att.filename.endswith(".pdf")


# -- charsets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["iso-8859-1", "latin1", "us-ascii", "ascii", None])
def test_latin_labels_mean_windows_1252(label: str | None) -> None:
    text = "5 € – “quoted” and then…"
    ctype = f"text/plain; charset={label}" if label else "text/plain"
    raw = HEAD + f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n".encode() + text.encode("cp1252")
    assert mime.parse(raw).text == text


def test_trailing_ellipsis_survives_in_subject_and_body() -> None:
    raw = (
        b"From: billing@acme.example\r\nSubject: =?iso-8859-1?q?Wait=85?=\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\nMore to come\x85"
    )
    msg = mime.parse(raw)
    assert msg.subject == "Wait…"
    assert msg.text == "More to come…"


def test_raw_8bit_headers_decoded_as_browsers_do() -> None:
    raw = (
        b"From: =?utf-8?q?x?= <billing@acme.example>\r\nTo: J\xfcrgen M\xfcller <client@example.com>\r\n"
        b"Subject: Caf\xc3\xa9 \xe2\x82\xac\r\n\r\nbody\r\n"
    )
    msg = mime.parse(raw)
    assert msg.subject == "Café €"  # valid UTF-8 wins
    assert msg.to[0].name == "Jürgen Müller"  # not UTF-8: windows-1252


def test_valid_utf8_under_a_single_byte_label_is_utf8() -> None:
    raw = HEAD + b"Content-Type: text/html; charset=windows-1251\r\n\r\n<p>Protecci\xc3\xb3n</p>"
    assert mime.parse(raw).html == "<p>Protección</p>"


def test_utf8_label_over_latin1_bytes_is_detected() -> None:
    raw = HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\nDet h\xe4r \xe4r ett meddelande"
    assert mime.parse(raw).text == "Det här är ett meddelande"


def test_utf8_with_a_few_broken_bytes_keeps_utf8() -> None:
    raw = HEAD + "Content-Type: text/plain; charset=utf-8\r\n\r\nПривет мир ".encode() + b"\xd0"
    msg = mime.parse(raw)
    assert msg.text == "Привет мир \ufffd"
    assert any(d.startswith("charset_errors: ") for d in msg.defects)


def test_undeclared_cyrillic_is_detected() -> None:
    text = "Уважаемые коллеги, направляем вам отчёт за март."
    for codec in ("koi8-r", "cp1251"):
        raw = b"From: billing@acme.example\r\nContent-Type: text/plain\r\n\r\n" + text.encode(codec)
        assert mime.parse(raw).text == text, codec


def test_gb2312_label_reads_gbk_characters() -> None:
    text = "グループへの配信に失敗しました"  # "ー" is in GBK, not in GB2312
    raw = HEAD + b"Content-Type: text/plain; charset=gb2312\r\n\r\n" + text.encode("gbk")
    assert mime.parse(raw).text == text


# -- what is body, what is attachment ------------------------------------------------------------------------


@pytest.mark.parametrize("disposition", [b"Content-Disposition: inline; filename=notes.txt\r\n", b""])
def test_inline_text_plain_with_a_name_is_body_text(disposition: bytes) -> None:
    raw = mixed(
        b"Content-Type: text/plain\r\n\r\nFirst part.",
        b"Content-Type: text/plain; name=notes.txt\r\n" + disposition + b"\r\nSecond part.",
    )
    msg = mime.parse(raw)
    assert msg.attachments == ()
    assert "First part." in msg.html
    assert "Second part." in msg.html


def test_text_plain_attachment_stays_an_attachment() -> None:
    raw = mixed(
        b"Content-Type: text/plain\r\n\r\nBody.",
        b"Content-Type: text/plain\r\nContent-Disposition: attachment; filename=log.txt\r\n\r\nlog line",
    )
    msg = mime.parse(raw)
    assert [a.filename for a in msg.attachments] == ["log.txt"]
    assert "log line" not in msg.html


APPLE_HTML_1 = (
    b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=utf-8"><style>p{color:red}</style>'
    b'</head><body style="word-wrap: break-word;"><div>Before the picture</div></body></html>'
)
APPLE_HTML_2 = (
    b'<html><head><style>.after{color:blue}</style></head><body style="word-wrap: break-word;">'
    b"<div class=after>After the picture</div></body></html>"
)


@pytest.mark.parametrize("kind", ["mixed", "related"])
def test_apple_mail_html_image_html_becomes_one_body(kind: str) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    raw = (
        HEAD
        + b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n--alt\r\n'
        + (b"Content-Type: text/plain\r\n\r\nBefore the picture\r\n[image]\r\nAfter the picture\r\n--alt\r\n")
        + mixed(
            b"Content-Type: text/html; charset=utf-8\r\n\r\n" + APPLE_HTML_1,
            b"Content-Type: image/png; name=photo.png\r\nContent-Disposition: inline; filename=photo.png\r\n"
            b"Content-Transfer-Encoding: base64\r\nContent-Id: <A1B2@apple>\r\n\r\n" + png.encode(),
            b"Content-Type: text/html; charset=utf-8\r\n\r\n" + APPLE_HTML_2,
            kind=kind,
        )[len(HEAD) :]
        + b"\r\n--alt--\r\n"
    )
    msg = mime.parse(raw)
    assert [(a.filename, a.content_id, a.inline) for a in msg.attachments] == [("photo.png", "A1B2@apple", True)]
    html = msg.html
    assert html.count("<body") == 1 and html.count("</body>") == 1
    before, image, after = html.index("Before the picture"), html.index('src="cid:A1B2@apple"'), html.index("After")
    assert before < image < after
    assert ".after{color:blue}" in html  # the later part's style rules travel with it


def test_image_without_content_id_between_html_parts_gets_one() -> None:
    raw = mixed(
        b"Content-Type: text/html\r\n\r\n<p>one</p>",
        b"Content-Type: image/gif\r\nContent-Disposition: inline; filename=a.gif\r\n\r\nGIF89a",
        b"Content-Type: text/html\r\n\r\n<p>two</p>",
    )
    msg = mime.parse(raw)
    (att,) = msg.attachments
    assert att.content_id is not None and att.inline
    assert msg.html == f'<p>one</p><img src="cid:{att.content_id}"><p>two</p>'
    assert mime.parse(raw).attachments[0].content_id == att.content_id  # the same every time (spool retries)


def test_single_html_body_is_unchanged() -> None:
    html = b"<html><head><title>t</title></head><body><p>Just this</p></body></html>"
    raw = mixed(
        b"Content-Type: text/plain\r\n\r\nJust this", b"Content-Type: text/html\r\n\r\n" + html, kind="alternative"
    )
    assert mime.parse(raw).html == html.decode()


def test_footer_text_after_html_alternative_is_shown() -> None:
    alternative = (
        b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n--alt\r\nContent-Type: text/plain\r\n\r\nHi\r\n'
        b"--alt\r\nContent-Type: text/html\r\n\r\n<html><body><p>Hi</p></body></html>\r\n--alt--"
    )
    raw = mixed(alternative, b"Content-Type: text/plain\r\n\r\n-- \r\nList footer <unsubscribe>")
    assert mime.parse(raw).html == (
        '<html><body><p>Hi</p><div style="white-space:pre-wrap">-- \nList footer &lt;unsubscribe&gt;</div>'
        "</body></html>"
    )


# -- transfer encodings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "data"),
    [
        (b"PGh0*bWw+Cg==", b"<html>\n"),  # a character outside the alphabet is skipped
        (b"PGh0bWw+Cg", b"<html>\n"),  # missing padding
        (b"QUJD\r\nREVG\r\nRw", b"ABCDEFG"),
        (b"QUJD\r\nRA==\r\nRUY=", b"ABCDEF"),  # two encodings one after the other
        (b"QUJDRA=", b"ABCD"),
        (b"QUJDR", b"ABC"),  # a dangling sixth bit group carries no byte
    ],
)
def test_invalid_base64_decoded_as_clients_do(encoded: bytes, data: bytes) -> None:
    raw = mixed(
        b"Content-Type: text/plain\r\n\r\nbody",
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=a.bin\r\n\r\n" + encoded,
    )
    msg = mime.parse(raw)
    assert msg.attachments[0].data == data
    assert msg.defects == ()


def test_epilogue_that_lost_its_boundary_ends_the_data() -> None:
    raw = mixed(
        b"Content-Type: text/plain\r\n\r\nbody",
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=a.bin\r\n\r\n"
        b"PGh0bWw+Cg==\r\n\r\n--lost-boundary-->\r\nSome epilogue text",
    )
    msg = mime.parse(raw)
    assert msg.attachments[0].data == b"<html>\n"
    assert msg.defects == (
        "base64_trailing_text: part 2 (application/octet-stream): 34 characters after the base64 data ignored",
    )


def test_part_that_is_not_base64_at_all_is_a_defect_and_sent_as_it_arrived() -> None:
    raw = mixed(
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nHello, this is plain text after all.",
    )
    msg = mime.parse(raw)
    assert msg.text == "Hello, this is plain text after all."
    assert msg.defects == ("undecodable_base64: part 1 (text/plain) sent as it arrived",)


_INVOICE = b"--x\r\nContent-Type: text/html\r\n\r\n<b>Invoice 42</b>\r\n--x--\r\n"


@pytest.mark.parametrize(
    ("source", "shown", "why"),
    [
        (HEAD + b"Content-Type: multipart/mixed\r\n\r\n" + _INVOICE, "&lt;b&gt;Invoice 42", "no boundary parameter"),
        (HEAD + b'Content-Type: multipart/mixed; boundary="y"\r\n\r\n' + _INVOICE, "Invoice 42", "no boundary line"),
        # A DSN whose boundary parameter was cut ("bo"): 5 KB of report.
        ("cpython/msg_25.txt", "The original message was received", "no boundary parameter"),
        # A boundary parameter that matches no line, over a base64 HTML part: shown as it arrived.
        ("spamscope-mail-parser/mail_malformed_3.eml", "PGh0bWw+PGhlYWQ+", "no boundary line"),
        ("enmime/mail-multipart-wo-boundary.raw", "multipart message without boundary", "no boundary parameter"),
    ],
    ids=["no-boundary-param", "no-boundary-line", "cpython-msg_25", "spamscope-malformed_3", "enmime-wo-boundary"],
)
def test_multipart_without_a_usable_boundary_is_sent_as_its_text_and_recorded(
    source: bytes | str, shown: str, why: str
) -> None:
    """The parser leaves such a multipart's body whole; a mail client shows it as text. It was sent as an
    empty document with no defect: the recipient got a blank mail and nobody knew."""
    if isinstance(source, str):
        from tests.conftest import CORPUS

        if not (CORPUS / source).is_file():
            pytest.skip(f"{source} not in the corpus at {CORPUS}")
        source = (CORPUS / source).read_bytes()
    msg = mime.parse(source)
    assert shown in msg.html
    assert len(msg.defects) == 1
    assert msg.defects[0].startswith("multipart_unsplit: part 1 (multipart/")
    assert msg.defects[0].endswith(f"): {why}, its body sent as text as it arrived")


@pytest.mark.parametrize(
    "inner",
    [b"This is a multi-part message in MIME format.\r\n", b"AAA\r\n\r\n--c--\r\n"],
    ids=["stripped-parts", "preamble-then-close"],
)
def test_a_nested_multiparts_preamble_beside_the_body_is_recorded_not_shown(inner: bytes) -> None:
    """A nested multipart left with only its preamble (a filter stripped its parts; mime4j's
    missing-inner-boundary): mail clients never show a preamble. It was appended to the HTML body."""
    raw = HEAD + (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/html\r\n\r\n<p>hello</p>\r\n"
        b'--b\r\nContent-Type: multipart/alternative; boundary="c"\r\n\r\n' + inner + b"--b--\r\n"
    )
    msg = mime.parse(raw)
    assert msg.html == "<p>hello</p>"
    assert msg.text is None
    assert msg.defects == (
        "multipart_unsplit: part 2 (multipart/alternative): no boundary line, its body (a preamble) not shown "
        "beside the message's body",
    )


def test_boundary_lines_with_text_after_the_boundary_are_named_so() -> None:
    """RFC 2046 §5.1.1: a boundary line matches by its start, text may follow (mime4j's ending-boundaries.msg);
    the parser does not read such lines. The defect said "no boundary line", which was not true."""
    raw = HEAD + (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b trailing words\r\nContent-Type: text/plain\r\n\r\nfirst part\r\n--b-- more words\r\n"
    )
    msg = mime.parse(raw)
    assert "first part" in msg.html
    assert msg.defects == (
        "multipart_unsplit: part 1 (multipart/mixed): text after the boundary on its lines (not read), its body "
        "sent as text as it arrived",
    )


def test_an_empty_multipart_is_no_defect() -> None:
    msg = mime.parse(HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n\r\n')
    assert msg.defects == ()
    assert msg.attachments == ()


def test_multipart_without_boundary_through_the_server_is_shown_and_counted(gateway: Running) -> None:
    from gateway.ops.metrics import REGISTRY

    def repaired() -> float:
        labels = {"account": "acme", "defect": "multipart_unsplit"}
        return REGISTRY.get_sample_value("smtp_gateway_messages_repaired_total", labels) or 0.0

    before = repaired()
    raw = HEAD + b"Content-Type: multipart/mixed\r\n\r\n" + _INVOICE
    with session(gateway) as client:
        code, text = send(client, raw)
    assert code == 250, text
    assert "Invoice 42" in gateway.sent[-1]["body"]["html"]
    assert repaired() == before + 1


_ICS = b"BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nUID:1\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"


def test_a_calendar_invitation_beside_the_body_is_sent_as_an_attachment_and_recorded() -> None:
    """An iMIP invitation (text, HTML, text/calendar in one multipart/alternative, as Outlook and Google send
    it): the HTML is the body, and the calendar branch, which neither API can take as an alternative, was
    dropped without a word."""
    raw = mixed(
        b"Content-Type: text/plain\r\n\r\nYou are invited",
        b"Content-Type: text/html\r\n\r\n<p>You are invited</p>",
        b'Content-Type: text/calendar; method="request"; charset="UTF-8"\r\n\r\n' + _ICS,
        kind="alternative",
    )
    msg = mime.parse(raw)
    assert msg.html == "<p>You are invited</p>"
    (invite,) = msg.attachments
    assert (invite.filename, invite.content_type, invite.inline) == ("invite.ics", "text/calendar", False)
    assert invite.data.rstrip(b"\r\n") == _ICS.rstrip(b"\r\n")
    assert msg.defects == (
        "calendar_attached: part 3 (text/calendar; method=REQUEST): an alternative to the body, sent as the "
        "attachment invite.ics",
    )


def test_a_calendar_attachment_or_a_calendar_only_alternative_is_unchanged() -> None:
    attached = mixed(
        b"Content-Type: text/html\r\n\r\n<p>Agenda</p>",
        b"Content-Type: text/calendar\r\nContent-Disposition: attachment; filename=meeting.ics\r\n\r\n" + _ICS,
        kind="alternative",
    )
    msg = mime.parse(attached)
    assert [(a.filename, a.content_type) for a in msg.attachments] == [("meeting.ics", "text/calendar")]
    assert msg.defects == ()
    alone = mixed(b"Content-Type: text/calendar; method=REQUEST\r\n\r\n" + _ICS, kind="alternative")
    msg = mime.parse(alone)
    assert "BEGIN:VCALENDAR" in msg.html  # the one branch is the body, as before
    assert msg.attachments == () and msg.defects == ()


def _invitation(calendar_file: bytes, *, file_first: bool = False) -> bytes:
    """An invitation as Google Calendar, Exchange and Lotus Notes send it: multipart/mixed of the alternative
    (text, HTML, calendar: for the client's Accept / Decline) and the same calendar as a file."""
    alternative = (
        b'Content-Type: multipart/alternative; boundary="a"\r\n\r\n'
        b"--a\r\nContent-Type: text/plain\r\n\r\nYou are invited\r\n"
        b"--a\r\nContent-Type: text/html\r\n\r\n<p>You are invited</p>\r\n"
        b"--a\r\nContent-Type: text/calendar; method=REQUEST\r\n\r\n" + _ICS + b"--a--"
    )
    file = calendar_file + _ICS
    return mixed(*((file, alternative) if file_first else (alternative, file)))


@pytest.mark.parametrize(
    ("calendar_file", "file_first", "expected"),
    [
        (  # Google Calendar
            b'Content-Type: application/ics; name="invite.ics"\r\n'
            b'Content-Disposition: attachment; filename="invite.ics"\r\n\r\n',
            False,
            ("invite.ics", "application/ics"),
        ),
        (  # Exchange
            b'Content-Type: text/calendar; method=REQUEST; name="meeting.ics"\r\n'
            b'Content-Disposition: attachment; filename="meeting.ics"\r\n\r\n',
            False,
            ("meeting.ics", "text/calendar"),
        ),
        (  # Lotus Notes (corpus thunderbird/invite.eml): a text/plain file named .ics, here before the alternative
            b'Content-Type: text/plain; name="c141520.ics"\r\n'
            b'Content-Disposition: attachment; filename="c141520.ics"\r\n\r\n',
            True,
            ("c141520.ics", "text/plain"),
        ),
    ],
    ids=["google", "exchange", "lotus-file-first"],
)
def test_an_invitation_that_also_comes_as_a_file_carries_its_calendar_once(
    calendar_file: bytes, file_first: bool, expected: tuple[str, str]
) -> None:
    """The alternative's calendar branch was attached as invite.ics beside the sender's own file: two copies
    of one invitation. The sender's file is the one sent; no calendar_attached defect."""
    msg = mime.parse(_invitation(calendar_file, file_first=file_first))
    assert msg.html == "<p>You are invited</p>"
    assert [(a.filename, a.content_type) for a in msg.attachments] == [expected]
    assert msg.defects == ()


def test_the_corpus_lotus_invitation_carries_its_calendar_once() -> None:
    from tests.conftest import CORPUS

    source = CORPUS / "thunderbird/invite.eml"
    if not source.is_file():
        pytest.skip(f"thunderbird/invite.eml not in the corpus at {CORPUS}")
    msg = mime.parse(source.read_bytes())
    calendars = [(a.filename, a.content_type) for a in msg.attachments if b"BEGIN:VCALENDAR" in a.data]
    assert calendars == [("c141520.ics", "text/plain")]
    assert not any(d.startswith("calendar_attached") for d in msg.defects)


def test_sloppy_transfer_encoding_names_are_understood() -> None:
    png = base64.b64encode(b"\x89PNG-data").decode()
    raw = mixed(
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable;\r\n\r\nMove =E2=99=9A",
        b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64 \r\n\r\n" + png.encode(),
    )
    msg = mime.parse(raw)
    assert msg.text == "Move ♚"
    assert msg.attachments[0].data == b"\x89PNG-data"


def test_attached_message_keeps_its_bytes_with_crlf_once() -> None:
    inner = (
        b"From: x@y.example\r\nSubject: caf\xc3\xa9 with a long folded\r\n header line\r\n"
        b"X-Long: " + b"a" * 90 + b" " + b"b" * 60 + b"\r\n"
        b"Content-Type: multipart/mixed; boundary=in\r\n\r\npreamble\r\n--in\r\nContent-Type: text/plain\r\n\r\n"
        b"line one\r\nline\rtwo keeps its bare CR\r\n--in--\r\nepilogue\r\n"
    )
    raw = mixed(b"Content-Type: text/plain\r\n\r\nsee attached", b"Content-Type: message/rfc822\r\n\r\n" + inner)
    (att,) = mime.parse(raw).attachments
    assert att.data == inner
    assert att.filename == "café with a long folded header line.eml"
    # A client that ends its lines with a bare LF: the attachment gets CRLF, once.
    lf_raw = raw.replace(b"\r\n", b"\n")
    (att,) = mime.parse(lf_raw).attachments
    assert att.data == inner  # the same bytes, the bare CR untouched


def test_base64_encoded_attached_message_is_decoded() -> None:
    inner = b"Subject: inner\r\n\r\nText body\r\n"
    raw = mixed(
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(inner)
    )
    assert mime.parse(raw).attachments[0].data == inner


# -- limits --------------------------------------------------------------------------------------------------


def rejected(raw: bytes) -> ContentRejected:
    with pytest.raises(ContentRejected) as info:
        mime.parse(raw)
    return info.value


def test_too_many_parts_refused() -> None:
    raw = mixed(*[b"Content-Type: text/plain\r\n\r\nx"] * (parser.MAX_PARTS + 1))
    error = rejected(raw)
    assert str(error.reply) == "554 5.6.0 Message has too many MIME parts"
    assert mime.parse(mixed(*[b"Content-Type: text/plain\r\n\r\nx"] * (parser.MAX_PARTS - 2))).text


def test_too_deep_refused() -> None:
    levels = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(200))
    error = rejected(HEAD + levels + b"\r\ndeep\r\n")
    assert str(error.reply) == "554 5.6.0 Message structure is nested too deeply"


def test_deep_nesting_refused_earlier_for_long_messages() -> None:
    levels = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(40))
    assert mime.parse(HEAD + levels + b"\r\n" + b"line\r\n" * 1000).text
    error = rejected(HEAD + levels + b"\r\n" + b"\n" * (parser.MAX_NESTING_WORK // 40))
    assert str(error.reply) == "554 5.6.0 Message structure is nested too deeply"


def test_too_many_header_lines_refused() -> None:
    error = rejected(HEAD + b"X-A: b\r\n" * parser.MAX_HEADER_LINES + b"\r\nbody\r\n")
    assert str(error.reply) == "554 5.6.0 Message has too many header lines"


def test_text_that_would_grow_past_the_decoded_limit_is_552() -> None:
    # Every "&" becomes "&amp;", and one emoji makes every character of a Python string take 4 bytes:
    # the HTML body alone would take twenty times the raw size.
    text = "😀".encode() + b"&" * parser.DECODED_FLOOR
    error = rejected(HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text)
    assert str(error.reply) == "552 5.3.4 Message size exceeds fixed limit once decoded"
    # Ordinary text, even with an emoji and some markup characters, is far below it.
    ordinary = "😀 a & b < c, ".encode() + b"plain words and more plain words " * 50_000
    assert mime.parse(HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + ordinary).html


def test_huge_header_is_cut_at_a_space() -> None:
    words = b" ".join([b"=?utf-8?q?caf=C3=A9?="] * 8000)
    msg = mime.parse(b"From: billing@acme.example\r\nSubject: " + words + b"\r\n\r\nbody\r\n")
    assert re.fullmatch("(café)+", msg.subject)  # adjacent encoded words join; none is left half
    assert msg.defects[0].startswith("header_truncated: Subject")


def test_attached_message_is_passed_on_byte_for_byte() -> None:
    # What re-serialising changed: spaces after a delimiter, a header without a space after its colon,
    # a missing close delimiter, the blank lines of an epilogue.
    inner = (
        b"From:x@y.example\r\nSubject:   spaced\r\nContent-Type: multipart/mixed; boundary=in\r\n\r\n"
        b"--in   \r\nContent-Type: text/plain\r\n\r\nfirst\r\n--in\t\r\n\r\nsecond\r\n"
    )
    raw = mixed(b"Content-Type: text/plain\r\n\r\nsee attached", b"Content-Type: message/rfc822\r\n\r\n" + inner)
    msg = mime.parse(raw)
    (att,) = msg.attachments
    assert att.data == inner
    assert att.filename == "spaced.eml"
    assert msg.defects == ()


def test_attached_message_with_cr_cr_lf_keeps_its_headers() -> None:
    # A message file written twice through a text-mode conversion: every line ends in CR CR LF.
    lines = [b"From: x@y.example", b"To: z@y.example", b"Subject: scanned invoice", b"", b"body", b""]
    raw = mixed(
        b"Content-Type: text/plain\r\n\r\nsee attached",
        b"Content-Type: message/rfc822\r\n\r\n" + b"\r\r\n".join(lines),
    )
    msg = mime.parse(raw)
    (att,) = msg.attachments
    # The header block is read and passed on with one line end per line: To and Subject stay headers.
    assert att.data == b"From: x@y.example\r\nTo: z@y.example\r\nSubject: scanned invoice\r\n\r\nbody\r\r\n"
    assert att.filename == "scanned invoice.eml"
    assert msg.defects == ("cr_cr_lf: part 2 (message/rfc822): its header lines end in CR CR LF, read as one line end",)


@pytest.mark.parametrize(
    "footer",
    [
        b"\r\nThis message was scanned by ExampleScan\r\n",  # words: spaces between them
        b"\r\nThanks\r\n",  # a word that is no whole base64 quantum
        b"Regards\r\n",  # the same, with no line break after the padding
    ],
)
def test_text_after_a_base64_body_padding_is_ignored(footer: bytes) -> None:
    body = base64.b64encode("Grüße aus dem Büro!".encode()) + b"\r\n"
    assert body.endswith(b"==\r\n")
    raw = mixed(b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body + footer)
    msg = mime.parse(raw)
    assert msg.text == "Grüße aus dem Büro!"
    ignored = len(footer.replace(b"\r\n", b"").replace(b" ", b""))
    assert msg.defects == (
        f"base64_trailing_text: part 1 (text/plain): {ignored} characters after the base64 data ignored",
    )


def test_encodings_concatenated_line_by_line_are_all_decoded() -> None:
    # Some mailers encode each line on its own: a padding on every line, and no text after them.
    lines = [base64.b64encode(word.encode()) for word in ("Hello, ", "world", "!")]
    raw = mixed(b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b"\r\n".join(lines))
    msg = mime.parse(raw)
    assert (msg.text, msg.defects) == ("Hello, world!", ())


def test_body_controls_and_lone_surrogates_past_the_first_slice_are_found() -> None:
    """sanitize.body checks a long text a slice at a time (no whole-text copies): what sits in a later slice,
    or right at a slice's edge, is still cleaned."""
    size = sanitize._BODY_SLICE
    text = "a" * (size - 1) + "\x00" + "b" * size + "\ud800" + "c" * 10 + "\x1b"
    assert sanitize.body(text) == "a" * (size - 1) + "b" * size + "\ufffd" + "c" * 10
    clean = "x" * (2 * size + 5)
    assert sanitize.body(clean) is clean  # nothing to remove: the text itself, no copy


# Review today5: only a preamble is hidden beside a body; an invitation is dropped only beside its own calendar.
_INVITE = (
    b"BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nUID:meeting-42\r\nSUMMARY:Budget\r\n"
    b"END:VEVENT\r\nEND:VCALENDAR\r\n"
)
_HOLIDAYS = (
    b"BEGIN:VCALENDAR\r\nMETHOD:PUBLISH\r\nBEGIN:VEVENT\r\nUID:holiday-1\r\nSUMMARY:New Year\r\n"
    b"END:VEVENT\r\nEND:VCALENDAR\r\n"
)


def test_unsplit_multipart_with_boundary_lines_carrying_text_keeps_its_content_beside_a_footer() -> None:
    """A multipart whose boundary lines carry text after the boundary (RFC 2046; the new defect names it) holds
    parts, not a preamble. Beside a sibling text part (a list footer, a disclaimer), it is now dropped: the
    recipient gets the footer alone."""
    inner = (
        b'Content-Type: multipart/alternative; boundary="c"\r\n\r\n'
        b"--c trailing words\r\nContent-Type: text/plain\r\n\r\nThe invoice total is 42 EUR\r\n--c-- more words\r\n"
    )
    footer = b"Content-Type: text/plain\r\n\r\n-- \r\nlist footer\r\n"
    msg = mime.parse(mixed(inner, footer))
    assert "invoice total is 42" in msg.html, msg.html


def test_unsplit_multipart_without_boundary_parameter_keeps_its_content_beside_a_footer() -> None:
    """No boundary parameter: the whole body is the sender's content (no preamble can exist), still hidden."""
    inner = b"Content-Type: multipart/alternative\r\n\r\nThe invoice total is 42 EUR\r\n"
    footer = b"Content-Type: text/plain\r\n\r\n-- \r\nlist footer\r\n"
    msg = mime.parse(mixed(inner, footer))
    assert "invoice total is 42" in msg.html, msg.html


def test_an_invitation_beside_an_unrelated_calendar_file_keeps_its_calendar() -> None:
    """The alternative's calendar is dropped when any other calendar file is attached, even a different one
    (a holidays.ics beside a meeting invitation): the meeting's only copy is lost."""
    alternative = (
        b'Content-Type: multipart/alternative; boundary="a"\r\n\r\n'
        b"--a\r\nContent-Type: text/plain\r\n\r\nYou are invited\r\n"
        b"--a\r\nContent-Type: text/html\r\n\r\n<p>You are invited</p>\r\n"
        b"--a\r\nContent-Type: text/calendar; method=REQUEST\r\n\r\n" + _INVITE + b"--a--"
    )
    holidays = (
        b'Content-Type: text/calendar; name="holidays.ics"\r\n'
        b'Content-Disposition: attachment; filename="holidays.ics"\r\n\r\n' + _HOLIDAYS
    )
    msg = mime.parse(mixed(alternative, holidays))
    assert any(b"meeting-42" in a.data for a in msg.attachments), [a.filename for a in msg.attachments]
