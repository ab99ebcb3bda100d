"""Property-based fuzzing of mime.parse alone (no sockets, so many more examples per second).

mime.parse either returns a Message whose every field is clean or refuses with ContentRejected; it never
raises anything else (that would be a 451 internal error at the end of DATA).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from gateway import mime
from gateway.core.errors import ContentRejected
from gateway.core.model import Message
from tests.conftest import CORPUS
from tests.fuzzing import MIME_TREE, mutated

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
BODY_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
HEADERS = st.lists(
    st.sampled_from(
        [
            b"From: =?utf-8?q?a=00b?= <billing@acme.example>",
            b"To: a@b.example, =?x?q?y?= <c@d.example>",
            b"Subject: =?utf-8?b?AAAA?= =?iso-8859-1?q?=85?=",
            b"Subject: \xff\xfe\x00",
            b"Cc: ;;;,,,<>",
            b'Reply-To: "\\" <x@y.example>',
            b"Message-ID: <\x01>",
            b"X-Gateway-Batch: \x00",
            b"Sender: <@>",
            b"Content-Type: multipart/mixed; boundary=b1",
            b"MIME-Version: 1.0",
            b"From: (((((((((",
            b"To: " + b"a," * 300,
        ]
    ).flatmap(mutated),
    max_size=6,
)


def refusal(exc: ContentRejected) -> bool:
    """A refusal the parser may give: too big or not readable (552/554), or an address header that is not an
    address list (550 5.1.3)."""
    reply = exc.reply
    return reply.code in (552, 554) or ((reply.code, reply.status) == (550, "5.1.3") and "address list" in reply.text)


def clean(message: Message) -> list[str]:
    problems = []
    fields = [message.subject, message.message_id or "", *message.options.values()]
    for addr in (message.from_, message.sender, message.reply_to, *message.to, *message.cc):
        if addr is not None:
            fields.append(addr.name)
    for att in message.attachments:
        fields += [att.filename, att.content_id or ""]
        if not MEDIA_TYPE.fullmatch(att.content_type):
            problems.append(f"content type {att.content_type!r}")
        if not att.filename or att.filename.strip(".") == "" or re.search(r"[/\\]", att.filename):
            problems.append(f"file name {att.filename!r}")
    problems += [f"control character in {value!r}" for value in fields if CONTROL.search(value)]
    for body in (message.html, message.text or ""):
        if BODY_CONTROL.search(body):
            problems.append(f"control character in body {body[:80]!r}")
    if not message.html.strip():
        problems.append("empty html")
    return problems


@given(headers=HEADERS, tree=MIME_TREE, tail=st.binary(max_size=32), lf=st.booleans())
def test_parse_is_clean_or_refused(headers: list[bytes], tree: bytes, tail: bytes, lf: bool) -> None:
    raw = b"".join(headers) + tree + tail
    if lf:
        raw = raw.replace(b"\r\n", b"\n")
    try:
        message = mime.parse(bytearray(raw))
    except ContentRejected as exc:
        event(f"refused: {exc.reply.code} {exc.reply.status}")
        assert refusal(exc), exc.reply
        return
    event(f"{len(message.attachments)} attachments" if message.attachments else "no attachments")
    assert not clean(message), (clean(message), raw)


def assert_clean_or_refused(raw: bytes) -> None:
    try:
        message = mime.parse(raw)
    except ContentRejected as exc:
        assert refusal(exc), exc.reply
        return
    assert not clean(message), (clean(message), raw)


@given(raw=st.binary(max_size=2000))
def test_random_bytes_are_clean_or_refused(raw: bytes) -> None:
    assert_clean_or_refused(raw)


SMALL_CORPUS = sorted(
    (path for path in CORPUS.glob("*/*") if path.is_file() and path.stat().st_size < 20_000),
    key=lambda path: str(path),
)


@st.composite
def mutated_corpus_message(draw: st.DrawFn) -> bytes:
    """A corpus message with a few random edits: bytes deleted, inserted, duplicated or swapped."""
    raw = bytearray(draw(st.sampled_from(SMALL_CORPUS)).read_bytes())
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(raw)))
        edit = draw(st.sampled_from(["delete", "insert", "duplicate", "byte"]))
        if edit == "delete":
            del raw[at : at + draw(st.integers(1, 200))]
        elif edit == "insert":
            raw[at:at] = draw(
                st.sampled_from([b"\x00", b"\r", b"\n", b"--", b"=?", b"?=", b"\xff", b";", b'"'])
                | st.binary(max_size=16)
            )
        elif edit == "duplicate":
            raw[at:at] = raw[at : at + draw(st.integers(1, 400))]
        elif raw and at < len(raw):
            raw[at] = draw(st.integers(0, 255))
    return bytes(raw)


@pytest.mark.corpus
@given(raw=mutated_corpus_message())
def test_mutated_corpus_messages_are_clean_or_refused(raw: bytes) -> None:
    assert_clean_or_refused(raw)


def test_attached_message_with_an_unsplit_multipart_and_8bit_bytes() -> None:
    """Found by the fuzz: the stdlib generator re-decoded such text by its charset and failed to write it."""
    raw = (
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\npreamble\r\n\x80'
    )
    (attachment,) = mime.parse(raw).attachments
    assert attachment.data == b'Subject: inner\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\npreamble\r\n\x80'
