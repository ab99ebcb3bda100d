"""The fast splitter (gateway/mime/fastsplit.py) gives the feed parser's tree and mime.parse's result, or declines."""

from __future__ import annotations

from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.errors import ContentRejected
from gateway.core.model import Message
from gateway.mime import fastsplit, headers, parser
from gateway.mime.headers import RAW_HEADERS
from tests.conftest import CORPUS
from tests.test_corpus import corpus_files

BENCH_MESSAGE = Path(__file__).resolve().parents[1] / "bench" / "messages" / "multipart-5k.eml"


def shape(msg: EmailMessage) -> tuple[Any, ...]:
    """Everything of a parse tree the gateway may read: headers as stored, payloads, preambles, epilogues."""
    payload = msg._payload  # type: ignore[attr-defined]
    body = tuple(shape(p) for p in payload) if isinstance(payload, list) else payload
    return (msg._headers, msg.get_default_type(), msg.preamble, msg.epilogue, body)  # type: ignore[attr-defined]


def outcome(raw: bytes, fast: bool, lift_above: int | None) -> Message | tuple[str, str, str]:
    try:
        return parser.parse(raw, lift_above=lift_above, fast=fast)
    except ContentRejected as exc:
        return ("rejected", exc.reason, str(exc.reply))


def reference_tree(raw: bytes) -> tuple[Any, ...] | str:
    try:
        return shape(parser._parse_tree(raw, fast=False))
    except ContentRejected as exc:
        return exc.reason


def check(raw: bytes) -> bool:
    """Asserts the fast path's tree and result are the reference's; whether the fast path took `raw`."""
    tree = fastsplit.tree(raw, RAW_HEADERS)
    if tree is not None:
        assert shape(tree) == reference_tree(raw)
    for lift_above in (parser.largeparts.THRESHOLD, None):
        assert outcome(raw, True, lift_above) == outcome(raw, False, lift_above)
    return tree is not None


def variants(raw: bytes) -> list[bytes]:
    """The message as stored and, as SMTP delivers it, with CRLF line ends."""
    crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return [raw] if crlf == raw else [raw, crlf]


@pytest.mark.corpus
def test_corpus_messages_parse_alike_on_both_paths() -> None:
    taken = total = 0
    for name in corpus_files():
        for raw in variants((CORPUS / name).read_bytes()):
            total += 1
            try:
                taken += check(raw)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from exc
    # Most real mail is well-formed: the fast path must take it (else it saves nothing).
    assert taken > total * 0.6, (taken, total)


def test_bench_message_takes_the_fast_path() -> None:
    for raw in variants(BENCH_MESSAGE.read_bytes()):
        assert check(raw)


def test_limits_hold_on_the_fast_path() -> None:
    """Past its caps the fast path declines, and the bounded parser refuses as it always did."""
    head = b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    many = head + b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(parser.MAX_PARTS + 1))
    deep = b"From: a@example.com\r\n" + b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(parser.MAX_DEPTH + 1)
    )
    for raw in (many, deep):
        assert fastsplit.tree(raw, RAW_HEADERS) is None
        result = outcome(raw, True, None)
        assert result == outcome(raw, False, None)
        assert isinstance(result, tuple) and result[0] == "rejected"


def test_many_false_delimiters_leave_the_message_to_the_parser() -> None:
    """A boundary written many times where it starts no delimiter line costs the fast path a step each; past
    MAX_MISSES it declines, and the parser's result is the one given."""
    misses = b"x--b " * (fastsplit.MAX_MISSES + 1)
    raw = (
        b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n"
        + misses
        + b"\r\n--b--\r\n"
    )
    assert fastsplit.tree(raw, RAW_HEADERS) is None
    assert check(raw[: -len(misses) - 9] + b"x--b\r\n--b--\r\n")  # a few are fine
    check(raw)


# -- generated messages ------------------------------------------------------------------------------------

_words = st.sampled_from(
    [
        "hello",
        "Grüße",
        "=?utf-8?q?caf=C3=A9?=",
        "=?iso-8859-1?b?Y2Fm6Q==?=",
        "=?koi8-r?q?=F0=D2=C9?=",
        "=?bogus?q?x?=",
        "a@b.example",
        '"Q, Name"',
        "<x@y.example>",
        "(comment)",
        ";",
        ":",
        "\t",
        "  ",
        "\xff\xfe",
        "From",
        "--b1",
    ]
)
_GOOD_NAMES = [
    "Subject",
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Sender",
    "Message-ID",
    "X-Gateway-Campaign",
    "X-Custom",
    "Content-ID",
    "Content-Location",
    "Date",
    "MIME-Version",
]
# Lines the feed parser does not read as header lines are rarer, so that most messages stay well-formed.
_names = st.sampled_from([*_GOOD_NAMES * 4, "X Bad", ":", "From ", "Bad\xe9"])  # fmt: skip
_charsets = st.sampled_from(["utf-8", "us-ascii", "iso-8859-1", "windows-1251", "x-unknown", "", '"utf-8"', "utf-16"])
_encodings = st.sampled_from(["7bit", "8bit", "quoted-printable", "base64", "Base64 ", "binary", "x-uuencode", ""])
_bodies = st.lists(
    st.sampled_from(
        [
            "plain line",
            "caf=C3=A9 soft=",
            "break",
            "SGVsbG8gd29ybGQ=",
            "Grüße \xe9",
            "<p>html &amp; <b>bold</b></p>",
            "",
            " ",
            "--",
            "--b1",
            "--b1--",
            "--b2 ",
            "From x",
            "Header: like",
            "\x00\x07",
        ]
    ),
    max_size=6,
)


@st.composite
def header_block(draw: st.DrawFn, extra: list[str], clean: bool) -> list[str]:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        value = " ".join(draw(st.lists(_words, max_size=5)))
        fold = draw(st.sampled_from(["", "", "\n ", "\n\t"] if clean else ["", "\n ", "\n"]))
        name = draw(st.sampled_from(_GOOD_NAMES) if clean else _names)
        lines.append(f"{name}: {value}{fold}{draw(_words).strip() or 'x' if fold else ''}")
    return lines + extra


@st.composite
def mime_part(draw: st.DrawFn, depth: int, clean: bool) -> str:
    """A MIME part; `clean`: one whose header blocks, multiparts and delimiters are all well-formed (the
    fast path's ground), else anything goes."""
    kind = draw(st.sampled_from(["leaf", "multipart", "multipart", "message"] if depth < 3 else ["leaf"]))
    if kind == "multipart":
        boundary = draw(st.sampled_from([f"b{depth}", f'"b{depth}"', f"b{depth} ", "=_b.1+(x)", f"b{depth}*"]))
        if not clean:
            boundary = draw(st.sampled_from([boundary, "b1", ""]))
        subtype = draw(st.sampled_from(["mixed", "alternative", "related"] + ([] if clean else ["digest"])))
        heads = draw(header_block([f"Content-Type: multipart/{subtype}; boundary={boundary}"], clean))
        name = boundary.strip('"').strip()
        children = draw(st.lists(mime_part(depth + 1, clean), min_size=1, max_size=3))
        preamble = draw(st.sampled_from(["", "preamble\n", "\n", "pre\n\n"]))
        close = draw(st.sampled_from([f"--{name}--\n", f"--{name}--", f"--{name}-- \n", "", f"--{name}--\nepilogue\n"]))
        sep = "\n\n" if clean else draw(st.sampled_from(["\n\n", "\n", ""]))
        body = preamble + "".join(f"--{name}{draw(st.sampled_from(['', ' ', chr(9)]))}\n{c}\n" for c in children)
        return "\n".join(heads) + sep + body + close
    if kind == "message":
        heads = draw(header_block(["Content-Type: message/rfc822"], clean))
        return "\n".join(heads) + "\n\n" + draw(mime_part(depth + 1, clean))
    ctype = draw(st.sampled_from(["text/plain", "text/html", "application/pdf", "image/png", "text/calendar", ""]))
    extra = []
    if ctype:
        extra.append(f'Content-Type: {ctype}; charset={draw(_charsets)}; name="f.{draw(_words)}"')
    if cte := draw(_encodings):
        extra.append(f"Content-Transfer-Encoding: {cte}")
    if draw(st.booleans()):
        extra.append(
            f"Content-Disposition: {draw(st.sampled_from(['inline', 'attachment', 'x']))}; filename*=utf-8''a%20b"
        )
    heads = draw(header_block(extra, clean))
    sep = "\n\n" if clean else draw(st.sampled_from(["\n\n", "\n", "\n \n"]))
    return "\n".join(heads) + sep + "\n".join(draw(_bodies))


@given(
    st.booleans().flatmap(lambda clean: mime_part(0, clean)),
    st.sampled_from(["\n", "\r\n", "mixed", "\r"]),
    st.booleans(),
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_messages_parse_alike_on_both_paths(text: str, eol: str, latin1: bool) -> None:
    raw = text.encode("latin-1" if latin1 else "utf-8", "surrogateescape")
    if eol == "mixed":
        raw = raw.replace(b"\n\n", b"\r\n\n")
    elif eol != "\n":
        raw = raw.replace(b"\n", eol.encode())
    check(raw)


# -- header parameters -------------------------------------------------------------------------------------

_param_text = st.lists(
    # The characters the fast reading declines (backslash, star, angle bracket) one in ten.
    st.sampled_from(
        [*'abcAB=;"  \t/-.\xe9\udce9\x1f\u2028İ=;"', "charset", "boundary", "name", "filename", "start", "\\", "*", "<"]
    ),
    max_size=24,
).map("".join)


def _stdlib_or_error(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except TypeError as exc:
        return ("TypeError", str(exc))


@given(st.lists(_param_text, min_size=0, max_size=2), st.sampled_from(["charset", "boundary", "name", "Start"]))
@settings(max_examples=1000, deadline=None)
def test_header_parameters_read_as_the_stdlib_reads_them(values: list[str], param: str) -> None:
    part = EmailMessage(policy=RAW_HEADERS)
    for value in values:
        part.set_raw("Content-Type", value)
        part.set_raw("Content-Disposition", value)
    for header in ("content-type", "Content-Disposition"):
        ours = _stdlib_or_error(headers.get_param, part, param, header)
        assert ours == _stdlib_or_error(part.get_param, param, None, header)
    assert _stdlib_or_error(headers.content_charset, part) == _stdlib_or_error(part.get_content_charset)
    assert _stdlib_or_error(headers.boundary, part) == _stdlib_or_error(part.get_boundary)


def test_the_fast_paths_caps_keep_within_the_parsers_limits() -> None:
    """A message the fast path takes is one the bounded parser would not refuse for its size or shape."""
    assert fastsplit.MAX_SIZE * fastsplit.MAX_DEPTH <= parser.MAX_NESTING_WORK  # line ends <= bytes
    assert fastsplit.MAX_DEPTH <= parser.MAX_DEPTH
    assert fastsplit.MAX_PARTS <= parser.MAX_PARTS
    assert fastsplit.MAX_HEADER_LINES <= parser.MAX_HEADER_LINES
