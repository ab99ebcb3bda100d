"""Pure: make decoded header fields, bodies, file names and content types safe for the upstream API."""

from __future__ import annotations

import re

# Header-derived fields (Subject, display names, file names, option values, ids) are one line of text:
# no C0 or C1 control, no DEL. Line-like controls (TAB, LF, CR, VT, FF, the C1 NEL, U+2028/2029) become
# a space, which is how a folded header reads; the others are dropped, as mail clients show nothing for them.
# Unicode's Bidi_Control characters are dropped too: embeddings, overrides and isolates (U+202A-U+202E,
# U+2066-U+2069) and the marks (U+200E, U+200F, U+061C) reorder what a reader sees ("invoice\u202efdp.exe"
# displays as "invoiceexe.pdf"; a Subject or a sender name can be made to read as another).
_SPACE_LIKE = "\t\n\v\f\r\x1c\x1d\x1e\x1f\x85\u2028\u2029"
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_FIELD_CONTROLS = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI_CONTROLS}]")
_FIELD_TABLE = str.maketrans(
    {chr(c): (" " if chr(c) in _SPACE_LIKE else None) for c in [*range(0x20), *range(0x7F, 0xA0)]}
    | {"\u2028": " ", "\u2029": " "}
    | dict.fromkeys(_BIDI_CONTROLS)
)
# Bodies keep TAB, LF and CR; NUL and the other C0 controls (and DEL) are removed.
_BODY_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]+")
# The same set as bytes: a control character is the same byte in UTF-8 (no multi-byte sequence contains a
# byte below 0x80), and bytes.translate finds it much faster than the regex.
_BODY_CONTROL_BYTES = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
# A lone surrogate cannot be encoded as UTF-8 (the JSON body would fail): it becomes U+FFFD.
_SURROGATES = re.compile("[\ud800-\udfff]")
_BODY_SLICE = 1024 * 1024  # characters body() checks at a time
_WS = re.compile(r"\s+")
# RFC 6838 §4.2 restricted-name characters, for "type/subtype".
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_DRIVE = re.compile(r"[A-Za-z]:")
MAX_FILENAME = 255  # characters; what common file systems allow for one name


def field(text: str, collapse: bool = True) -> str:
    """One-line header text: controls replaced or removed, whitespace runs collapsed, trimmed."""
    if not (text.isascii() and text.isprintable()):
        if _FIELD_CONTROLS.search(text) is not None:
            text = text.translate(_FIELD_TABLE)
        text = _no_surrogates(text)
    if collapse:
        text = _WS.sub(" ", text)
    return text.strip()


def body(text: str) -> str:
    """Body text (plain or HTML): NUL and C0 controls other than TAB, LF and CR removed."""
    surrogates = controls = False
    # Checked a slice at a time: the whole text encoded, and translated, would be two more copies of a body
    # of tens of MB at once (bytes.translate is 5x faster than a regex search; a slice never splits a
    # character, Python strings have no surrogate pairs).
    for start in range(0, len(text), _BODY_SLICE):
        piece = text[start : start + _BODY_SLICE]
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate
            surrogates = True
            data = _SURROGATES.sub("\ufffd", piece).encode("utf-8")
        controls = controls or len(data.translate(None, _BODY_CONTROL_BYTES)) != len(data)
    if surrogates:
        text = _SURROGATES.sub("\ufffd", text)
    if controls:
        text = _BODY_CONTROLS.sub("", text)
    return text


def filename(name: str) -> str | None:
    """A file name as the recipient should see it: one line, no directories, no bidi tricks.

    Client paths are reduced to their last component (`/tmp/whoa` -> `whoa`, `C:\\TEMP\\a.png` -> `a.png`).
    None when nothing usable is left (empty, `.` or `..`): the caller names the part itself.
    """
    name = field(name, collapse=False)
    name = re.split(r"[/\\]", name)[-1].strip()
    if _DRIVE.match(name):
        name = name[2:].strip()
    if not name.strip("."):
        return None
    if len(name) > MAX_FILENAME:
        stem, dot, ext = name.rpartition(".")
        ext = dot + ext if stem and len(ext) < 16 else ""
        name = name[: MAX_FILENAME - len(ext)].rstrip() + ext
    return name


def media_type(ctype: str) -> str:
    """A `type/subtype` the API can carry: what follows a well-formed start is dropped (`text/plain>` is
    text/plain); anything else becomes application/octet-stream."""
    found = _MEDIA_TYPE.match(ctype.strip().lower())
    return found.group() if found is not None else "application/octet-stream"


def content_id(value: str) -> str | None:
    """A Content-ID without its angle brackets; None when empty."""
    cid = field(value).strip("<>").strip()
    return cid or None


def _no_surrogates(text: str) -> str:
    if text.isascii() or _SURROGATES.search(text) is None:
        return text
    return _SURROGATES.sub("\ufffd", text)
