"""Pure MIME decoding: raw message bytes -> gateway.model.Message, every header and body decoded to Unicode."""

from __future__ import annotations

import codecs
import html
import re
from email import message_from_bytes
from email.header import decode_header
from email.message import Message as EmailMessage
from email.policy import Compat32
from email.utils import getaddresses

from gateway.errors import ContentRejected
from gateway.model import Address, Attachment, Message

# compat32 is ~7x faster than policy.default on a 5 KB message (bench/README.md); its headers are
# raw strings, so RFC 2047 / 8-bit decoding is done here, once, only for the headers the API needs.
OPTION_PREFIX = "x-gateway-"


class _RawHeaders(Compat32):
    """compat32, but header values stay raw strings (8-bit bytes as surrogates) for header_text()."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        # Unfold (RFC 5322 §2.2.3): a folded boundary= parameter must still match its delimiter lines.
        return _FOLD.sub("", value) if "\n" in value else value


_FOLD = re.compile(r"\r?\n(?=[ \t])")
_POLICY = _RawHeaders()
_WS = re.compile(r"\s+")


def parse(raw: bytes | bytearray) -> Message:
    """Decode a submitted message. Raises ContentRejected when it cannot be turned into an API call."""
    try:
        return _parse(raw)
    except RecursionError:
        raise ContentRejected("Message structure is nested too deeply") from None


def _parse(raw: bytes | bytearray) -> Message:
    try:
        msg = message_from_bytes(raw, policy=_POLICY)
    except Exception as exc:  # the stdlib parser is lenient; anything it raises is a broken message
        raise ContentRejected(f"Message could not be parsed: {type(exc).__name__}") from exc
    if not msg.keys() and not raw.strip():
        raise ContentRejected("Empty message")

    html_body, text_body, attachments = _bodies(msg)
    if html_body is None or not html_body.strip():
        # An empty HTML part (or none): the text, else an empty document; DMDS refuses an empty html.
        html_body = text_to_html(text_body or "")
    # One pass over the headers (compat32's get() scans them all, lower-casing each, on every call).
    headers: dict[str, list[str]] = {}
    for name, value in msg.items():
        headers.setdefault(name.lower(), []).append(str(value))
    options = {
        name[len(OPTION_PREFIX) :]: header_text(values[0])
        for name, values in headers.items()
        if name.startswith(OPTION_PREFIX)
    }
    message_id = headers.get("message-id", [""])[0].strip()
    # Custom X- headers (not the X-Gateway-* options), names as written, for providers that forward them.
    x_headers = tuple(
        (name, header_text(value).strip()) for name, value in msg.items()
        if name[:2].lower() == "x-" and not name.lower().startswith(OPTION_PREFIX)
    ) if any(n.startswith("x-") and not n.startswith(OPTION_PREFIX) for n in headers) else ()
    return Message(
        subject=_WS.sub(" ", header_text(headers.get("subject", [""])[0])).strip(),
        from_=_first_address(headers, "from"),
        sender=_first_address(headers, "sender"),
        reply_to=_first_address(headers, "reply-to"),
        to=_addresses(headers, "to"),
        cc=_addresses(headers, "cc"),
        html=html_body,
        text=text_body,
        attachments=tuple(attachments),
        options=options,
        message_id=message_id or None,
        x_headers=x_headers,
    )


def header_text(value: object) -> str:
    """Decode one header value: RFC 2047 encoded words and raw 8-bit (UTF-8, else Latin-1) bytes."""
    if value is None:
        return ""
    raw = _undo_surrogates(str(value))
    if "=?" not in raw:
        return raw
    try:
        parts = decode_header(raw)
    except Exception:
        return _undo_surrogates(raw)
    out: list[str] = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(_undo_surrogates(chunk))
        else:
            out.append(decode_bytes(chunk, charset))
    # decode_header drops the whitespace between an encoded word and plain text; restore one space.
    return _join_decoded(out, parts)


def _join_decoded(out: list[str], parts: list[tuple[bytes | str, str | None]]) -> str:
    result = ""
    prev_encoded = False
    for text, (_, charset) in zip(out, parts, strict=True):
        encoded = charset is not None
        if result and not (prev_encoded and encoded) and not result[-1].isspace() and not text[:1].isspace():
            result += " "
        result += text
        prev_encoded = encoded
    return result


_SURROGATE = re.compile("[\udc80-\udcff]")


def _undo_surrogates(text: str) -> str:
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return decode_bytes(text.encode("ascii", "surrogateescape"), None)


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Bytes in a declared charset -> str; unknown or wrong charsets fall back to UTF-8, then Latin-1."""
    if charset:
        charset = charset.strip().strip('"').lower()
        if charset in ("unknown-8bit", "x-unknown", "us-ascii", "ascii"):
            charset = None
    if charset:
        try:
            codecs.lookup(charset)
        except LookupError:
            charset = None
    if charset:
        try:
            return data.decode(charset)
        except (UnicodeDecodeError, LookupError):
            pass
        if data.isascii():
            # A 7-bit charset (ISO-2022-*) with a bad sequence: UTF-8 would "succeed" and keep the
            # raw escape sequences; decode what the declared charset can.
            try:
                return data.decode(charset, errors="replace")
            except LookupError:
                pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode(charset or "latin-1", errors="replace")


# One mailbox with nothing the full RFC 5322 parser is needed for (no quotes, comments, groups, lists,
# routes): "Name <a@b.c>" or "a@b.c". email.utils.getaddresses costs ~60 us per header; this, ~1 us.
_SIMPLE_MAILBOX = re.compile(
    r"\s*(?:(?P<name>[^<>\"(),;:\\\[\]@]*?)\s*<(?P<angle>[^<>\s\"(),;:\\\[\]@]+@[^<>\s\"(),;:\\\[\]@]+)>"
    r"|(?P<bare>[^<>\s\"(),;:\\\[\]@]+@[^<>\s\"(),;:\\\[\]@]+))\s*\Z"
)


def _mailboxes(values: list[str]) -> list[tuple[str, str]]:
    if len(values) == 1 and (m := _SIMPLE_MAILBOX.match(values[0])) is not None:
        if m.group("bare"):
            return [("", m.group("bare"))]
        return [(m.group("name").strip(), m.group("angle"))]
    return getaddresses(values)


def _addresses(headers: dict[str, list[str]], name: str) -> tuple[Address, ...]:
    values = headers.get(name)
    if not values:
        return ()
    result: list[Address] = []
    for display, addr in _mailboxes(values):
        addr = _undo_surrogates(addr).strip()
        if not addr or "@" not in addr:
            continue
        result.append(Address(email=addr, name=_WS.sub(" ", header_text(display)).strip()))
    return tuple(result)


def _first_address(headers: dict[str, list[str]], name: str) -> Address | None:
    found = _addresses(headers, name)
    return found[0] if found else None


def _bodies(msg: EmailMessage) -> tuple[str | None, str | None, list[Attachment]]:
    html_body: str | None = None
    texts: list[str] = []
    attachments: list[Attachment] = []
    for part in _leaves(msg):
        ctype = part.get_content_type()
        disposition = str(part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
        filename = _filename(part)
        is_attachment = disposition == "attachment" or (filename is not None and disposition != "inline")
        if not is_attachment and ctype == "text/html" and html_body is None:
            html_body = _text_payload(part)
        elif not is_attachment and filename is None and ctype.startswith("text/") and ctype != "text/html":
            texts.append(_text_payload(part))
        elif ctype.startswith("multipart/"):
            continue  # an empty multipart: nothing to carry
        else:
            attachments.append(_attachment(part, ctype, disposition, filename))
    text_body = "\n".join(t for t in texts if t) if texts else None
    return html_body, text_body, attachments


def _leaves(msg: EmailMessage) -> list[EmailMessage]:
    """Leaf parts in order; message/rfc822 parts are kept whole (they travel as .eml attachments)."""
    out: list[EmailMessage] = []
    stack = [msg]
    while stack:
        part = stack.pop()
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                stack.extend(p for p in reversed(payload) if isinstance(p, EmailMessage))
            continue
        out.append(part)
    return out


def _filename(part: EmailMessage) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if name is None:
        return None
    return header_text(name).strip() or None


def _text_payload(part: EmailMessage) -> str:
    data = _payload_bytes(part)
    return decode_bytes(data, part.get_content_charset()).replace("\r\n", "\n")


def _payload_bytes(part: EmailMessage) -> bytes:
    if part.get_content_maintype() == "message" or part.is_multipart():
        try:
            inner = part.get_payload(0) if part.is_multipart() else part.get_payload()
            if isinstance(inner, EmailMessage):
                return inner.as_bytes()
        except Exception:
            pass
        try:
            return part.as_bytes().split(b"\n\n", 1)[-1]
        except Exception:
            return b""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""


def _attachment(part: EmailMessage, ctype: str, disposition: str, filename: str | None) -> Attachment:
    cid = part.get("Content-ID")
    content_id = str(cid).strip().strip("<>").strip() if cid else None
    if filename is None:
        filename = _default_filename(part, ctype)
    return Attachment(
        filename=filename,
        content_type=ctype,
        data=_payload_bytes(part),
        content_id=content_id or None,
        inline=disposition == "inline" or (content_id is not None and disposition != "attachment"),
    )


_EXTENSIONS = {"message/rfc822": ".eml", "application/pdf": ".pdf", "image/png": ".png", "image/jpeg": ".jpg",
               "image/gif": ".gif", "text/html": ".html", "text/plain": ".txt", "text/calendar": ".ics"}


def _default_filename(part: EmailMessage, ctype: str) -> str:
    ext = _EXTENSIONS.get(ctype, ".bin")
    if ctype == "message/rfc822":
        inner = part.get_payload(0) if part.is_multipart() else None
        subject = header_text(inner.get("Subject", "")) if isinstance(inner, EmailMessage) else ""
        base = re.sub(r"[^\w .-]+", "", subject).strip()[:60] or "message"
        return base + ext
    return "attachment" + ext


def text_to_html(text: str) -> str:
    """Plain text -> safe HTML that keeps the text's line breaks and spacing."""
    escaped = html.escape(text.replace("\r\n", "\n"), quote=False)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head>'
        '<body><div style="white-space:pre-wrap;font-family:monospace">'
        + escaped
        + "</div></body></html>"
    )
