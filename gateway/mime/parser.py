"""Pure MIME decoding: raw message bytes -> gateway.core.model.Message, every header and body decoded to Unicode."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Mapping
from email.errors import MessageError
from email.feedparser import BytesFeedParser, FeedParser
from email.message import Message as EmailMessage

from gateway.core import replies
from gateway.core.errors import ContentRejected
from gateway.core.model import Address, Message
from gateway.core.spill import SpillMap
from gateway.mime import bodies, fastsplit, largeparts, sanitize
from gateway.mime.addresses import AddressSyntaxError, parse_address_list
from gateway.mime.headers import RAW_HEADERS, header_text, undo_surrogates

OPTION_PREFIX = "x-gateway-"

# What one message may make the parser build (docs/security.md); past these it is refused with 554 5.6.0.
# The parse tree costs some 300 bytes per part and per header line whatever their size, and every line is
# matched against the boundary of every enclosing multipart: unbounded, a megabyte of empty parts, or of
# empty lines nested deep, takes seconds and tens of megabytes (docs/development/benchmarks.md).
MAX_DEPTH = 128  # nested multipart/message levels; the corpus' deepest test message has 106
MAX_NESTING_WORK = 32_000_000  # nesting depth x line ends (CR and LF): bounds the boundary matching
MAX_PARTS = 5_000  # MIME parts, attached messages' parts included
MAX_HEADER_LINES = 50_000  # header lines of all parts together
# As Postfix's header_size_limit: a longer header value is cut there before it is decoded.
MAX_HEADER_VALUE = 100 * 1024
# Decoded bodies + attachments may take DECODED_FACTOR x the raw size in memory (at least DECODED_FLOOR):
# plain text of "&" would otherwise become an HTML body five times its size, twenty times in memory with
# one emoji among it (552 5.3.4 past the limit). Ordinary mail takes one to three times its size.
DECODED_FACTOR = 12
DECODED_FLOOR = 8 * 1024 * 1024
_FEED_CHUNK = 64 * 1024
# Parsing costs about a microsecond per line, times the nesting depth for the boundary matching: a message
# with more line ends than this may take tens of milliseconds and is best parsed off the event loop.
EXPENSIVE_LINE_ENDS = 4_000


def expensive(raw: bytes | bytearray | SpillMap) -> bool:
    """Whether parsing `raw` may keep the CPU busy long enough to belong on a worker thread."""
    return raw.count(b"\n") + raw.count(b"\r") > EXPENSIVE_LINE_ENDS


_POLICY = RAW_HEADERS


def _too_complex(reason: str, text: str) -> ContentRejected:
    return ContentRejected(reason, reply=replies.INVALID_CONTENT.with_text(text))


class _BoundedParser(BytesFeedParser):
    """The stdlib's feed parser, refusing structures past the limits above while it builds them."""

    def __init__(self, lines: int) -> None:
        super().__init__(policy=_POLICY)
        self._lines = lines
        self._parts = 0
        self._header_lines = 0

    def _new_message(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise _too_complex(f"more than {MAX_PARTS} MIME parts", "Message has too many MIME parts")
        depth = len(self._msgstack) + 1  # type: ignore[attr-defined]
        if depth > MAX_DEPTH or depth * self._lines > MAX_NESTING_WORK:
            raise _too_complex(
                f"{depth} levels deep with {self._lines} lines", "Message structure is nested too deeply"
            )
        FeedParser._new_message(self)  # type: ignore[attr-defined]

    def _parse_headers(self, lines: list[str]) -> None:
        self._header_lines += len(lines)
        if self._header_lines > MAX_HEADER_LINES:
            raise _too_complex(f"more than {MAX_HEADER_LINES} header lines", "Message has too many header lines")
        FeedParser._parse_headers(self, lines)  # type: ignore[attr-defined]
        # An attached message (message/*) is passed on as it arrived, so it is not parsed: the feed parser
        # reads the rest of a part whose headers it has just read as raw text when `_headersonly` is set,
        # and sets it anew for every part (here) before it looks at it.
        self._headersonly = self._cur.get_content_maintype() == "message"  # type: ignore[attr-defined]


def parse(
    raw: bytes | bytearray | SpillMap,
    lift_above: int | None = largeparts.THRESHOLD,
    fast: bool = True,
    charge: Callable[[int], None] | None = None,
) -> Message:
    """Decode a submitted message. Raises ContentRejected when it cannot be turned into an API call.

    `charge`: told what escaping a text body for its HTML adds to the message in memory, before that HTML is
    built; it may raise to refuse the message (gateway/mime/bodies.py extract).

    Attachments of at least `lift_above` bytes of clean base64 carry that text as it arrived
    (Attachment.b64) and never pass through the parser (gateway/mime/largeparts.py); None: none do.
    `fast`: the tree of a plainly well-formed message is cut by gateway/mime/fastsplit.py; False: always by
    the feed parser, the reference the fast path is tested against (the result is the same)."""
    try:
        return _parse(raw, lift_above, fast, charge)
    except RecursionError:
        # The stdlib's address parser recurses per word: a To: of thousands of encoded words exhausts it.
        raise _too_complex("recursion limit reached", "Message structure is too complex") from None


def _tree(
    raw: bytes | bytearray | SpillMap, lift_above: int | None, fast: bool
) -> tuple[EmailMessage, Mapping[int, bytes | memoryview]]:
    """The parse tree, and the lifted bodies by id() of the leaves they belong to."""
    if lift_above is not None and (lifted := largeparts.lift(raw, _POLICY, lift_above)) is not None:
        found = _lifted_tree(lifted, fast)
        del lifted  # without a tree, the skeleton goes before the message is parsed whole
        if found is not None:
            tree, runs = found
            texts = largeparts.materialize(raw, runs.values())
            return tree, {part: texts[run] for part, run in runs.items()}
    return _parse_tree(raw, fast=fast), {}


def _lifted_tree(lifted: largeparts.Lifted, fast: bool) -> tuple[EmailMessage, Mapping[int, largeparts.Run]] | None:
    try:
        # The limits count the lines of the whole message, as without lifting.
        tree = _parse_tree(lifted.skeleton, lifted.line_ends, fast)
    except ContentRejected:
        return None  # decided on the message itself, exactly as without lifting
    carried = largeparts.claim(tree, lifted)
    return None if carried is None else (tree, carried)


def _parse_tree(raw: bytes | bytearray | SpillMap, line_ends: int | None = None, fast: bool = True) -> EmailMessage:
    # The same tree, found faster where the message is plainly well-formed and far enough from the limits
    # that the bounded parser would not refuse it: fastsplit takes at most MAX_SIZE bytes (so as many line
    # ends) MAX_DEPTH levels deep, within MAX_NESTING_WORK (tests/test_mime_fastsplit.py); `line_ends`, those
    # of a whole message of which `raw` is the skeleton, may be more. A spilled message (a mapping of its
    # file) is past the size the fast path takes.
    if (
        fast
        and not isinstance(raw, SpillMap)
        and (line_ends is None or line_ends * fastsplit.MAX_DEPTH <= MAX_NESTING_WORK)
        and (tree := fastsplit.tree(raw, _POLICY)) is not None
    ):
        return tree
    # The parser splits lines at CRLF, LF and a bare CR: counting both bytes overcounts CRLF lines twice,
    # which only makes the nesting limit stricter for them.
    lines = raw.count(b"\n") + raw.count(b"\r") if line_ends is None else line_ends
    parser = _BoundedParser(lines)
    view = memoryview(raw)
    try:
        if len(raw) <= _FEED_CHUNK and not isinstance(raw, SpillMap):
            parser.feed(raw)  # a bytearray decodes like bytes (a mapping does not: it is fed in copies)
        else:
            for start in range(0, len(view), _FEED_CHUNK):
                parser.feed(bytes(view[start : start + _FEED_CHUNK]))
        return parser.close()
    except (MessageError, TypeError) as exc:
        # The stdlib parser is lenient by design (defects are recorded, not raised). What it still raises on
        # a message it cannot read, and only that, means "unreadable": the email package's own MessageError
        # family (HeaderParseError, BoundaryError, MultipartConversionError, CharsetError); the TypeError of
        # email.utils.decode_params on RFC 2231 sections mixed with an unnumbered one (`boundary*=...;
        # boundary*0=...`, a CPython bug); and RecursionError (parse() above). Any other exception is a
        # bug, here or in the stdlib: it propagates, and the pipeline answers 451, logged and counted.
        # The exception's name goes to the reason (logged), never into the reply.
        if isinstance(exc, TypeError) and not _raised_in(exc, "email/utils.py", "decode_params"):
            raise
        raise ContentRejected(
            f"parser failed: {type(exc).__name__}: {exc}",
            reply=replies.INVALID_CONTENT.with_text("Message could not be parsed"),
        ) from exc
    finally:
        view.release()  # the caller empties a bytearray once parsed; a live view would forbid that


def _raised_in(exc: BaseException, path: str, function: str) -> bool:
    """Whether `exc` was raised by `function` of the stdlib module at `path` (its innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.replace("\\", "/").endswith(path) and frames[-1].name == function


def _parse(
    raw: bytes | bytearray | SpillMap, lift_above: int | None, fast: bool, charge: Callable[[int], None] | None
) -> Message:
    msg, carried = _tree(raw, lift_above, fast)
    if not msg.keys() and not raw.strip():
        raise ContentRejected("Empty message")
    defects: list[str] = []
    # One pass over the headers (compat32's get() scans them all, lower-casing each, on every call).
    headers: dict[str, list[str]] = {}
    fields = [(name, str(value)) for name, value in msg.items()]
    for name, text in fields:
        if len(text) > MAX_HEADER_VALUE:
            defects.append(f"header_truncated: {sanitize.field(name)[:60]} ({len(text)} characters)")
            text = _cut(text)
        headers.setdefault(name.lower(), []).append(text)
    decoded = bodies.extract(msg, max(DECODED_FACTOR * len(raw), DECODED_FLOOR), carried, charge)
    options = {
        name[len(OPTION_PREFIX) :]: sanitize.field(header_text(values[0]))
        for name, values in headers.items()
        if name.startswith(OPTION_PREFIX)
    }
    message_id = sanitize.field(undo_surrogates(headers.get("message-id", [""])[0]))
    # Custom X- headers (not the X-Gateway-* options), names as written, values cleaned like every field,
    # for providers that forward them (dEngage xHeaders).
    x_headers = (
        tuple(
            (sanitize.field(name), sanitize.field(header_text(value)))
            for name, value in fields
            if name[:2].lower() == "x-" and not name.lower().startswith(OPTION_PREFIX)
        )
        if any(n.startswith("x-") and not n.startswith(OPTION_PREFIX) for n in headers)
        else ()
    )
    return Message(
        subject=sanitize.field(header_text(headers.get("subject", [""])[0])),
        from_=_first_address(headers, "from", defects),
        sender=_first_address(headers, "sender"),
        reply_to=_first_address(headers, "reply-to", defects),
        to=_addresses(headers, "to"),
        cc=_addresses(headers, "cc"),
        html=decoded.html,
        text=decoded.text,
        attachments=decoded.attachments,
        options=options,
        message_id=message_id or None,
        x_headers=x_headers,
        defects=(*defects, *decoded.defects),
    )


def _cut(value: str) -> str:
    """A header value cut to MAX_HEADER_VALUE at a space, so no encoded word is left half."""
    head = value[:MAX_HEADER_VALUE]
    space = max(head.rfind(" "), head.rfind("\t"))
    return head[:space] if space > MAX_HEADER_VALUE // 2 else head


# One mailbox with nothing the full address parser is needed for (no quotes, comments, groups, lists,
# routes): "Name <a@b.c>" or "a@b.c". The full parser (gateway/mime/addresses.py) costs far more per header.
_SIMPLE_MAILBOX = re.compile(
    r"\s*(?:(?P<name>[^<>\"(),;:\\\[\]@]*?)\s*<(?P<angle>[^<>\s\"(),;:\\\[\]@]+@[^<>\s\"(),;:\\\[\]@]+)>"
    r"|(?P<bare>[^<>\s\"(),;:\\\[\]@]+@[^<>\s\"(),;:\\\[\]@]+))\s*\Z"
)
_WS = re.compile(r"\s+")
# How a header is named in a reply (the dict of headers is keyed lower-case).
_HEADER_NAMES = {"from": "From", "sender": "Sender", "reply-to": "Reply-To", "to": "To", "cc": "Cc"}


def _mailboxes(values: list[str]) -> list[tuple[str, str]]:
    """Raises AddressSyntaxError."""
    if len(values) == 1 and (m := _SIMPLE_MAILBOX.match(values[0])) is not None:
        if m.group("bare"):
            return [("", m.group("bare"))]
        return [(_WS.sub(" ", m.group("name").strip()), m.group("angle"))]
    return parse_address_list(", ".join(values))


def _addresses(headers: dict[str, list[str]], name: str) -> tuple[Address, ...]:
    """The header's addresses; an element without an @ (From: root) is no address. A header that is not an
    address list is refused (550 5.1.3), whatever the login's force_from: the sender policy must see
    the address the message is sent as, not a guess."""
    values = headers.get(name)
    if not values:
        return ()
    try:
        mailboxes = _mailboxes(values)
    except AddressSyntaxError as exc:
        header = _HEADER_NAMES[name]
        raise ContentRejected(
            f"{header} header: {exc}",
            reply=replies.HEADER_SYNTAX.with_text(f"{header}: header is not a valid address list: {exc}"),
        ) from None
    result: list[Address] = []
    for display, addr in mailboxes:
        addr = undo_surrogates(addr).strip()
        if not addr or "@" not in addr:
            continue
        result.append(Address(email=addr, name=sanitize.field(header_text(display))))
    return tuple(result)


def _first_address(headers: dict[str, list[str]], name: str, defects: list[str] | None = None) -> Address | None:
    """The header's first address. `defects`: for a header whose upstream field takes one address (From,
    Reply-To: DMDS remitente/reply-to, dEngage from/replyTo), where it is said that the others are not sent."""
    found = _addresses(headers, name)
    if len(found) > 1 and defects is not None:
        defects.append(f"{SEVERAL_ADDRESSES}: {_HEADER_NAMES[name]} has {len(found)} addresses, only the first is sent")
    return found[0] if found else None


# The defect of a From or Reply-To with more than one address, and the field it is counted as in
# smtp_gateway_fields_not_sent_total (not_sent_fields()).
SEVERAL_ADDRESSES = "several_addresses"
_NOT_SENT_FIELDS = {"From": "from_addresses", "Reply-To": "reply_to_addresses"}


def not_sent_fields(defects: tuple[str, ...]) -> list[str]:
    """The fields_not_sent labels of a parsed message's defects: the headers whose other addresses are not sent."""
    prefix = SEVERAL_ADDRESSES + ": "
    return [
        _NOT_SENT_FIELDS[defect[len(prefix) :].partition(" ")[0]] for defect in defects if defect.startswith(prefix)
    ]
