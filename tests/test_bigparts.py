"""Large base64 bodies lifted out before parsing (gateway/mime/largeparts.py): the same Message as parsing whole.

Every comparison parses a message twice, with lifting off (`lift_above=None`, the parser walks every line)
and forced on for every clean body (`lift_above=0`), and wants equal results: attachments by their decoded
bytes, every other field exactly, and the same refusal when there is one.
"""

from __future__ import annotations

import base64
import random
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import tests.fuzzing  # noqa: F401  (the hypothesis profiles)
from gateway import mime
from gateway.core.errors import ContentRejected
from gateway.core.model import Message
from gateway.mime import largeparts, parser
from tests.conftest import CORPUS
from tests.harness import Running
from tests.smtputil import send, session
from tests.test_corpus import corpus_files
from tests.test_corpus_mutations import expansion_cases, mutated_corpus
from tests.test_fuzz_mime import mutated_corpus_message

BENCH_1M = Path(__file__).resolve().parents[1] / "bench" / "messages" / "attach-1m.eml"
HEAD = b"From: Billing <billing@acme.example>\r\nTo: client@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
PDF = "Content-Type: application/pdf; name=scan.pdf\r\nContent-Disposition: attachment; filename=scan.pdf\r\n"
_Outcome = Message | tuple[str, str, str]


def normalized(message: Message) -> Message:
    return replace(message, attachments=tuple(replace(a, data=a.decoded(), b64=None) for a in message.attachments))


def outcome(raw: bytes, lift_above: int | None) -> tuple[_Outcome, int]:
    """The parse (or its refusal) and how many attachments carry their base64 as it arrived."""
    try:
        message = mime.parse(bytearray(raw), lift_above)
    except ContentRejected as exc:
        return ("refused", str(exc.reply), exc.reason), 0
    return normalized(message), sum(a.b64 is not None for a in message.attachments)


def refused(raw: bytes, lift_above: int | None = None) -> bool:
    return isinstance(outcome(raw, lift_above)[0], tuple)


def equivalent(raw: bytes) -> int:
    """Asserts lifting changes nothing, whatever the threshold (0: every clean body; 1000: small parts are
    skipped unread); returns how many attachments were lifted with threshold 0."""
    whole, none_lifted = outcome(raw, None)
    assert none_lifted == 0
    for threshold in (1000, largeparts.THRESHOLD):
        assert outcome(raw, threshold)[0] == whole, threshold
    fast, lifted = outcome(raw, 0)
    if lifted:
        carried = [a for a in mime.parse(raw, 0).attachments if a.b64 is not None]
        assert all(a.size == len(a.decoded()) and a.data == b"" for a in carried)
    assert fast == whole
    return lifted


def test_a_session_buffer_is_held_once_its_attachment_a_view_of_it() -> None:
    raw = message(multipart("mixed", "b", text(), pdf(_BIG)))
    buffer = bytearray(raw)
    [attachment] = mime.parse(buffer, 0).attachments
    assert isinstance(attachment.b64, memoryview) and attachment.b64.obj is buffer
    assert attachment.decoded() == _BIG


def data(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def encoded(content: bytes, width: int | None = 76, eol: bytes = b"\r\n") -> bytes:
    text = base64.b64encode(content)
    if width is None:
        return text
    return eol.join(text[i : i + width] for i in range(0, len(text), width))


def part(headers: str, body: bytes, eol: bytes = b"\r\n") -> bytes:
    return headers.replace("\r\n", eol.decode()).encode() + eol + body


def multipart(subtype: str, boundary: str, *parts: bytes, eol: bytes = b"\r\n", close: bool = True) -> bytes:
    delimiter = f"--{boundary}".encode()
    body = b"".join(delimiter + eol + p + eol for p in parts) + (delimiter + b"--" + eol if close else b"")
    return part(f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n', body, eol)


def pdf(content: bytes, eol: bytes = b"\r\n", width: int | None = 76, cte: str = "base64") -> bytes:
    return part(PDF + f"Content-Transfer-Encoding: {cte}\r\n", encoded(content, width, eol), eol)


def text(body: str = "Hello, the scan is attached.", eol: bytes = b"\r\n") -> bytes:
    return part("Content-Type: text/plain; charset=utf-8\r\n", body.encode(), eol)


def html(body: str = "<p>Hello</p>", eol: bytes = b"\r\n") -> bytes:
    return part("Content-Type: text/html; charset=utf-8\r\n", body.encode(), eol)


def message(tree: bytes, eol: bytes = b"\r\n") -> bytes:
    return HEAD.replace(b"\r\n", eol) + tree


# -- the corpus and the benchmark's message --------------------------------------------------------------


@pytest.mark.corpus
def test_every_corpus_message_parses_the_same_with_bodies_lifted() -> None:
    lifted = sum(equivalent((CORPUS / name).read_bytes()) for name in corpus_files())
    assert lifted >= 140  # every clean base64 attachment of the corpus (147 when written)


@pytest.mark.corpus
def test_mutated_corpus_messages_and_expansion_cases_parse_the_same_lifted() -> None:
    """Truncated, boundaries removed, charsets swapped, headers duplicated, nested 30 levels (one kind per
    file; every kind with HYPOTHESIS_PROFILE=long), and the messages built to make a decoder expand."""
    samples = [*mutated_corpus(), *expansion_cases(slow=False).items()]
    assert sum(equivalent(raw) for _, raw in samples) >= 60  # 74 when written


def test_the_benchmarks_1mb_message_parses_the_same_with_its_attachment_lifted() -> None:
    raw = BENCH_1M.read_bytes()
    assert equivalent(raw) == 1
    (attachment,) = mime.parse(raw).attachments  # the default threshold lifts it too
    assert attachment.b64 is not None and attachment.data == b""
    assert attachment.size == len(attachment.decoded()) == 1024 * 1024


# -- generated messages in the corpus' structures ----------------------------------------------------------

_BIG = data(100_000)
_IMAGE = b"\x89PNG\r\n\x1a\n" + data(50_000, seed=2)
_APPLE_IMAGE = "Content-Type: image/png; name=photo.png\r\nContent-Disposition: inline; filename=photo.png\r\n"
STRUCTURES = {
    "mixed": message(multipart("mixed", "b", text(), pdf(_BIG))),
    "mixed, LF only": message(multipart("mixed", "b", text(eol=b"\n"), pdf(_BIG, b"\n"), eol=b"\n"), b"\n"),
    "related": message(
        multipart(
            "related",
            "r",
            html('<img src="cid:logo@x">'),
            part(
                "Content-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Transfer-Encoding: base64\r\n",
                encoded(_IMAGE),
            ),
        )
    ),
    "alternative inside mixed": message(
        multipart("mixed", "m", multipart("alternative", "a", text(), html()), pdf(_BIG), pdf(_IMAGE))
    ),
    "Apple Mail html / image without Content-ID / html": message(
        multipart(
            "mixed",
            "apple",
            html("<p>one</p>"),
            part(_APPLE_IMAGE + "Content-Transfer-Encoding: base64\r\n", encoded(_IMAGE)),
            html("<p>two</p>"),
        )
    ),
    "Apple Mail in related in alternative": message(
        multipart(
            "alternative",
            "alt",
            text(),
            multipart(
                "related",
                "rel",
                html("<p>one</p>"),
                part(_APPLE_IMAGE + "Content-Transfer-Encoding: base64\r\n", encoded(_IMAGE)),
                html("<p>two</p>"),
            ),
        )
    ),
    "nested five levels": message(
        multipart(
            "mixed",
            "l1",
            multipart(
                "mixed",
                "l2",
                multipart(
                    "related", "l3", multipart("alternative", "l4", multipart("mixed", "l5", text(), pdf(_BIG)), html())
                ),
            ),
        )
    ),
    "no padding": message(multipart("mixed", "b", pdf(data(99_999)))),
    "one padding character": message(multipart("mixed", "b", pdf(data(100_001)))),
    "two padding characters": message(multipart("mixed", "b", pdf(data(100_000)))),
    "one long line": message(multipart("mixed", "b", pdf(_BIG, width=None))),
    "1000-character lines": message(multipart("mixed", "b", pdf(_BIG, width=1000))),
    "lines of 4": message(multipart("mixed", "b", pdf(data(3_000), width=4))),
    "bare CR line ends in the body": message(
        multipart("mixed", "b", part(PDF + "Content-Transfer-Encoding: base64\r\n", encoded(_BIG, eol=b"\r")))
    ),
    "a single-part message": message(part(PDF + "Content-Transfer-Encoding: base64\r\n", encoded(_BIG))),
    "a single-part message without a final line break": message(pdf(_BIG)),
    "blank lines around the body": message(
        multipart(
            "mixed",
            "b",
            part(PDF + "Content-Transfer-Encoding: base64\r\n", b"\r\n\r\n" + encoded(_BIG) + b"\r\n\r\n\r\n"),
        )
    ),
    "delimiters with trailing spaces, preamble and epilogue": HEAD
    + part(
        'Content-Type: multipart/mixed; boundary="b"\r\n',
        b"This is a MIME message.\r\n--b \t\r\n" + text() + b"\r\n--b\r\n" + pdf(_BIG) + b"\r\n--b-- \r\nepilogue\r\n",
    ),
    "no close delimiter": message(multipart("mixed", "b", text(), pdf(_BIG), close=False)),
    "an outer delimiter ends the inner multipart": message(
        multipart("mixed", "outer", multipart("mixed", "inner", text(), pdf(_BIG), close=False), pdf(_IMAGE))
    ),
    "boundaries that are prefixes of each other": message(
        multipart("mixed", "b", multipart("mixed", "bb", pdf(_BIG), text()), multipart("mixed", "b-", pdf(_IMAGE)))
    ),
    "repeated delimiter lines": HEAD
    + part('Content-Type: multipart/mixed; boundary="b"\r\n', b"--b\r\n--b\r\n" + pdf(_BIG) + b"\r\n--b\r\n--b--\r\n"),
    "sloppy transfer encoding names": message(
        multipart("mixed", "b", pdf(_BIG, cte="Base64 "), pdf(_IMAGE, cte="BASE64;"))
    ),
    "several big attachments": message(
        multipart("mixed", "b", text(), *(pdf(data(40_000, seed)) for seed in range(5)))
    ),
}


@pytest.mark.parametrize("name", STRUCTURES)
def test_generated_big_attachments_parse_the_same_lifted(name: str) -> None:
    assert equivalent(STRUCTURES[name]) >= 1


@pytest.mark.parametrize("size", [50_000, 3_000_000])  # one slice of the digest, several
def test_a_lifted_inline_image_gets_the_same_derived_content_id(size: int) -> None:
    raw = message(
        multipart(
            "mixed",
            "apple",
            html("<p>one</p>"),
            part(_APPLE_IMAGE + "Content-Transfer-Encoding: base64\r\n", encoded(data(size))),
            html("<p>two</p>"),
        )
    )
    (image,) = mime.parse(raw, 0).attachments
    assert image.b64 is not None
    assert image.content_id is not None and image.content_id == mime.parse(raw, None).attachments[0].content_id
    assert f'<img src="cid:{image.content_id}">' in mime.parse(raw, 0).html


# Each is left on the parser's path: nothing is lifted, and the result is what it always was.
NOT_LIFTED = {
    "missing padding": message(multipart("mixed", "b", pdf(data(100_000))[:-2])),
    "too much padding": message(multipart("mixed", "b", pdf(data(100_000)) + b"=")),
    "padding split by a line break": message(
        multipart(
            "mixed", "b", part(PDF + "Content-Transfer-Encoding: base64\r\n", encoded(data(1000))[:-1] + b"\r\n=")
        )
    ),
    "padding, then more base64": message(
        multipart(
            "mixed", "b", part(PDF + "Content-Transfer-Encoding: base64\r\n", encoded(data(1000)) + encoded(data(999)))
        )
    ),
    "padding in the middle (two encodings)": message(
        multipart(
            "mixed",
            "b",
            part(PDF + "Content-Transfer-Encoding: base64\r\n", encoded(data(1000)) + b"\r\n" + encoded(data(1001))),
        )
    ),
    "a space at the end of a line": message(multipart("mixed", "b", pdf(_BIG).replace(b"\r\n", b" \r\n", 100))),
    "a tab inside a line": message(multipart("mixed", "b", pdf(_BIG).replace(b"A", b"\tA", 1))),
    "characters outside the alphabet": message(multipart("mixed", "b", pdf(_BIG).replace(b"\r\n", b"!\r\n", 200))),
    "a dash line inside the body": message(
        multipart(
            "mixed",
            "b",
            part(PDF + "Content-Transfer-Encoding: base64\r\n", encoded(_BIG[:50_001]) + b"\r\n--\r\n" + encoded(_BIG)),
        )
    ),
    "text after the base64": message(multipart("mixed", "b", pdf(_BIG) + b"\r\n\r\nSent from my scanner\r\n")),
    "header lines spilled into the body": message(
        multipart(
            "mixed", "b", part(PDF + "Content-Transfer-Encoding: base64\r\n", b"X-Spilled: yes\r\n" + encoded(_BIG))
        )
    ),
    "8-bit bytes": message(multipart("mixed", "b", pdf(_BIG).replace(b"A", b"\xc3", 1))),
    "an empty body": message(multipart("mixed", "b", part(PDF + "Content-Transfer-Encoding: base64\r\n", b""))),
    "a base64 text part": message(
        multipart(
            "mixed",
            "b",
            part(
                "Content-Type: text/plain; charset=utf-8\r\nContent-Disposition: attachment; filename=a.txt\r\n"
                "Content-Transfer-Encoding: base64\r\n",
                encoded(b"plain text " * 10_000),
            ),
        )
    ),
    "quoted-printable": message(multipart("mixed", "b", pdf(_BIG, cte="quoted-printable"))),
    "no transfer encoding": message(multipart("mixed", "b", part(PDF, encoded(_BIG)))),
    "inside an attached message": message(
        multipart(
            "mixed",
            "b",
            text(),
            part("Content-Type: message/rfc822\r\n", message(multipart("mixed", "inner", pdf(_BIG)))),
        )
    ),
    "a digest part without Content-Type": message(
        multipart("digest", "d", part("Content-Transfer-Encoding: base64\r\n", encoded(_BIG)))
    ),
    "the placeholder's own text in the message": message(
        multipart("mixed", "b", text(largeparts.PLACEHOLDER + "0\x00"), pdf(_BIG))
    ),
    "a boundary the stdlib cannot read (RFC 2231 sections mixed)": message(
        part(
            "Content-Type: multipart/mixed; boundary*=utf-8''x; boundary*0=y\r\n",
            b"--x\r\n" + pdf(_BIG) + b"\r\n--x--\r\n",
        )
    ),
    "a multipart without a boundary": message(
        part("Content-Type: multipart/mixed\r\nContent-Transfer-Encoding: base64\r\n", encoded(_BIG))
    ),
}


@pytest.mark.parametrize("name", NOT_LIFTED)
def test_bodies_that_are_not_clean_base64_stay_on_the_parsers_path(name: str) -> None:
    raw = NOT_LIFTED[name]
    assert largeparts.lift(raw, parser._POLICY, 0) is None
    assert equivalent(raw) == 0


def test_a_delimiter_the_scan_reads_as_a_header_falls_back_to_parsing_whole() -> None:
    """A boundary may contain ":" (RFC 2046 bchars), and then its delimiter line looks like a header line:
    the scan reads the part's header block past it, the parser ends the part there. claim() sees the
    placeholder in a text part, and the message is parsed whole."""
    raw = HEAD + part(
        'Content-Type: multipart/mixed; boundary="a:b"\r\n',
        (
            b"--a:b\r\n"
            + PDF.encode()
            + b"Content-Transfer-Encoding: base64\r\n--a:b\r\nX-Other: part\r\n\r\n"
            + encoded(_BIG)
            + b"\r\n--a:b--\r\n"
        ),
    )
    lifted = largeparts.lift(raw, parser._POLICY, 0)
    assert lifted is not None and len(lifted.bodies) == 1
    assert largeparts.claim(parser._parse_tree(lifted.skeleton, lifted.line_ends), lifted) is None
    assert equivalent(raw) == 0
    assert encoded(_BIG)[:76].decode() in (mime.parse(raw).text or "")  # shown as text, as it always was


def test_the_scan_stops_at_its_budget_keeping_what_it_lifted() -> None:
    """Past MAX_MISSES lines that look like a delimiter and are not, the scan stops: the attachment before
    them is lifted, the one after them is parsed as it always was."""
    decoys = text("--bX\r\n" * (largeparts.MAX_MISSES + 1))
    raw = message(multipart("mixed", "b", pdf(_BIG), decoys, pdf(_IMAGE)))
    assert equivalent(raw) == 1
    lifted = largeparts.lift(raw, parser._POLICY, 0)
    assert lifted is not None and [r.length for r in lifted.bodies.values()] == [len(base64.b64encode(_BIG))]


@pytest.mark.parametrize(
    ("skeleton", "why"),
    [
        (
            b"Content-Type: message/rfc822\r\n\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64"
            b"\r\n\r\nPLACEHOLDER\r\n",
            "inside an attached message",
        ),
        (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nPLACEHOLDER\r\n", "a text part"),
        (
            b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\nPLACEHOLDER\r\n",
            "more than the placeholder",
        ),
        (b"Content-Type: image/png\r\n\r\nPLACEHOLDER\r\n", "not declared base64"),
        (b'Content-Type: multipart/mixed; boundary="b"\r\n\r\nPLACEHOLDER\r\n--b\r\n\r\nx\r\n--b--\r\n', "a preamble"),
        (
            b"Content-Type: multipart/mixed\r\nContent-Transfer-Encoding: base64\r\n\r\nPLACEHOLDER\r\n",
            "a multipart without a boundary",
        ),
    ],
)
def test_claim_refuses_a_placeholder_anywhere_but_a_base64_attachment(skeleton: bytes, why: str) -> None:
    placeholder = largeparts.PLACEHOLDER + "0\x00"
    skeleton = skeleton.replace(b"PLACEHOLDER", placeholder.encode())
    lifted = largeparts.Lifted(skeleton, {placeholder: largeparts.Run(0, 4, 4)}, 0)
    assert largeparts.claim(parser._parse_tree(skeleton), lifted) is None, why
    good = b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n\r\n" + placeholder.encode() + b"\r\n"
    assert largeparts.claim(parser._parse_tree(good), largeparts.Lifted(good, {placeholder: b"AAAA"}, 0)) is not None


def test_limits_count_the_lifted_lines_and_refuse_alike() -> None:
    """The nesting limit counts the lines of the whole message, lifted ones included (a skeleton of a few
    lines would let this chain of 125 multiparts through); a lifted part still counts as a part."""
    chain = text()
    for level in range(125):
        chain = multipart("mixed", f"d{level}", chain)
    lines = pdf(data(400_000), width=4)  # 133,334 lines: 127 levels x 266,668 line-end bytes > MAX_NESTING_WORK
    raw = message(multipart("mixed", "top", lines, chain))
    assert largeparts.lift(raw, parser._POLICY, 0) is not None
    assert refused(raw)
    assert equivalent(raw) == 0
    many = message(multipart("mixed", "b", pdf(_BIG), *([text()] * parser.MAX_PARTS)))
    assert refused(many)
    assert equivalent(many) == 0


def test_a_lifted_attachment_counts_its_decoded_size_against_the_decoded_limit() -> None:
    """Decoded bodies and attachments may take DECODED_FACTOR x the raw size: at the edge, found by
    bisection over the length of a markup bomb beside a lifted attachment, both ways refuse alike."""
    attachment = pdf(data(600_000))

    def raw(length: int) -> bytes:
        return message(multipart("mixed", "b", text("\U0001f600" + "&" * length), attachment))

    accepted, refusal = 0, 2_000_000
    assert not refused(raw(accepted)) and refused(raw(refusal))
    while refusal - accepted > 1:
        middle = (accepted + refusal) // 2
        if refused(raw(middle)):
            refusal = middle
        else:
            accepted = middle
    assert equivalent(raw(accepted)) == 1
    assert refused(raw(refusal), 0) and outcome(raw(refusal), 0)[0] == outcome(raw(refusal), None)[0]


# -- memory ---------------------------------------------------------------------------------------------------


def test_parsing_a_big_attachment_takes_about_its_size_in_memory() -> None:
    """tracemalloc peak of mime.parse for a 4 MB attachment: the lifted base64 text and the small skeleton
    (before lifting: the parser's lines, the joined payload and the decoded bytes, 3.3 times the message)."""
    raw = bytearray(message(multipart("mixed", "b", text(), pdf(data(3_000_000)))))
    size = len(raw)
    tracemalloc.start()
    try:
        mime.parse(raw)
        lifted_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        mime.parse(raw, None)
        whole_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lifted_peak < 1.3 * size < 2.5 * size < whole_peak
    raw.clear()  # the pipeline frees the buffer once parsed: no view of it may be left


def test_parsing_a_big_plain_text_body_holds_few_copies_of_it() -> None:
    """tracemalloc peak of mime.parse for a 4 MB plain-text body (76-character lines, no attachment): the
    parser's tree holds the text once and the result twice (text, html); decoding, line-end conversion and
    the control check no longer keep a copy each alive at once (6.1x before, bench/scan.py --kind text)."""
    line = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor i\r\n"
    raw = bytearray(b"From: a@example.com\r\nTo: b@example.com\r\nSubject: report\r\n\r\n" + line * 50_000)
    size = len(raw)
    tracemalloc.start()
    try:
        msg = mime.parse(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg.text is not None and len(msg.text) > 0.95 * size
    assert peak < 4.5 * size, peak / size
    raw.clear()


# -- random structures -------------------------------------------------------------------------------------

_BOUNDARIES = ["b", "b1", "bb", "b-", "=_Part_1", "a:b", "b b", "x" * 70]
_BODY_KINDS = ["clean"] * 10 + [
    "no padding",
    "space",
    "junk",
    "blank line",
    "trailing text",
    "leading blank",
    "trailing blank",
    "two encodings",
    "bare CR",
]


def _base64_body(draw: st.DrawFn) -> bytes:
    content = draw(st.binary(max_size=400))
    width = draw(st.sampled_from([76, 76, 64, 4, 1000, None]))
    body = encoded(content, width)
    kind = draw(st.sampled_from(_BODY_KINDS))
    event(f"body: {kind}")
    if kind == "no padding":
        return body.rstrip(b"=")
    if kind == "space":
        return body.replace(b"\r\n", b" \r\n", 1) + b" "
    if kind == "junk":
        at = draw(st.integers(0, len(body)))
        return body[:at] + draw(st.sampled_from([b"!", b"-", b"--b", b".", b"\x00", b"\xff", b"*"])) + body[at:]
    if kind == "blank line":
        return body.replace(b"\r\n", b"\r\n\r\n", 1)
    if kind == "trailing text":
        return body + b"\r\n-- \r\nsignature"
    if kind == "leading blank":
        return b"\r\n" + body
    if kind == "trailing blank":
        return body + b"\r\n\r\n"
    if kind == "two encodings":
        return body + b"\r\n" + encoded(content[:5])
    if kind == "bare CR":
        return body.replace(b"\r\n", b"\r")
    return body


@st.composite
def random_part(draw: st.DrawFn, depth: int = 0) -> bytes:
    kinds = ["base64"] * 3 + ["text", "html", "message"] + (["multipart"] * 3 if depth < 4 else [])
    kind = draw(st.sampled_from(kinds) if depth else st.just("multipart"))
    if kind == "base64":
        ctype = draw(
            st.sampled_from(
                [
                    "application/pdf",
                    "image/png",
                    "application/octet-stream",
                    "image/gif",
                    "text/plain",
                    "bogus",
                    "message/rfc822",
                ]
            )
        )
        extra = draw(
            st.sampled_from(
                [
                    "",
                    "Content-Disposition: attachment; filename=f.bin\r\n",
                    "Content-Disposition: inline\r\n",
                    "Content-ID: <c@x>\r\n",
                ]
            )
        )
        cte = draw(st.sampled_from(["base64", "base64", "BASE64 ", "Base64;", "7bit"]))
        headers = f"Content-Type: {ctype}\r\n{extra}Content-Transfer-Encoding: {cte}\r\n"
        return part(headers if draw(st.integers(0, 9)) else headers[14 + len(ctype) + 2 :], _base64_body(draw))
    if kind == "text":
        return text(draw(st.sampled_from(["hi", "AAAA", "--b", "", "From me\r\n\r\nAAAA"])))
    if kind == "html":
        return html()
    if kind == "message":
        return part("Content-Type: message/rfc822\r\n", HEAD + draw(random_part(depth + 1)))
    subtype = draw(st.sampled_from(["mixed", "related", "alternative", "digest"]))
    boundary = draw(st.sampled_from(_BOUNDARIES))
    children = draw(st.lists(random_part(depth + 1), max_size=4))
    delimiter = f"--{boundary}".encode() + draw(st.sampled_from([b"", b"", b" ", b"\t "]))
    body = draw(st.sampled_from([b"", b"preamble\r\n", b"\r\n"]))
    body += b"".join(delimiter + b"\r\n" + child + b"\r\n" for child in children)
    if draw(st.booleans()):
        body += f"--{boundary}--".encode() + draw(st.sampled_from([b"\r\n", b"", b"\r\nepilogue AAAA\r\n"]))
    return part(f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n', body)


@given(tree=random_part(), lf=st.booleans())
def test_random_structures_with_random_base64_bodies_parse_the_same_lifted(tree: bytes, lf: bool) -> None:
    raw = HEAD + tree
    if lf:
        raw = raw.replace(b"\r\n", b"\n")
    lifted = equivalent(raw)
    event(f"lifted: {min(lifted, 3)}")


@pytest.mark.corpus
@given(raw=mutated_corpus_message())
def test_mutated_corpus_messages_parse_the_same_lifted(raw: bytes) -> None:
    event(f"lifted: {min(equivalent(raw), 3)}")


# -- through the gateway ------------------------------------------------------------------------------------


def test_a_lifted_attachment_reaches_the_api_as_it_arrived(gateway: Running) -> None:
    content = data(2_000_000)
    raw = message(multipart("mixed", "b", text(), pdf(content)))
    with session(gateway) as client:
        code, reply = send(client, raw)
    assert code == 250, reply
    (attachment,) = gateway.sent[-1]["body"]["adjuntos"]
    assert attachment["contenido"] == base64.b64encode(content).decode()
    assert attachment["nombre"] == "scan.pdf"
