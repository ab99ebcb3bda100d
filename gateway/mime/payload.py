"""Pure: part bodies as mail clients decode them: lenient base64, attached messages as they arrived."""

from __future__ import annotations

import binascii
import io
import quopri
import re
from email.generator import BytesGenerator
from email.message import Message

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_ALPHABET = bytes(sorted(set(range(256)) - set(_ALPHABET)))
_WHITESPACE = b" \t\r\n\v\f"
_ALPHABET_AND_WHITESPACE = _ALPHABET + _WHITESPACE
_PADDING = re.compile(rb"=+")
# Control bytes no text contains (TAB, LF, VT, FF, CR and ESC, which ISO-2022 uses, excepted).
_BINARY = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f]")


def base64_lenient(data: bytes, text: bool = False) -> bytes | None:
    """Decode base64 as mail clients do; None when `data` is not base64 at all.

    Characters outside the alphabet are skipped, missing padding is tolerated, and encodings concatenated
    after a padding are decoded too. Lines that are plainly not base64 (they contain spaces or much
    punctuation) are skipped before the data (header lines that spilled into the body) and end it after
    (an epilogue that lost its boundary). `text`: the part is text, so a repaired result that is binary
    means the part was never base64 (None) rather than something to show.
    """
    if not data.translate(None, _ALPHABET_AND_WHITESPACE):
        # The common case, nothing but base64 and line breaks: one pass over the data when the padding,
        # if any, is at the end and complete (binascii skips the line breaks itself).
        pad = data.find(b"=")
        if pad < 0 or not data[pad:].translate(None, b"=" + _WHITESPACE):
            try:
                return binascii.a2b_base64(data)
            except binascii.Error:
                pass  # missing padding
        return _decode_runs(data.translate(None, _WHITESPACE))
    chunks: list[bytes] = []
    repaired = False
    for line in data.splitlines():
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
            break
        else:
            repaired = True
    if not chunks:
        return None
    decoded = _decode_runs(b"".join(chunks))
    if text and repaired and _BINARY.search(decoded) is not None:
        return None
    return decoded


def _decode_runs(compact: bytes) -> bytes:
    stripped = compact.rstrip(b"=")
    if b"=" not in stripped:
        return _decode_run(stripped)
    return b"".join(_decode_run(run) for run in _PADDING.split(compact) if run)


def _decode_run(run: bytes) -> bytes:
    extra = len(run) % 4
    if extra == 1:
        run = run[:-1]  # six bits do not make a byte: nothing is lost
    elif extra:
        run += b"=" * (4 - extra)
    return binascii.a2b_base64(run)


_LINE_END = re.compile(rb"\r?\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_TEXT_LINE_END = re.compile(r"\r?\n")
_TEXT_BARE_LF = re.compile(r"(?<!\r)\n")


class _AsArrived(BytesGenerator):
    """Writes a parsed message back as it arrived: header values raw (no re-folding), CRLF line ends,
    and a bare CR left a CR (the stdlib generator makes it a line break)."""

    skip_headers = False  # the top level's own headers (a message/* part's body is wanted)

    def _write_headers(self, msg: Message) -> None:
        if self.skip_headers:
            self.skip_headers = False
            return
        for name, value in msg.raw_items():
            self.write(f"{name}: {_TEXT_LINE_END.sub(chr(13) + chr(10), str(value))}\r\n")
        self.write("\r\n")

    def _write_lines(self, lines: str) -> None:
        if lines:
            # No copy of a large body whose lines already end in CRLF (the usual case from SMTP).
            self.write(_TEXT_LINE_END.sub("\r\n", lines) if _TEXT_BARE_LF.search(lines) else lines)

    # A multipart (or delivery report) the parser could not split keeps its text as one string; the stdlib
    # reads it back through get_payload(), which decodes 8-bit bytes by the charset and fails to write them.
    def _handle_multipart(self, msg: Message) -> None:
        if isinstance(msg._payload, str):  # type: ignore[attr-defined]
            self._write_lines(msg._payload)  # type: ignore[attr-defined]
        else:
            super()._handle_multipart(msg)  # type: ignore[misc]

    def _handle_message_delivery_status(self, msg: Message) -> None:
        if isinstance(msg._payload, str):  # type: ignore[attr-defined]
            self._write_lines(msg._payload)  # type: ignore[attr-defined]
        else:
            super()._handle_message_delivery_status(msg)  # type: ignore[misc]


def message_bytes(part: Message) -> bytes:
    """The body of a message/* part (an attached message, a delivery report) with CRLF line ends."""
    out = io.BytesIO()
    generator = _AsArrived(out, mangle_from_=False, maxheaderlen=0)
    generator.skip_headers = True
    generator.flatten(part, linesep="\r\n")
    data = out.getvalue()
    out.close()  # the buffer's copy is not needed any more
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    # RFC 2046 §5.2.1 allows only 7bit/8bit/binary here, but clients decode what senders encode anyway.
    if cte == "base64":
        data = base64_lenient(data) or data
    elif cte == "quoted-printable":
        # Encoded text has no header block: the generator wrote an empty one (a leading CRLF).
        data = quopri.decodestring(data.removeprefix(b"\r\n"))
    # Once, whatever the client used (CRLF, bare LF, or a mix); a bare CR stays as it was.
    return _LINE_END.sub(b"\r\n", data) if _BARE_LF.search(data) else data
