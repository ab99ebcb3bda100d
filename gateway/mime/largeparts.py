"""Pure: large base64 bodies lifted out of a raw message, so the feed parser never walks their lines."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import Message as EmailMessage
from email.parser import BytesParser
from email.policy import Compat32

from gateway.core.spill import SpillMap
from gateway.mime.headers import transfer_encoding

# Bodies of at least this many bytes of base64 (line breaks not counted) are lifted. Lifting costs more
# than it saves below about 10 KiB, and at 32 KiB it halves the parse time (docs/development/benchmarks.md,
# bench/parsebench.py); smaller messages and parts never take the new path (a part below it is skipped unread).
THRESHOLD = 32 * 1024
# The scan is meant for ordinary mail, and its own work must stay a small fraction of the parser's,
# whatever the message (a part below THRESHOLD is skipped unread, so each header block read stands for at
# least 32 KiB the parser would walk). Past these it stops, and the rest is parsed as it always was:
MAX_SCAN_DEPTH = 16  # multipart levels descended into
MAX_SCANNED_HEADERS = 2_000  # part header blocks read
MAX_MISSES = 10_000  # lines that looked like a delimiter and were not
MAX_HEADER_BLOCK = 256 * 1024  # a part whose header block is longer is not looked into
_HEADER_WINDOW = 4096  # most header blocks end within it
_SLACK = 16  # blank lines allowed around a lifted body (bytes of CR and LF)
# Bodies are read in chunks from 16 KiB (a small part costs its own size, not a chunk's) doubling up to
# 256 KiB (small enough to stay in the CPU cache between the copy and translate()).
_FIRST_CHUNK, _CHUNK = 16 * 1024, 256 * 1024

_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_CRLF = b"\r\n"
# translate() tables: base64 characters stay (and CR, LF in the second), every other byte becomes NUL, the
# padding "=" too: it may only end the body, and is checked there.
_MARKED = bytes(c if c in _BASE64 else 0 for c in range(256))
_MARKED_LINES = bytes(c if c in _BASE64 + _CRLF else 0 for c in range(256))
# What follows "--boundary" on a delimiter line, as the stdlib's boundaryre: optional "--" (the close
# delimiter), spaces or tabs, then the line break or the end of the message (RFC 2046 §5.1.1).
_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\r|\n|\Z)")
# Stands in for a lifted body in the skeleton. Never a header line (no colon), never a delimiter (no
# leading "--"), no line break: the parser treats it exactly as it treats a line of base64.
PLACEHOLDER = "\x00smtp-gateway-lifted-"
_PLACEHOLDER_BYTES = PLACEHOLDER.encode("ascii")


@dataclass(frozen=True, slots=True)
class Run:
    """A lifted body in the raw message: base64 characters and line breaks from `start` to `end`, `length`
    characters once the line breaks are gone."""

    start: int
    end: int
    length: int


@dataclass(frozen=True, slots=True)
class Lifted:
    """A message with its large base64 bodies replaced by one-line placeholders."""

    skeleton: bytes
    bodies: Mapping[str, Run]  # placeholder -> where that body is
    line_ends: int  # CR and LF bytes of the whole message, lifted bodies included (the parser limits count them)


def lift(raw: bytes | bytearray | SpillMap, policy: Compat32, threshold: int = THRESHOLD) -> Lifted | None:
    """The message with every lifted body replaced; None when there is nothing to lift.

    A body is lifted when it is the body of a part that is neither text, multipart nor message (an attached
    message travels as it arrived), declared base64, at least `threshold` bytes of base64 text, and made of
    base64 characters and line breaks only, padding at its end only, a multiple of 4 characters long: the
    form whose strict decoding is what transfer.base64_lenient decodes. Parts are found with fast searches
    for the delimiter lines of every enclosing multipart; whatever the scan does not understand is left in
    the skeleton. The scan may still be wrong about a structure the parser reads differently: claim()
    checks against the parser's own tree and the caller parses the message whole if it fails.
    """
    if len(raw) < threshold:
        return None
    with memoryview(raw) as view:
        scan = _Scan(raw, view, policy, threshold)
        try:
            scan.part(0, (), 0)
        except _Enough:
            pass  # what was lifted so far is lifted
        except _GiveUp:
            return None
        if not scan.runs:
            return None
        pieces: list[memoryview | bytes] = []
        bodies: dict[str, Run] = {}
        at = line_ends = 0
        for index, run in enumerate(scan.runs):
            placeholder = f"{PLACEHOLDER}{index}\x00"
            pieces += (view[at : run.start], placeholder.encode("ascii"))
            bodies[placeholder] = run
            line_ends += run.end - run.start - run.length  # a run holds base64 characters and line breaks only
            at = run.end
        pieces.append(view[at:])
        skeleton = b"".join(pieces)  # the one copy of what stays (memoryview slices are not copies)
        del pieces
    if skeleton.count(_PLACEHOLDER_BYTES) != len(bodies):
        return None  # the message itself contains the placeholder's text
    return Lifted(skeleton, bodies, line_ends + skeleton.count(b"\n") + skeleton.count(b"\r"))


def claim(tree: EmailMessage, lifted: Lifted) -> dict[int, Run] | None:
    """The lifted bodies by id() of the part that carries each, in the skeleton's parse tree; None unless
    every placeholder is, with nothing but line breaks around it, the whole payload of a non-text,
    non-message, base64 leaf reached from the root through multiparts only (the parts bodies.py turns into
    attachments).

    Then parsing the message itself gives the same tree with the bodies in their places, and the same
    refusals: the parser reads the skeleton's lines before a placeholder exactly as the message's; the
    placeholder is read by the loop that collects such a leaf's payload, which compares each line only with
    the delimiters of the enclosing multiparts, all beginning with "--" (a message/delivery-status
    ancestor, whose blank lines end a block, is excluded by the path); no line of a lifted body can match
    (none begins with "-": base64 characters and line breaks only), so in the message the same loop collects
    the body's lines instead, and the lines after it are read in the same state again. The counts the parser
    limits (parts, header lines, depth) are those of the same tree; the line count is the message's
    (Lifted.line_ends).
    """
    carried: dict[int, Run] = {}
    parts = [tree]
    while parts:
        part = parts.pop()
        payload = _payload(part)
        if part.get_content_maintype() == "multipart" and isinstance(payload, list):
            parts += (child for child in payload if isinstance(child, EmailMessage))
            continue
        if not isinstance(payload, str) or (at := payload.find(PLACEHOLDER)) < 0:
            continue
        end = payload.find("\x00", at + len(PLACEHOLDER)) + 1
        body = lifted.bodies.get(payload[at:end])
        if (
            body is None
            or payload[:at].strip("\r\n")
            or payload[end:].strip("\r\n")
            or part.get_content_maintype() in ("text", "multipart", "message")
            or transfer_encoding(part) != "base64"
        ):
            return None
        carried[id(part)] = body
    return carried if len(carried) == len(lifted.bodies) else None


class _GiveUp(Exception):
    """A header block the stdlib cannot read: the message is parsed whole (and refused there)."""


class _Enough(Exception):
    """The scan has done as much work as it may."""


class _Scan:
    """Walks a raw message part by part as the stdlib's feed parser splits it, without reading lines.

    Positions are offsets into the raw message; a part ends where a delimiter line of any enclosing multipart
    begins (RFC 2046 §5.1.2: outer boundaries are recognised at every level, as the stdlib does)."""

    def __init__(self, raw: bytes | bytearray | SpillMap, view: memoryview, policy: Compat32, threshold: int) -> None:
        self.raw, self.view, self.end = raw, view, len(raw)
        self.parser = BytesParser(policy=policy)
        self.threshold = max(threshold, 1)
        self.runs: list[Run] = []  # in message order
        self.headers_left = MAX_SCANNED_HEADERS
        self.misses_left = MAX_MISSES
        # separator -> (searched from, first delimiter line at or after it, -1 if none): searches only move on
        self.found: dict[bytes, tuple[int, int]] = {}

    def part(self, pos: int, stack: tuple[bytes, ...], depth: int) -> int:
        """Scan the part whose header block starts at `pos`; return where the line that ends it begins (a
        delimiter line of a separator in `stack`) or the message's end."""
        small = self.ends_before(pos, stack, pos + self.threshold)
        if small is not None:
            return small  # nothing in it can be large enough: not even its headers are read
        head = self.headers(pos)
        if head is None:
            return self.next_delimiter(pos, stack)
        maintype, boundary, encoding, body = head
        if maintype == "multipart":
            if boundary is not None and depth < MAX_SCAN_DEPTH:
                return self.multipart(body, (*stack, b"--" + boundary), depth + 1)
        elif maintype not in ("text", "message") and encoding == "base64":
            return self.leaf(body, stack)
        return self.next_delimiter(body, stack)

    def headers(self, pos: int) -> tuple[str, bytes | None, str, int] | None:
        """What the part's headers say, as the parser reads them (main type, multipart boundary, transfer
        encoding), and where its body begins; None for a part that cannot hold a body to lift, or whose
        header block the parser would end elsewhere."""
        raw = self.raw
        if pos >= self.end or raw[pos] in _CRLF:
            return None  # no header block: text/plain
        for window in (_HEADER_WINDOW, MAX_HEADER_BLOCK):  # a CRLF message has no "\n\n" to find far ahead
            limit = min(self.end, pos + window)
            blank = [at for at in (raw.find(b"\n\r\n", pos, limit), raw.find(b"\n\n", pos, limit)) if at >= 0]
            if blank:
                break
        else:
            return None
        at = min(blank)
        body = at + (3 if raw[at + 1] == 13 else 2)
        block = bytes(self.view[pos:body])
        lowered = block.lower()
        if b"multipart" not in lowered and b"base64" not in lowered:
            return None
        self.headers_left -= 1
        if self.headers_left < 0:
            raise _Enough
        try:
            headers = self.parser.parsebytes(block, headersonly=True)
            maintype = headers.get_content_maintype()
            boundary = _boundary(headers) if maintype == "multipart" else None
            encoding = transfer_encoding(headers)
        except Exception as exc:
            # What the stdlib raises on a header block (RFC 2231 sections it cannot sort, ...) it raises
            # parsing the message whole too, and the message is refused there (mime._parse_tree).
            raise _GiveUp from exc
        if _payload(headers):
            return None  # a line the parser does not take for a header, or a misplaced "From "
        return maintype, boundary, encoding, body

    def multipart(self, pos: int, stack: tuple[bytes, ...], depth: int) -> int:
        separator, outer = stack[-1:], stack[:-1]
        at = self.next_delimiter(pos, stack)
        while True:
            if at >= self.end or self.delimiter(at, outer) is not None:
                return at  # the end, or an outer delimiter: it ends this multipart too
            found = self.delimiter(at, separator)
            assert found is not None
            close, pos = found
            if close:
                # The epilogue (or, before any part, the preamble the parser keeps as the payload) runs to the
                # next outer delimiter.
                return self.next_delimiter(pos, outer)
            while (again := self.delimiter(pos, separator)) is not None:
                self.miss()  # delimiter lines in a row make no part
                pos = again[1]
            at = self.part(pos, stack, depth)

    def leaf(self, body: int, stack: tuple[bytes, ...]) -> int:
        """Lift the body starting at `body` if it is clean base64 to its end; return where the part ends."""
        raw, end = self.raw, self.end
        start = body
        while start < end and raw[start] in _CRLF and start - body < _SLACK:
            start += 1
        if start >= end or raw[start] in _CRLF:
            return self.next_delimiter(body, stack)
        # One pass: each chunk loses its line breaks and shows the first byte that is not base64 as a NUL.
        # Only its length is kept: the text is made once the parser has accepted the lifted structure
        # (materialize), so a message parsed whole after all reads its own bytes.
        length = 0
        stop = at = start
        size = _FIRST_CHUNK
        while at < end:
            chunk = bytes(self.view[at : at + size])
            if isinstance(raw, SpillMap):
                raw.read_through(at, at + len(chunk))
            size = min(2 * size, _CHUNK)
            compact = chunk.translate(_MARKED, _CRLF)
            bad = compact.find(0)
            if bad < 0:
                length += len(compact)
                at += len(chunk)
                stop = end
                continue
            length += bad
            stop = at + chunk.translate(_MARKED_LINES).find(0)
            break
        if stop < end and raw[stop] == 61:  # "=": the padding, one or two, then only line breaks
            last = stop + (2 if raw.startswith(b"==", stop) else 1)
            length += last - stop
            stop = last
            while stop < end and raw[stop] in _CRLF and stop - last < _SLACK:
                stop += 1
        else:
            last = stop
            while last > start and raw[last - 1] in _CRLF and stop - last < _SLACK:
                last -= 1
        if stop < end and (last == stop or self.delimiter(stop, stack) is None):
            return self.next_delimiter(stop, stack)  # something else follows the base64 in this part
        if raw[last - 1] not in _CRLF and length >= self.threshold and length % 4 == 0:
            # Whole 4-character groups: with at most two "=" at the end, the strict decoding is the lenient one.
            self.runs.append(Run(start, last, length))
        return stop

    def next_delimiter(self, pos: int, stack: tuple[bytes, ...]) -> int:
        """Where the first delimiter line at or after `pos` (a line start) of a separator in `stack` begins,
        else the message's end."""
        first = self.end
        for separator in stack:
            at = self.next_line(pos, separator)
            if 0 <= at < first:
                first = at
        return first

    def ends_before(self, pos: int, stack: tuple[bytes, ...], limit: int) -> int | None:
        """Where the part starting at `pos` ends if that is before `limit` (searching no further), else None."""
        first = None
        for separator in stack:
            at = self.next_line(pos, separator, limit)
            if 0 <= at < limit and (first is None or at < first):
                first = at
        return first

    def next_line(self, pos: int, separator: bytes, limit: int | None = None) -> int:
        """Where the first delimiter line of `separator` at or after `pos` begins; -1 if there is none (before
        `limit`, if given)."""
        cached = self.found.get(separator)
        if cached is not None and cached[0] <= pos and (cached[1] < 0 or cached[1] >= pos):
            return cached[1]
        needle = b"\n" + separator
        search = max(pos - 1, 0)
        stop = self.end if limit is None else min(self.end, limit - 1 + len(needle))
        while True:
            at = self.raw.find(needle, search, stop)
            if at < 0 or _TAIL.match(self.raw, at + len(needle)) is not None:
                break
            self.miss()
            search = at + 1
        found = at + 1 if at >= 0 else -1
        if found >= 0 or limit is None:
            self.found[separator] = (pos, found)
        return found

    def delimiter(self, at: int, separators: tuple[bytes, ...]) -> tuple[bool, int] | None:
        """Whether the line at `at` is a delimiter line of one of `separators`: (close, where the next line
        begins)."""
        for separator in separators:
            if self.raw.startswith(separator, at):
                tail = _TAIL.match(self.raw, at + len(separator))
                if tail is not None:
                    return tail.group(1) is not None, tail.end()
        return None

    def miss(self) -> None:
        self.misses_left -= 1
        if self.misses_left < 0:
            raise _Enough


def _payload(part: EmailMessage) -> object:
    # As parsed: compat32's get_payload() decodes a text with 8-bit bytes by its charset, and may fail.
    return part._payload  # type: ignore[attr-defined]


def _boundary(headers: EmailMessage) -> bytes | None:
    boundary = headers.get_boundary()
    if boundary is None:
        return None
    try:
        # The parser compares it with lines decoded as ASCII with surrogate escapes.
        return boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return None  # an RFC 2231 boundary beyond Latin-1: no line can match it


def materialize(raw: bytes | bytearray | SpillMap, runs: Iterable[Run]) -> dict[Run, bytes | memoryview]:
    """Each lifted body's base64 text without line breaks. In a bytearray (the SMTP session's buffer) or a
    SpillMap (that buffer in a file) it is made in place, each body shrinking within its own bytes, and handed
    out as a view: the message is then held once, not once as it arrived and once more as the attachment's
    text. Call only once the lifted structure is accepted: the buffer is not the message any more."""
    texts: dict[Run, bytes | memoryview] = {}
    for run in runs:
        if isinstance(raw, bytearray | SpillMap):
            write = run.start
            for read in range(run.start, run.end, _CHUNK):
                compact = bytes(raw[read : min(read + _CHUNK, run.end)]).translate(None, _CRLF)
                # Never past `read`: the text only shrinks.
                if isinstance(raw, SpillMap):
                    raw.put(write, compact)
                    raw.read_through(read, read + _CHUNK)
                else:
                    raw[write : write + len(compact)] = compact
                write += len(compact)
            texts[run] = memoryview(raw)[run.start : write]
        else:
            texts[run] = raw[run.start : run.end].translate(None, _CRLF)
    return texts
