"""Pure: from a parsed MIME tree, the body a mail client displays (one HTML document) and the attachments."""

from __future__ import annotations

import binascii
import hashlib
import html
import quopri
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from typing import Literal

from gateway.core import replies
from gateway.core.errors import ContentRejected
from gateway.core.model import Attachment
from gateway.mime import charsets, flowed, payload, sanitize
from gateway.mime.headers import (
    RAW_HEADERS,
    content_charset,
    content_fields,
    content_type,
    filename_param,
    get_param,
    header_text,
    transfer_encoding,
    undo_surrogates,
)

# The defect of a multipart whose parts could not be told apart (no usable boundary): its body is sent as text.
UNSPLIT_MULTIPART = "multipart_unsplit"


# The defect of a calendar invitation beside the body of a multipart/alternative: sent as an attachment.
CALENDAR_ATTACHED = "calendar_attached"
_METHOD = re.compile(r"[A-Za-z-]{1,40}")
# A sender's own calendar file: by type (Google: application/ics) or by name (Lotus Notes: text/plain c1.ics).
_CALENDAR_TYPES = frozenset({"text/calendar", "application/ics"})
_CALENDAR_NAMES = (".ics", ".vcs")


@dataclass(frozen=True, slots=True)
class Bodies:
    html: str
    text: str | None
    attachments: tuple[Attachment, ...]
    defects: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Piece:
    """One displayed unit, in display order: an HTML part, a text part, or an inline image (by index)."""

    kind: Literal["html", "text", "image"]
    content: str = ""
    image: int = -1
    plain: bool = False  # a text/plain part (not text/enriched, text/calendar, ...)
    unsplit: bool = False  # the text of a multipart the parser could not split
    preamble: bool = False  # ... which may be only its preamble (_preamble_only)


def extract(
    msg: EmailMessage,
    limit: int,
    carried: Mapping[int, bytes | memoryview] | None = None,
    charge: Callable[[int], None] | None = None,
) -> Bodies:
    """Bodies and attachments of `msg`. `limit`: most bytes of memory the decoded bodies and attachments
    may take (ContentRejected 552 5.3.4 past it, checked before an HTML body is built from text: escaping
    can make it five times longer, and one character beyond U+FFFF makes a Python string 4 bytes a
    character). `carried`: base64 text (no line breaks) by id() of the leaf it stands for, a body lifted
    out before parsing (gateway/mime/largeparts.py); such a part's attachment carries it as it is.
    `charge`: called, before HTML is built from text, with the bytes of memory escaping adds to that text
    (0 for text without "&", "<" or ">"), only when HTML is built from text (not for a text part beside
    which the client gave an HTML alternative); it raises to refuse the message (the caller's
    large-message budget, gateway/pipeline.py). Called again if a second HTML is built from text."""
    walk = _Walk(carried=carried or {})
    pieces = walk.beside_a_body(walk.part(msg))
    size = sum(a.size for a in walk.attachments) + sum(_memory(t) for t in walk.texts)
    htmls = [p for p in pieces if p.kind == "html"]
    body = ""
    if htmls:
        texts = [p.content for p in pieces if p.kind == "text"]
        _within(limit, size + sum(_memory(h.content) for h in htmls) + sum(_escaped_memory(t) for t in texts))
        if charge is not None and texts:
            charge(sum(_escaped_memory(t) - _memory(t) for t in texts))
        body = htmls[0].content if len(htmls) == 1 and not texts else _join(pieces, walk)
    text = "\n".join(t for t in walk.texts if t) if walk.texts else None
    if not body.strip():
        # No HTML part, or an empty one: the displayed text, else an empty document (DMDS refuses an empty html).
        shown = "\n".join(p.content for p in pieces if p.kind == "text" and p.content) if pieces else ""
        shown = shown or text or ""
        _within(limit, size + _escaped_memory(shown))
        if charge is not None and shown:
            charge(_escaped_memory(shown) - _memory(shown))
        body = text_to_html(shown)
    attachments, defects = walk.settled()
    return Bodies(html=body, text=text, attachments=attachments, defects=defects)


def _within(limit: int, size: int) -> None:
    if size > limit:
        raise ContentRejected(
            f"decoded message would take {size} bytes, over the limit of {limit}",
            reply=replies.MESSAGE_TOO_BIG.with_text("Message size exceeds fixed limit once decoded"),
        )


def _memory(text: str) -> int:
    """Bytes a str takes: CPython stores 1, 2 or 4 bytes a character, by its widest character (PEP 393)."""
    if text.isascii():
        return len(text)
    widest = max(text)
    return len(text) * (1 if widest <= "\xff" else 2 if widest <= "\uffff" else 4)


def _escaped_memory(text: str) -> int:
    # html.escape: & -> &amp; (+4), < and > -> &lt; &gt; (+3)
    grown = len(text) + 4 * text.count("&") + 3 * (text.count("<") + text.count(">"))
    return grown * (_memory(text) // len(text)) if text else 0


def text_to_html(text: str) -> str:
    """Plain text -> safe HTML that keeps the text's line breaks and spacing."""
    # One join: `head + escaped + tail` would hold the escaped text three times at once (head + escaped is
    # a copy of it, and + tail another), 15 times a text of "&" in size (docs/messages.md).
    return "".join((_TEXT_HEAD, html.escape(text.replace("\r\n", "\n"), quote=False), _TEXT_TAIL))


_TEXT_HEAD = (
    '<!DOCTYPE html><html><head><meta charset="utf-8"></head>'
    '<body><div style="white-space:pre-wrap;font-family:monospace">'
)
_TEXT_TAIL = "</div></body></html>"


@dataclass
class _Walk:
    attachments: list[Attachment] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    leaves: int = 0
    carried: Mapping[int, bytes | memoryview] = field(default_factory=dict)
    # The invitations attached from an alternative's calendar branch: (attachment index, defect index).
    invitations: list[tuple[int, int]] = field(default_factory=list)
    # The multiparts sent as text (unsplit) that may be only a preamble: (defect index, text index, the defect's
    # start).
    unsplits: list[tuple[int, int, str]] = field(default_factory=list)

    def beside_a_body(self, pieces: list[_Piece]) -> list[_Piece]:
        """`pieces` less the text of unsplit multiparts that are only a preamble when the message shows a body
        besides: a nested multipart whose parts were stripped (a filter) keeps only its preamble ("This is a
        multi-part message in MIME format."), which mail clients never show (RFC 2046 §5.1.1). Only such a
        text (a boundary parameter and no boundary line, a few lines at most: `_preamble_only`) is hidden; any
        other unsplit multipart's text is the sender's and is sent. Recorded either way, saying which."""
        if not self.unsplits or not any(not p.unsplit and (p.kind == "image" or p.content.strip()) for p in pieces):
            return pieces
        hidden = {text for _, text, _ in self.unsplits}
        for defect, _, start in self.unsplits:
            self.defects[defect] = f"{start}, its body (a preamble) not shown beside the message's body"
        self.texts = [t for i, t in enumerate(self.texts) if i not in hidden]
        self.unsplits = []
        return [p for p in pieces if not p.preamble]

    def settled(self) -> tuple[tuple[Attachment, ...], tuple[str, ...]]:
        """The attachments and defects, less the invitations attached from an alternative's calendar branch
        when the sender attached the calendar as a file too (Google Calendar, Exchange, Lotus Notes: the
        alternative for the client's Accept / Decline, the file for everyone else): the recipient gets it
        once, as the sender attached it. Decided at the end: the file may come before or after the
        alternative. The body is built by then, so no inline image's index moves under it."""
        if not self.invitations:
            return tuple(self.attachments), tuple(self.defects)
        ours = {index for index, _ in self.invitations}
        files = [a for i, a in enumerate(self.attachments) if i not in ours and _is_calendar(a)]
        # Only the same calendar (an event it names: its UID, or the same bytes): an unrelated calendar file
        # (holidays.ics beside a meeting invitation) leaves the invitation's only copy in place.
        same = {
            (attachment, defect)
            for attachment, defect in self.invitations
            if any(_same_calendar(self.attachments[attachment], f) for f in files)
        }
        if not same:
            return tuple(self.attachments), tuple(self.defects)
        dropped_files, dropped_defects = {a for a, _ in same}, {d for _, d in same}
        return (
            tuple(a for i, a in enumerate(self.attachments) if i not in dropped_files),
            tuple(d for i, d in enumerate(self.defects) if i not in dropped_defects),
        )

    def part(self, part: EmailMessage, resource: bool = False) -> list[_Piece]:
        # Each part's Content-* fields read once (compat32's get() scans every field on every call).
        fields = content_fields(part)
        ctype = content_type(part, fields)
        if part.is_multipart() and ctype.startswith("multipart/"):  # as get_content_maintype()
            children = [p for p in part.get_payload() if isinstance(p, EmailMessage)]
            if resource:
                return [piece for child in children for piece in self.part(child, resource=True)]
            subtype = ctype[len("multipart/") :]
            if subtype == "alternative":
                return self.alternative(children)
            if subtype == "related":
                return self.related(part, children)
            return [piece for child in children for piece in self.part(child)]
        return self.leaf(part, resource, fields, ctype)

    def alternative(self, children: list[EmailMessage]) -> list[_Piece]:
        """One branch is displayed, the last one a client can show (RFC 2046 §5.1.4: the richest is last):
        the last with HTML, else the last with text/plain, else the first with any text. The other branches'
        attachments are kept; their text stays in Message.text only."""
        branches: list[list[_Piece]] = []
        calendars: list[tuple[int, EmailMessage, int]] = []  # (branch, part, its number among the leaves)
        for child in children:
            branches.append(self.part(child))
            if not child.is_multipart() and content_type(child, content_fields(child)) == "text/calendar":
                calendars.append((len(branches) - 1, child, self.leaves))
        with_html = [b for b in branches if any(p.kind == "html" for p in b)]
        with_plain = [b for b in branches if any(p.plain for p in b)]
        if with_html or with_plain:
            shown = (with_html or with_plain)[-1]
        else:
            shown = next((b for b in branches if any(p.kind == "text" for p in b)), [])
        for index, child, number in calendars:
            if branches[index] is not shown and any(p.kind == "text" for p in branches[index]):
                self.invitation(child, number)
        return shown

    def invitation(self, part: EmailMessage, number: int) -> None:
        """A text/calendar branch of an alternative beside the body shown (an iMIP invitation, as Outlook,
        Google and booking systems send it: text, HTML, calendar): its client shows the HTML and offers the
        invitation (Accept / Decline) from the calendar branch. Neither API takes alternatives, so it goes as
        the attachment invite.ics; recorded, since the recipient's client may show it as a file rather than
        as an invitation. Its type is the bare text/calendar, as every attachment's (the APIs take a
        type/subtype): the method parameter is named in the defect, and the file says it itself (METHOD:,
        which RFC 5546 requires to match it). Dropped again at the end (settled) when the sender attached the
        calendar as a file too."""
        fields = content_fields(part)
        method = get_param(part, "method", fields=fields)
        method = method.strip().upper() if isinstance(method, str) and _METHOD.fullmatch(method.strip()) else None
        self.invitations.append((len(self.attachments), len(self.defects)))
        self.attachments.append(self.attachment(part, "text/calendar", "attachment", "invite.ics", fields))
        self.defects.append(
            f"{CALENDAR_ATTACHED}: part {number} (text/calendar{f'; method={method}' if method else ''}): an "
            "alternative to the body, sent as the attachment invite.ics"
        )

    def related(self, part: EmailMessage, children: list[EmailMessage]) -> list[_Piece]:
        """The root is displayed; the other parts are resources it refers to (by Content-ID or -Location),
        except parts nothing can refer to: Apple Mail's html / image / html pieces, displayed in order."""
        start = sanitize.content_id(undo_surrogates(str(get_param(part, "start") or "")))
        ids = [sanitize.content_id(undo_surrogates(str(c.get("Content-ID") or ""))) for c in children]
        root = ids.index(start) if start is not None and start in ids else 0
        pieces: list[_Piece] = []
        for index, child in enumerate(children):
            referable = ids[index] is not None or child.get("Content-Location") is not None
            is_image = child.get_content_maintype() == "image"
            pieces += self.part(child, resource=index != root and referable and not is_image)
        return pieces

    def leaf(self, part: EmailMessage, resource: bool, fields: dict[str, str], content_type: str) -> list[_Piece]:
        """`fields`: content_fields(part); `content_type`: part.get_content_type()."""
        self.leaves += 1
        ctype = sanitize.media_type(content_type)
        disposition = str(fields.get("content-disposition") or "").split(";", 1)[0].strip().lower()
        filename = _filename(part, fields)
        if not resource and disposition != "attachment":
            if ctype == "text/html" and (filename is None or disposition == "inline"):
                return [_Piece("html", self.text_payload(part, ctype, fields))]
            # A text/plain part shown inline is body text even when it carries a file name (as clients show
            # it); other text/* parts (enriched, calendar) only when unnamed, as before.
            if (ctype == "text/plain" and disposition in ("", "inline")) or (
                ctype.startswith("text/") and filename is None
            ):
                text = self.text_payload(part, ctype, fields)
                self.texts.append(text)
                return [_Piece("text", text, plain=ctype == "text/plain")]
        if ctype.startswith("multipart/"):
            return self.unsplit(part, ctype, fields)
        attachment = self.attachment(part, ctype, disposition, filename, fields)
        self.attachments.append(attachment)
        if attachment.inline and ctype.startswith("image/"):
            return [_Piece("image", image=len(self.attachments) - 1)]
        return []

    def unsplit(self, part: EmailMessage, ctype: str, fields: dict[str, str]) -> list[_Piece]:
        """A multipart the parser could not split: no boundary parameter, or none of its lines is the
        boundary (the parser then leaves its whole body as one text). A mail client shows that body as it
        arrived, as text; sent as body text here too, and recorded: dropped, the recipient would get an
        empty message and nobody would know (an empty multipart, only blank lines, has nothing to show)."""
        data = _raw_payload(part)
        if not data.strip():
            return []
        label = content_charset(part, fields)
        decoded = charsets.decode(data, label)
        del data
        text = sanitize.body(decoded.text.replace("\r\n", "\n"))
        why = _unsplit_why(part, fields, text)
        start = f"{UNSPLIT_MULTIPART}: part {self.leaves} ({ctype}): {why}"
        preamble = _preamble_only(why, text)
        if preamble:
            self.unsplits.append((len(self.defects), len(self.texts), start))
        self.defects.append(f"{start}, its body sent as text as it arrived")
        self.texts.append(text)
        return [_Piece("text", text, unsplit=True, preamble=preamble)]

    def text_payload(self, part: EmailMessage, ctype: str, fields: dict[str, str]) -> str:
        data = self.payload_bytes(part, ctype, fields)
        label = content_charset(part, fields)
        decoded = charsets.decode(data, label)
        del data  # each copy let go as soon as the next is made: a 40 MB text part is not held 4 times at once
        if decoded.replaced:
            self.defects.append(
                f"charset_errors: part {self.leaves} ({ctype}, charset {label or 'none'}, read as {decoded.codec}):"
                f" {decoded.replaced} characters replaced"
            )
        text = decoded.text
        del decoded
        text = text.replace("\r\n", "\n")
        if ctype == "text/plain" and _param_is(part, fields, "format", "flowed"):
            text = flowed.unflow(text, delsp=_param_is(part, fields, "delsp", "yes"))
        return sanitize.body(text)

    def payload_bytes(self, part: EmailMessage, ctype: str, fields: dict[str, str]) -> bytes:
        if ctype.startswith("message/"):
            attached = payload.message_bytes(part)
            if attached.cr_cr_lf:
                self.defects.append(
                    f"cr_cr_lf: part {self.leaves} ({ctype}): its header lines end in CR CR LF, read as one line end"
                )
            self._ignored(attached.ignored, ctype)
            return attached.data
        cte = transfer_encoding(part, fields)  # "Quoted Printable" too
        if cte in ("quoted-printable", "quoted printable"):
            return quopri.decodestring(_raw_payload(part))
        if cte == "base64":
            encoded = _raw_payload(part)
            decoded = payload.base64_lenient(encoded, text=ctype.startswith("text/"))
            if decoded is not None:
                self._ignored(decoded.ignored, ctype)
                return decoded.data
            # Not base64 at all (text, or a raw file, under a base64 header): what arrived is closest.
            self.defects.append(f"undecodable_base64: part {self.leaves} ({ctype}) sent as it arrived")
            return encoded
        data = part.get_payload(decode=True)
        return data if isinstance(data, bytes) else _raw_payload(part)

    def _ignored(self, characters: int, ctype: str) -> None:
        if characters:
            self.defects.append(
                f"base64_trailing_text: part {self.leaves} ({ctype}): {characters} characters after the "
                "base64 data ignored"
            )

    def attachment(
        self, part: EmailMessage, ctype: str, disposition: str, filename: str | None, fields: dict[str, str]
    ) -> Attachment:
        raw_cid = fields.get("content-id")
        content_id = sanitize.content_id(undo_surrogates(str(raw_cid))) if raw_cid is not None else None
        carried = self.carried.get(id(part))
        return Attachment(
            filename=filename or _default_filename(part, ctype),
            content_type=ctype,
            data=self.payload_bytes(part, ctype, fields) if carried is None else b"",
            content_id=content_id,
            inline=disposition == "inline" or (content_id is not None and disposition != "attachment"),
            b64=carried,
        )


def _unsplit_why(part: EmailMessage, fields: dict[str, str], text: str) -> str:
    """Why the parser could not split a multipart. RFC 2046 §5.1.1 lets a boundary line carry text after the
    boundary (mime4j's ending-boundaries.msg); Python's parser reads only a boundary followed by blanks."""
    boundary = get_param(part, "boundary", fields=fields)
    if boundary is None:
        return "no boundary parameter"
    delimiter = f"--{boundary if isinstance(boundary, str) else ''}"
    if any(line.startswith(delimiter) for line in text.split("\n")):
        return "text after the boundary on its lines (not read)"
    return "no boundary line"


# A preamble is a line or two ("This is a multi-part message in MIME format."); more is the sender's text.
_PREAMBLE_MAX = 300


def _preamble_only(why: str, text: str) -> bool:
    """Whether an unsplit multipart's text can be only its preamble: a boundary parameter none of whose lines
    is there (its parts stripped), and a short text. Without a boundary parameter there is no preamble, and
    boundary lines carrying text after the boundary are followed by real parts."""
    return why == "no boundary line" and len(text.strip()) <= _PREAMBLE_MAX


def _is_calendar(attachment: Attachment) -> bool:
    return attachment.content_type in _CALENDAR_TYPES or attachment.filename.lower().endswith(_CALENDAR_NAMES)


_UID = re.compile(rb"^UID[;:][^\r\n]*", re.MULTILINE | re.IGNORECASE)


def _same_calendar(invitation: Attachment, other: Attachment) -> bool:
    """Whether a calendar file is the invitation's own calendar: the same bytes, or an event UID in common
    (RFC 5545's UID names the event whatever else the copies differ in: folding, METHOD, a client's fields)."""
    ours, theirs = bytes(invitation.data), bytes(other.data)
    if ours == theirs:
        return True
    uids = {m.group().split(b":", 1)[-1].strip() for m in _UID.finditer(ours)}
    return bool(uids & {m.group().split(b":", 1)[-1].strip() for m in _UID.finditer(theirs)})


def _param_is(part: EmailMessage, fields: dict[str, str], param: str, value: str) -> bool:
    """The Content-Type parameter `param` is `value` (as RFC 2045 compares them: ignoring case)."""
    found = get_param(part, param, fields=fields)
    return isinstance(found, str) and found.strip().lower() == value


def _raw_payload(part: EmailMessage) -> bytes:
    # The payload as parsed (8-bit bytes as surrogates); get_payload() would decode such text by its charset.
    raw = part._payload  # type: ignore[attr-defined]
    return raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""


def _filename(part: EmailMessage, fields: dict[str, str]) -> str | None:
    name = filename_param(part, fields)
    return sanitize.filename(name) if name is not None else None


_EXTENSIONS = {
    "message/rfc822": ".eml",
    "application/pdf": ".pdf",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "text/html": ".html",
    "text/plain": ".txt",
    "text/calendar": ".ics",
}


def _default_filename(part: EmailMessage, ctype: str) -> str:
    ext = _EXTENSIONS.get(ctype, ".bin")
    if ctype == "message/rfc822":
        head, _ = payload.header_block(payload.message_bytes(part).data)
        inner = BytesHeaderParser(policy=RAW_HEADERS).parsebytes(head)
        subject = header_text(inner.get("Subject", ""))
        base = re.sub(r"[^\w .-]+", "", sanitize.field(subject)).strip()[:60] or "message"
        return base + ext
    return "attachment" + ext


# -- joining several displayed pieces into one document ---------------------------------------------------

_BODY_OPEN = re.compile(r"<body\b[^>]*>", re.IGNORECASE)
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_HEAD = re.compile(r"<head\b[^>]*>(.*?)</head\s*>", re.IGNORECASE | re.DOTALL)
_STYLE = re.compile(r"<style\b.*?</style\s*>", re.IGNORECASE | re.DOTALL)
_WRAPPERS = re.compile(r"<!doctype[^>]*>|</?html\b[^>]*>|<head\b.*?</head\s*>", re.IGNORECASE | re.DOTALL)


def _join(pieces: list[_Piece], walk: _Walk) -> str:
    """Several displayed parts -> one HTML document, in order: the first HTML part's document around the
    others' body content; text parts as preformatted blocks; inline images that sit between HTML parts
    (and that no HTML part refers to) as <img src="cid:..."> where they were."""
    html_at = [i for i, p in enumerate(pieces) if p.kind == "html"]
    referenced = "\n".join(pieces[i].content for i in html_at).lower()
    fragments: list[str] = []
    shell_head, shell_tail = "", ""
    for index, piece in enumerate(pieces):
        if piece.kind == "html":
            if index == html_at[0]:
                shell_head, inner, shell_tail = _split_document(piece.content)
                fragments.append(inner)
            else:
                fragments.append(_inner_body(piece.content))
        elif piece.kind == "text":
            if piece.content:
                fragments.append(
                    '<div style="white-space:pre-wrap">' + html.escape(piece.content, quote=False) + "</div>"
                )
        elif html_at[0] < index < html_at[-1]:
            cid = _image_cid(walk, piece.image)
            if f"cid:{cid}".lower() not in referenced:
                fragments.append(f'<img src="cid:{html.escape(cid)}">')
    return shell_head + "".join(fragments) + shell_tail


def _split_document(doc: str) -> tuple[str, str, str]:
    opened = _BODY_OPEN.search(doc)
    if opened is None:
        return "", doc, ""
    closed = _BODY_CLOSE.search(doc, opened.end())
    end = closed.start() if closed is not None else len(doc)
    return doc[: opened.end()], doc[opened.end() : end], doc[end:]


def _inner_body(doc: str) -> str:
    """A later HTML part's body content, keeping the <style> rules of its head."""
    head = _HEAD.search(doc)
    styles = "".join(_STYLE.findall(head.group(1))) if head is not None else ""
    opened = _BODY_OPEN.search(doc)
    if opened is None:
        return styles + _WRAPPERS.sub("", doc)
    closed = _BODY_CLOSE.search(doc, opened.end())
    return styles + doc[opened.end() : closed.start() if closed is not None else len(doc)]


def _image_cid(walk: _Walk, index: int) -> str:
    attachment = walk.attachments[index]
    if attachment.content_id:
        return attachment.content_id
    # Referenced from the joined body, so it needs an id; derived from the content so a retry is identical.
    cid = f"part{index + 1}.{_content_digest(attachment)[:16]}@smtp-gateway"
    walk.attachments[index] = replace(attachment, content_id=cid, inline=True)
    return cid


_DIGEST_CHUNK = 1 << 20  # a multiple of 4: each slice of base64 text decodes on its own


def _content_digest(attachment: Attachment) -> str:
    """SHA-256 of the decoded content, also of a carried part (decoded a slice at a time, never whole)."""
    if attachment.b64 is None:
        return hashlib.sha256(attachment.data).hexdigest()
    digest = hashlib.sha256()
    with memoryview(attachment.b64) as text:
        for at in range(0, len(text), _DIGEST_CHUNK):
            digest.update(binascii.a2b_base64(text[at : at + _DIGEST_CHUNK]))
    return digest.hexdigest()
