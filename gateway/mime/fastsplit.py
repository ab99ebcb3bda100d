"""Pure: the parse tree of a plainly well-formed message cut at its header ends and boundaries, or None."""

from __future__ import annotations

import re
from email.errors import MessageError
from email.message import Message as EmailMessage
from email.policy import Compat32

from gateway.mime import headers

# The stdlib's feed parser (gateway/mime/parser.py) reads a message a line at a time and matches every line
# against the boundary of every enclosing multipart; for ordinary mail that is most of the time parse()
# takes. This builds the same tree (the same email.message.Message objects, headers, payloads, preambles
# and epilogues) with searches over the whole text. It declines (None) whatever it is not sure to read as
# the feed parser does: bare CRs, a header block that does not end in an empty line or holds a line the
# parser would take for a Unix From line or a nameless header, multipart/digest, a multipart without a
# boundary or without its first delimiter, delimiter lines that follow each other, and anything past the
# caps below. tests/test_mime_fastsplit.py compares both on the corpus and on generated messages.
#
# Caps far below the parser's own limits (gateway/mime/parser.py: MAX_PARTS, MAX_DEPTH, MAX_HEADER_LINES,
# MAX_NESTING_WORK): a message near them is left to the bounded parser, which refuses it with its reply.
MAX_SIZE = 1024 * 1024  # bytes; with MAX_DEPTH levels, nesting work stays under the parser's limit
MAX_DEPTH = 8  # multipart levels, the message itself being the first
MAX_PARTS = 256
MAX_HEADER_LINES = 4_096
# Boundaries found where they do not start a delimiter line (within a line, or followed by more than a
# close, blanks and a line end): each costs a step in Python, where the parser's line by line matching
# costs nothing more. Past this many the parser reads the message.
MAX_MISSES = 1_000

# A header field: a line the feed parser's headerRE takes for a header line (a name, a colon) and the
# continuation lines after it (those beginning with a space or a tab), each with its line end.
_FIELD = re.compile(r"([\041-\071\073-\176]+):([^\n]*(?:\n[ \t][^\n]*)*)\n")
_BARE_CR = re.compile("\r(?!\n)")
# What follows "--boundary" on a delimiter line, as the feed parser's boundaryre (no bare CR gets here).
_TAIL = re.compile(r"(?P<end>--)?[ \t]*(?:\r\n|\n|\Z)")


class _Decline(Exception):
    """The message is not one this module is sure to read as the feed parser does."""


def tree(raw: bytes | bytearray, policy: Compat32) -> EmailMessage | None:
    """The feed parser's tree for `raw` (parsed with `policy`), or None where this module declines."""
    if len(raw) > MAX_SIZE:
        return None
    # As BytesFeedParser: 8-bit bytes become surrogates.
    text = raw.decode("ascii", "surrogateescape")
    if _BARE_CR.search(text) is not None:
        return None  # a bare CR is a line end to the parser; not worth following here
    split = _Split(text, policy)
    try:
        return split.part(0, len(text), 1, None)
    except _Decline:
        return None


class _Split:
    def __init__(self, text: str, policy: Compat32) -> None:
        self.text = text
        self.policy = policy
        self.parts = 0
        self.header_lines = 0
        self.misses = 0

    def part(self, start: int, end: int, depth: int, parent: EmailMessage | None) -> EmailMessage:
        """The part whose text is text[start:end] (its line end before the next delimiter included)."""
        self.parts += 1
        if self.parts > MAX_PARTS or depth > MAX_DEPTH:
            raise _Decline
        msg = EmailMessage(policy=self.policy)
        if parent is not None:
            parent.attach(msg)
        body = self.headers(msg, start, end)
        ctype = msg.get_content_type()
        if ctype.startswith("multipart/"):  # as get_content_maintype()
            if ctype == "multipart/digest":
                raise _Decline  # its parts' default type is message/rfc822
            self.multipart(msg, body, end, depth)
        else:
            # message/* too: the parser reads an attached message's text as its payload, unparsed.
            msg.set_payload(self.text[body:end])
        return msg

    def headers(self, msg: EmailMessage, start: int, end: int) -> int:
        """Sets the header fields from `start` on; returns where the body starts (after the empty line)."""
        text = self.text
        at = start
        fields = msg._headers  # type: ignore[attr-defined]
        while (field := _FIELD.match(text, at, end)) is not None:
            # As Compat32.header_source_parse: the value's lines as they are, but the first one's leading
            # blanks and the last one's line end (set_raw appends, as the parser's own call does).
            fields.append((field.group(1), field.group(2).lstrip(" \t").rstrip("\r\n")))
            at = field.end()
        # Anything but an empty line here (a continuation line first, a Unix From line, a line without a
        # name or a colon, the end of the part) the parser reads otherwise.
        if text.startswith("\n", at, end):
            body = at + 1
        elif text.startswith("\r\n", at, end):
            body = at + 2
        else:
            raise _Decline
        self.header_lines += text.count("\n", start, at)
        if self.header_lines > MAX_HEADER_LINES:
            raise _Decline
        return body

    def multipart(self, msg: EmailMessage, body: int, end: int, depth: int) -> None:
        try:
            boundary = headers.boundary(msg)
        except (MessageError, TypeError):
            raise _Decline from None  # the parser raises, or records what it makes of it
        if boundary is None:
            raise _Decline
        marker = "--" + boundary
        text = self.text
        found = self.delimiter(marker, body, end)
        if found is None or found[2]:
            raise _Decline  # no first delimiter: the parser keeps the text as the payload
        if found[0] > body:
            # RFC 2046: the line end before a delimiter belongs to it.
            msg.preamble = _without_eol(text[body : found[0]])
        while True:
            start = found[1]
            if start >= end:
                raise _Decline  # a delimiter that ends the message
            found = self.delimiter(marker, start, end)
            if found is not None and found[0] == start:
                raise _Decline  # the parser skips delimiter lines that follow each other
            child = self.part(start, end if found is None else found[0], depth + 1, msg)
            payload = child._payload  # type: ignore[attr-defined]
            if isinstance(payload, list):  # a multipart: this module declines one without parts
                if child.epilogue == "":
                    child.epilogue = None
                elif child.epilogue is not None:
                    child.epilogue = _without_eol(child.epilogue)
            else:
                child.set_payload(_without_eol(payload))
            if found is None:
                return  # no close delimiter: the epilogue stays None, as the parser leaves it
            if found[2]:
                msg.epilogue = text[found[1] : end]
                return

    def delimiter(self, marker: str, start: int, end: int) -> tuple[int, int, bool] | None:
        """The first delimiter line in text[start:end] (`start` is a line start): where it starts, where it
        ends (its line end included), whether it is the close delimiter. (A regex anchored at line starts
        is tried at every character: str.find is many times faster.)"""
        text = self.text
        at = start
        while (found := text.find(marker, at, end)) != -1:
            if found == start or text[found - 1] == "\n":
                tail = _TAIL.match(text, found + len(marker), end)
                if tail is not None:
                    return found, tail.end(), tail.group("end") is not None
            self.misses += 1
            if self.misses > MAX_MISSES:
                raise _Decline
            at = found + 1
        return None


def _without_eol(text: str) -> str:
    """`text` without its last line end (the parser's NLCRE_eol; no bare CR gets here)."""
    if text.endswith("\n"):
        return text[:-2] if text.endswith("\r\n") else text[:-1]
    return text
