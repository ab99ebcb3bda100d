"""Pure: part bodies as mail clients decode them: lenient base64, attached messages as they arrived."""

from __future__ import annotations

import binascii
import quopri
import re
from dataclasses import dataclass
from email.message import Message

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_ALPHABET = bytes(sorted(set(range(256)) - set(_ALPHABET)))
_WHITESPACE = b" \t\r\n\v\f"
_ALPHABET_AND_WHITESPACE = _ALPHABET + _WHITESPACE
# Control bytes no text contains (TAB, LF, VT, FF, CR and ESC, which ISO-2022 uses, excepted).
_BINARY = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f]")


@dataclass(frozen=True, slots=True)
class Base64:
    """A lenient decode: the bytes, and how many characters after the encoded data were not decoded (text
    appended after the body, as a list footer or a scanner's notice: ignored)."""

    data: bytes
    ignored: int = 0


def base64_lenient(data: bytes, text: bool = False) -> Base64 | None:
    """Decode base64 as mail clients do; None when `data` is not base64 at all.

    Characters outside the alphabet are skipped and missing padding is tolerated. Lines that are plainly
    not base64 (they contain spaces or much punctuation) are skipped before the data (header lines that
    spilled into the body) and end it after (an epilogue that lost its boundary, a footer a list or a
    scanner appended). The decode ends at the first padding unless what follows is itself base64
    (encodings concatenated, as mailers that encode line by line write): each encoding a whole number of
    quanta and, for a text part, decoding to text. What ends the data is not decoded (`ignored`).
    `text`: the part is text, so a repaired result that is binary means the part was never base64 (None)
    rather than something to show.
    """
    if not data.translate(None, _ALPHABET_AND_WHITESPACE) and not _has_words(data):
        # The common case, nothing but base64 and line breaks: one pass over the data when the padding,
        # if any, is at the end and complete (binascii skips the line breaks itself).
        pad = data.find(b"=")
        if pad < 0 or not data[pad:].translate(None, b"=" + _WHITESPACE):
            try:
                return Base64(binascii.a2b_base64(data))
            except binascii.Error:
                pass  # missing padding
        return _decode_runs(data.translate(None, _WHITESPACE), text)
    chunks: list[bytes] = []
    repaired = False
    lines = data.splitlines()
    after = len(lines)
    for number, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        kept = line.translate(None, _NOT_ALPHABET)
        if len(kept) == len(line) or (
            (len(line) - len(kept)) * 8 <= len(line) and line.translate(None, b" \t") == line
        ):
            chunks.append(kept)
            repaired = repaired or len(kept) != len(line)
        elif chunks:
            after = number
            break
        else:
            repaired = True
    if not chunks:
        return None
    decoded = _decode_runs(b"".join(chunks), text)
    if text and repaired and _BINARY.search(decoded.data) is not None:
        return None
    ignored = sum(len(line.translate(None, _WHITESPACE)) for line in lines[after:])
    return Base64(decoded.data, decoded.ignored + ignored) if ignored else decoded


# A space or tab between two characters of a line: words, which base64 never has.
_WORDS = re.compile(rb"\S[ \t]+\S")


def _has_words(data: bytes) -> bool:
    return (b" " in data or b"\t" in data) and _WORDS.search(data) is not None


def _decode_runs(compact: bytes, text: bool) -> Base64:
    """`compact`: base64 characters and padding only. The first encoding, and the ones after it when they
    are well formed (and decode to text, for a text part); otherwise they are ignored."""
    stripped = compact.rstrip(b"=")
    if b"=" not in stripped:
        return Base64(_decode_run(stripped))
    runs = _RUNS.findall(compact)
    first = _decode_run(runs[0][0])
    later = runs[1:]
    if all((len(chars) + len(pad)) % 4 == 0 and len(pad) <= 2 for chars, pad in later):
        tail = b"".join(_decode_run(chars) for chars, _ in later)
        if not (text and _BINARY.search(tail)):
            return Base64(first + tail)
    return Base64(first, sum(len(chars) + len(pad) for chars, pad in later))


_RUNS = re.compile(rb"([^=]+)(=*)")


def _decode_run(run: bytes) -> bytes:
    extra = len(run) % 4
    if extra == 1:
        run = run[:-1]  # six bits do not make a byte: nothing is lost
    elif extra:
        run += b"=" * (4 - extra)
    return binascii.a2b_base64(run)


_LINE_END = re.compile(rb"\r?\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
# The end of an attached message's header block: an empty line, a CR CR LF counting as one line end (a
# bare CR is no line end here: CR CR LF would read as a line end and an empty line).
_HEADER_END = re.compile(rb"(?:\r\r\n|\r\n|\n)(?:\r\r\n|\r\n|\n)")


@dataclass(frozen=True, slots=True)
class Attached:
    """An attached message (the body of a message/* part) as it arrived, with CRLF line ends; `cr_cr_lf`:
    its header block ended its lines with CR CR LF (written twice through a text-mode conversion), read and
    passed on as one line end each."""

    data: bytes
    cr_cr_lf: bool = False
    ignored: int = 0  # base64-encoded: characters after the padding that were not part of it


def message_bytes(part: Message) -> Attached:
    """The body of a message/* part (an attached message, a delivery report) as it arrived: the parser
    keeps it unparsed (gateway/mime/parser.py), so nothing is re-serialised. Decoded if the sender gave it
    a transfer encoding; line ends made CRLF, once, whatever the client used (a bare CR stays)."""
    raw = part._payload  # type: ignore[attr-defined]
    data = raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
    ignored = 0
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    # RFC 2046 §5.2.1 allows only 7bit/8bit/binary here, but clients decode what senders encode anyway.
    if cte == "base64":
        decoded = base64_lenient(data)
        if decoded is not None:
            data, ignored = decoded.data, decoded.ignored
    elif cte == "quoted-printable":
        data = quopri.decodestring(data)
    head, cr_cr_lf = header_block(data)
    if cr_cr_lf:
        data = head.replace(b"\r\r\n", b"\r\n") + data[len(head) :]
    return Attached(_LINE_END.sub(b"\r\n", data) if _BARE_LF.search(data) else data, cr_cr_lf, ignored)


def header_block(message: bytes) -> tuple[bytes, bool]:
    """An attached message's header block (up to and including the empty line that ends it; all of it
    when none does), and whether its lines end in CR CR LF."""
    found = _HEADER_END.search(message)
    head = message if found is None else message[: found.end()]
    return head, b"\r\r\n" in head
