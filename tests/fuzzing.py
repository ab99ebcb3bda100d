"""Property-based fuzzing support: hypothesis profiles, SMTP input strategies and the reply invariants.

Profiles (HYPOTHESIS_PROFILE): "ci" (default) is small, derandomized and keeps no example database, so CI is
bounded and repeatable; "long" is for a local hunt, e.g.

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/test_fuzz_smtp.py tests/test_corpus_mutations.py
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.harness import PASSWORD, USER
from tests.smtputil import RECIPIENT, SENDER

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_SLOW_IS_FINE,
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=3000,
    deadline=None,
    database=None,
    suppress_health_check=_SLOW_IS_FINE,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


# -- strategies ----------------------------------------------------------------------------------------------

ADDRESSES = [
    SENDER,
    RECIPIENT,
    "",
    "<>",
    "@",
    "a@",
    "@b",
    "postmaster",
    "x@gmail.com",
    "j\u00f6rg@acme.example",
    "billing@acme.example SIZE=100",
    "billing@acme.example BODY=8BITMIME SMTPUTF8",
    '"quoted local"@acme.example',
    "billing@[127.0.0.1]",
    "billing@acme.example\x00",
    "a" * 300 + "@acme.example",
    "billing@" + "d." * 200 + "com",
]
VERBS = [
    "EHLO",
    "HELO",
    "MAIL",
    "RCPT",
    "DATA",
    "RSET",
    "NOOP",
    "QUIT",
    "VRFY",
    "EXPN",
    "HELP",
    "AUTH",
    "STARTTLS",
    "BDAT",
    "ETRN",
    "XCLIENT",
    "TURN",
    "ehlo",
    "Mail",
    "",
    " ",
    ".",
]
_USER, _PASSWORD = USER.encode(), PASSWORD.encode()
AUTH_ARGS = [
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "plain",
    "PLAIN =",
    "PLAIN *",
    "PLAIN !!!notbase64",
    "PLAIN AAAA",
    "PLAIN " + b64(b"no-nul-separators"),
    "PLAIN " + b64(b"\0" + _USER + b"\0wrong"),
    "PLAIN " + b64(b"\0" + _USER + b"\0" + _PASSWORD + b"\0extra"),
    "LOGIN " + b64(_USER),
    "LOGIN " + b64(b"\xff\xfe"),
    "LOGIN ====",
    "PLAIN " + "A" * 5000,
]
LOGIN = ("AUTH PLAIN " + b64(b"\0" + _USER + b"\0" + _PASSWORD)).encode()
_JUNK_BYTES = st.binary(min_size=0, max_size=40)
_TEXT = st.text(min_size=0, max_size=40)


@st.composite
def command_line(draw: st.DrawFn) -> bytes:
    # Mostly commands the server knows: five unknown ones end a session (aiosmtpd's bogus-command limit).
    verb = draw(
        st.sampled_from(VERBS)
        if draw(st.integers(0, 9))
        else st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=12)
    )
    argument = draw(
        st.one_of(
            st.just(""),
            st.sampled_from(["FROM:<" + a + ">" for a in ADDRESSES] + ["TO:<" + a + ">" for a in ADDRESSES]),
            st.sampled_from(AUTH_ARGS),
            st.sampled_from(["client.test", "[127.0.0.1]", "", "x" * 1000, "FROM:", "TO:", "FROM: <>", "TO:<>"]),
            _TEXT,
        )
    )
    line = (verb + (" " + argument if argument else "")).encode("utf-8", "surrogatepass")
    return draw(mutated(line))


@st.composite
def mutated(draw: st.DrawFn, line: bytes) -> bytes:
    """A line, sometimes damaged: bytes inserted (NUL, 8-bit, bare CR or LF), cut, made huge."""
    mutation = draw(st.sampled_from(["none", "none", "insert", "truncate", "huge", "bare-lf", "no-eol", "case"]))
    end = b"\r\n"
    if mutation == "insert" and line:
        at = draw(st.integers(0, len(line)))
        junk = draw(st.sampled_from([b"\x00", b"\xff", b"\r", b"\n", b"\x1b[2J", b"\xc3\xa9", b"\t"]) | _JUNK_BYTES)
        line = line[:at] + junk + line[at:]
    elif mutation == "truncate" and line:
        line = line[: draw(st.integers(0, len(line)))]
    elif mutation == "huge":
        line += b"x" * draw(st.sampled_from([1000, 5000, 70_000]))
    elif mutation == "bare-lf":
        end = b"\n"
    elif mutation == "no-eol":
        end = b""
    elif mutation == "case":
        line = line.swapcase()
    return line + end


def message_block(body: bytes) -> bytes:
    """What a client sends after 354: dot-stuffed, ended by <CRLF>.<CRLF> (and nothing else ends it)."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = re.sub(rb"(?m)^\.", b"..", body)
    return stuffed + b".\r\n"


SIMPLE_MESSAGE = f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: fuzz\r\n\r\nbody\r\n".encode()


TRANSACTION = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()


@st.composite
def session_script(draw: st.DrawFn) -> list[bytes]:
    """A burst of commands: usually a greeting first, sometimes a valid login, transaction and message
    among mutated commands and raw bytes, so every state of the session gets its share of junk."""
    greeting = draw(st.sampled_from([b"EHLO client.test\r\n", b"EHLO client.test\r\n", b"HELO client.test\r\n", b""]))
    items = draw(
        st.lists(
            st.one_of(
                command_line(),
                command_line(),
                command_line(),
                st.just(LOGIN + b"\r\n"),
                st.just(TRANSACTION),
                st.just(message_block(SIMPLE_MESSAGE)),
                st.binary(min_size=1, max_size=200),
            ),
            min_size=1,
            max_size=16,
        )
    )
    return [greeting, *items]


# -- invariants on what the upstream receives ------------------------------------------------------------------

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
BODY_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def sane_payload(body: dict[str, Any]) -> list[str]:
    problems = []
    header_fields = [body.get("asunto", ""), body.get("remitente_nombre", ""), body.get("reply-to", "")]
    contacts = body.get("contactos") or [body.get("contacto", {})]
    header_fields += [c.get(k, "") for c in contacts for k in ("nombre", "apellido")]
    header_fields += [c.get("cc_nombre", "") for c in body.get("copia", [])]
    for att in body.get("adjuntos", []):
        header_fields += [att["nombre"], att["tipo"], att.get("cid", "")]
        if not att["nombre"] or att["nombre"] in (".", "..") or re.search(r"[/\\]", att["nombre"]):
            problems.append(f"attachment name {att['nombre']!r}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*", att["tipo"]):
            problems.append(f"content type {att['tipo']!r}")
    problems += [f"control character in {value!r}" for value in header_fields if CONTROL.search(value)]
    if not body.get("html", "").strip():
        problems.append("empty html")
    if BODY_CONTROL.search(body.get("html", "")):
        problems.append("control character in html")
    return problems


# -- invariants on what the server says ------------------------------------------------------------------------

_REPLY = re.compile(rb"^([2-5]\d\d)([ -])(.*)\r\n\Z", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}(?: |\Z)")
# A Python exception's name, a traceback, or aiosmtpd's raw "Error:" prefix: internals a reply must not carry.
_INTERNALS = re.compile(r"Traceback|\bError:|\b[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:Error|Exception|Warning)\b")
NO_ENHANCED = ("220", "334", "354")
HOSTNAME = "gw.test"


def check_reply_lines(lines: list[bytes]) -> list[str]:
    """Every line a well-formed SMTP reply; problems found (empty when none)."""
    problems: list[str] = []
    closed = False
    for raw in lines:
        if closed:
            problems.append(f"reply after the server said it closes: {raw!r}")
        m = _REPLY.match(raw)
        if m is None:
            problems.append(f"malformed reply line {raw!r}")
            continue
        code, sep, text_bytes = m.group(1).decode(), m.group(2).decode(), m.group(3)
        if re.search(rb"[\x00-\x1f\x7f]", text_bytes):
            problems.append(f"control character in reply {raw!r}")
        text = text_bytes.decode("utf-8", "replace")
        if _INTERNALS.search(text):
            problems.append(f"internals in reply {raw!r}")
        if code == "451" and text.startswith("4.3.0"):
            problems.append(f"internal error reply {raw!r}")
        if sep == "-" or code in NO_ENHANCED or (code == "250" and text in ("HELP", HOSTNAME)):
            continue
        enhanced = _ENHANCED.match(text)
        if enhanced is None or enhanced.group(1) != code[0]:
            problems.append(f"no matching enhanced status code in {raw!r}")
        if code in ("221", "421"):
            closed = True
    return problems


# -- MIME trees for the DATA fuzz -----------------------------------------------------------------------------

LEAF_TYPES = [
    "text/plain",
    "text/html",
    "text/enriched",
    "text/calendar",
    "image/png",
    "application/pdf",
    "application/octet-stream",
    "message/delivery-status",
    "text/plain>",
    "bogus",
    "image/",
]
CHARSETS = [
    None,
    "utf-8",
    "us-ascii",
    "iso-8859-1",
    "windows-1252",
    "koi8-r",
    "gb2312",
    "shift_jis",
    "utf-16",
    "iso-2022-jp",
    "x-unknown",
    "utf-7",
    '"utf-8"',
    "utf-8\x00",
    "unicode-1-1-utf-7",
]
ENCODINGS = [
    None,
    "7bit",
    "8bit",
    "binary",
    "base64",
    "quoted-printable",
    "base64 ",
    "Quoted-Printable;",
    "x-uuencode",
    "base9000",
]
DISPOSITIONS = [
    None,
    "inline",
    "attachment",
    "attachment; filename=report.pdf",
    "inline; filename=/tmp/x.txt",
    "attachment; filename*=utf-8''%E2%80%AEfdp.exe",
    'attachment; filename=".."',
    "attachment; filename*0*=utf-8''a%C3; filename*1*=%A9.txt",
    "attachment; filename*=a; filename*0=b",
]
CONTENT = st.one_of(
    st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=120),
    st.sampled_from(
        [
            b"\x00\x01\x02 nul",
            "caf\xe9 \x80 \x93q\x94 \x85".encode("latin-1"),
            b"<p>hi</p>",
            b"PGh0bWw+Cg==",
            b"=E2=82=AC=\r\n",
            b"begin 644 x\r\n#86)C\r\n`\r\nend",
            b".\r\n..\r\n",
        ]
    ),
)


def _serialize_leaf(
    ctype: str, charset: str | None, cte: str | None, disposition: str | None, content: bytes, encode: bool
) -> bytes:
    head = f"Content-Type: {ctype}" + (f"; charset={charset}" if charset else "")
    lines = [head]
    if cte:
        lines.append(f"Content-Transfer-Encoding: {cte}")
        if encode and cte.strip(" ;").lower() == "base64":
            content = base64.encodebytes(content)
    if disposition:
        lines.append(f"Content-Disposition: {disposition}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + content


@st.composite
def mime_leaf(draw: st.DrawFn) -> bytes:
    return _serialize_leaf(
        draw(st.sampled_from(LEAF_TYPES)),
        draw(st.sampled_from(CHARSETS)),
        draw(st.sampled_from(ENCODINGS)),
        draw(st.sampled_from(DISPOSITIONS)),
        draw(CONTENT),
        draw(st.booleans()),
    )


def _multipart(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        subtype = draw(st.sampled_from(["mixed", "alternative", "related", "signed", "report", "digest"]))
        boundary = draw(st.sampled_from(["b1", "b2", "", "a b", "=_x", "-" * 80, "b1 "]))
        parts = draw(st.lists(children, max_size=4))
        closing = draw(st.sampled_from([f"--{boundary}--\r\n", "", f"--{boundary}\r\n"]))
        body = b"".join(f"--{boundary}\r\n".encode() + part + b"\r\n" for part in parts) + closing.encode()
        start = draw(st.sampled_from(["", '; start="<x@y>"', "; type=text/html"]))
        return f'Content-Type: multipart/{subtype}; boundary="{boundary}"{start}\r\n\r\npreamble\r\n'.encode() + body

    return build()


def _attached(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return children.map(lambda inner: b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n" + inner)


MIME_TREE = st.recursive(mime_leaf(), lambda kids: _multipart(kids) | _attached(kids), max_leaves=8)
