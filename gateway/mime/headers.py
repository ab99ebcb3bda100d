"""Pure: raw header values -> Unicode: RFC 2047 encoded words, RFC 2231 parameters, raw 8-bit bytes."""

from __future__ import annotations

import binascii
import functools
import re
from collections.abc import Mapping
from email import utils
from email.errors import HeaderParseError
from email.header import decode_header
from email.message import Message
from email.policy import Compat32

from gateway.core.spill import SpillMap
from gateway.mime import charsets

_SURROGATE = re.compile("[\udc80-\udcff]")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


class _RawHeaders(Compat32):
    """compat32, but header values stay raw strings (8-bit bytes as surrogates) for header_text()."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        # Unfold (RFC 5322 §2.2.3): a folded boundary= parameter must still match its delimiter lines.
        return _FOLD.sub("", value) if "\n" in value else value


# compat32 is several times faster than policy.default (docs/development/benchmarks.md); its headers are
# raw strings, decoded by header_text() once, only for the headers the API needs.
RAW_HEADERS = _RawHeaders()
# RFC 2231 percent-decoding happens in the stdlib as Latin-1 text; this undoes it to the raw bytes.
_LATIN1 = "latin-1"


def header_text(value: object) -> str:
    """Decode one header value: RFC 2047 encoded words and raw 8-bit bytes (see gateway/mime/charsets.py)."""
    if value is None:
        return ""
    raw = undo_surrogates(str(value))
    if "=?" not in raw:
        return raw
    try:
        parts = decode_header(raw)
    except (HeaderParseError, binascii.Error, ValueError):
        # A broken encoded word is shown as it is written, as mail clients do.
        return raw
    out: list[str] = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(undo_surrogates(chunk))
        else:
            out.append(charsets.decode(chunk, charset).text)
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


def undo_surrogates(text: str) -> str:
    """Header text parsed from bytes keeps 8-bit bytes as surrogates: decode them (UTF-8, else detected)."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return charsets.decode(text.encode("ascii", "surrogateescape"), None).text


def content_fields(part: Message) -> dict[str, str]:
    """The part's Content-* header fields by lower-cased name, the first of each, each as part.get() returns
    it: what the functions below read, found in one pass over the fields instead of one each."""
    fields: dict[str, str] = {}
    fetch = part.policy.header_fetch_parse
    for name, value in part._headers:  # type: ignore[attr-defined]
        key = name.lower()
        if key.startswith("content-") and key not in fields:
            fields[key] = fetch(name, value)
    return fields


def _get(part: Message, header: str, fields: Mapping[str, str] | None) -> str | None:
    """part.get(header), from `fields` (content_fields(part)) when given; `header` lower-cased."""
    return part.get(header) if fields is None else fields.get(header)


def content_type(part: Message, fields: Mapping[str, str]) -> str:
    """part.get_content_type(), its Content-Type read from `fields` (content_fields(part))."""
    value = fields.get("content-type")
    if value is None:
        return part.get_default_type()
    ctype = str(value).partition(";")[0].strip().lower()
    return ctype if ctype.count("/") == 1 else "text/plain"


def transfer_encoding(part: Message, fields: Mapping[str, str] | None = None) -> str:
    """The part's Content-Transfer-Encoding, lower-cased, as senders write it: "base64 ", "quoted-printable;"
    mean the names (the stdlib then decodes nothing). `fields`: content_fields(part), if at hand."""
    return str(_get(part, "content-transfer-encoding", fields) or "").split(";", 1)[0].strip().lower()


# Header values whose parameters need none of the stdlib's harder cases: no backslash (quoted pairs), no
# RFC 2231 star, no angle bracket (unquoted like quotes), no line end.
# What Message.get_param returns: text, an RFC 2231 (charset, language, text), or None.
_Param = str | tuple[str | None, str | None, str] | None
_HARD_PARAMS = re.compile(r"[\\*<\r\n]")


def get_param(
    part: Message, param: str, header: str = "content-type", fields: Mapping[str, str] | None = None
) -> _Param:
    """part.get_param(param, None, header), several times faster for the common header (`charset="utf-8"`,
    `boundary=...`, `filename="a.pdf"`): its parameters split at every ";" and unquoted once, as the stdlib
    does when no ";" is quoted and nothing is escaped. Other values take the stdlib's own path. `fields`:
    content_fields(part), if at hand (`header` is then lower-case)."""
    value = _get(part, header, fields)
    if value is None:
        return None
    value = str(value)
    params = _simple_params(value) if len(value) <= _REMEMBERED_VALUE else _read_params(value)
    if params is None:
        return part.get_param(param, None, header)
    return params.get(param.lower())


# Header values this long or shorter have their parameters remembered: most messages carry the same few
# (`text/plain; charset="utf-8"`, `attachment; filename="scan.pdf"`), each read several times a message.
_REMEMBERED_VALUE = 256


def _read_params(value: str) -> dict[str, str] | None:
    """The value's parameters by lower-cased name (the first of a name; the media type itself is a name with
    an empty value, as the stdlib has it), or None when the value needs the stdlib's parser."""
    if _HARD_PARAMS.search(value) is not None:
        return None
    segments = value.split(";")
    if '"' in value and any(segment.count('"') % 2 for segment in segments):
        return None  # a quoted ";" perhaps
    params: dict[str, str] = {}
    for segment in segments:
        # As email.message._parseparam and Message._get_params_preserve: name and value stripped, the name
        # lower-cased; a segment without "=" is a name with an empty value.
        name, equals, text = segment.partition("=")
        params.setdefault(name.strip().lower(), utils.unquote(text.strip()) if equals else "")
    return params


_simple_params = functools.lru_cache(maxsize=512)(_read_params)


def content_charset(part: Message, fields: Mapping[str, str] | None = None) -> str | None:
    """part.get_content_charset() through get_param() above."""
    charset = get_param(part, "charset", fields=fields)
    if charset is None or isinstance(charset, tuple):
        return part.get_content_charset()
    return charset.lower() if charset.isascii() else None


def boundary(part: Message) -> str | None:
    """part.get_boundary() through get_param() above."""
    value = get_param(part, "boundary")
    if value is None:
        return None
    if isinstance(value, tuple):
        return part.get_boundary()
    return utils.collapse_rfc2231_value(value).rstrip()


def filename_param(part: Message, fields: Mapping[str, str] | None = None) -> str | None:
    """The part's file name: Content-Disposition filename, else Content-Type name; RFC 2231 or 2047 decoded."""
    for param, header in (("filename", "content-disposition"), ("name", "content-type")):
        try:
            value = get_param(part, param, header, fields)
        except TypeError:
            # The stdlib sorts RFC 2231 sections by number and fails when `name*` and `name*0` are mixed.
            continue
        if value is None:
            continue
        if isinstance(value, tuple):
            # RFC 2231: (charset, language, text whose characters are the percent-decoded octets).
            charset, _, text = value
            try:
                data = text.encode(_LATIN1, "surrogateescape")
            except UnicodeEncodeError:
                return header_text(text)
            return charsets.decode(data, charset or None).text
        return header_text(value)
    return None


# A notice quotes at most this much of a message's header block (RFC 3464 text/rfc822-headers).
HEADER_BLOCK_MAX = 64 * 1024


def header_block(raw: bytes | bytearray | memoryview | SpillMap, limit: int = HEADER_BLOCK_MAX) -> str:
    """The message's header block as received (up to the empty line), with CRLF line ends, cut after the last
    whole line within `limit` bytes; 8-bit bytes that are not UTF-8 are replaced."""
    data = bytes(raw[: limit + 4])
    if data.startswith((b"\r\n", b"\n")):
        return ""  # no header at all
    end = len(data)
    for sep in (b"\r\n\r\n", b"\n\n"):
        found = data.find(sep, 0, end)  # the first of either (neither can begin inside the other's match)
        if found != -1:
            end = found
    block = data[:end]
    if len(block) > limit:
        block = block[: block.rfind(b"\n", 0, limit) + 1]
    if not block.strip():
        return ""
    # Decoded whole: a line end is never part of a UTF-8 sequence, so each line decodes as it would alone.
    return block.replace(b"\r\n", b"\n").rstrip(b"\n").decode("utf-8", "replace").replace("\n", "\r\n") + "\r\n"
