"""Pure: JSON request bodies whose large string values (attachments' base64) are not copied into the JSON.

A payload may hold `Blob(b"...")` where a string goes. `encode` returns plain bytes when there is none,
else a `Body`: the JSON text cut around each blob, so the request can be written as JSON, blob, JSON, ...
straight from the bytes the message arrived with. A 40 MB scan is then never held twice (its base64 text
once as it arrived, once more inside the JSON) and no multi-megabyte JSON is built on the event loop.
"""

from __future__ import annotations

import mmap
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.core.model import Attachment

# Smaller values are copied into the JSON: cheaper than a separate piece.
BLOB_MIN = 64 * 1024
# Bodies are written in slices of this size (a socket write never holds the loop for a multi-MB copy).
SLICE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Blob:
    """A JSON string value given as bytes that need no escaping (base64 text)."""

    data: bytes | memoryview


def text(value: bytes | memoryview) -> str | Blob:
    """A base64 value for a payload: a string when small, a Blob when large."""
    return bytes(value).decode("ascii") if len(value) < BLOB_MIN else Blob(value)


# What a payload carries as an attachment's content: its base64 (to send), or a note of its size (the
# request as the message ledger keeps it).
AttachmentContent = Callable[[Attachment], "str | Blob"]


def attachment_base64(attachment: Attachment) -> str | Blob:
    return text(attachment.base64())


def attachment_omitted(attachment: Attachment) -> str:
    return f"({attachment.size} bytes, not kept)"


def body_omitted(html: str) -> str:
    """The message's text as the message ledger keeps it without bodies (`ledger.keep_bodies = false`)."""
    return f"({utf8_size(html)} bytes, not kept)"


_SIZE_SLICE = 1024 * 1024


def utf8_size(text: str) -> int:
    """len(text.encode("utf-8", "surrogatepass")) without a copy of the whole text: an HTML body made of a
    plain text full of "&" is five times the message, and encoding it whole only to count it would hold one
    more such copy (docs/messages.md). UTF-8 encodes each code point alone, so slices add up."""
    if text.isascii():
        return len(text)
    return sum(
        len(text[at : at + _SIZE_SLICE].encode("utf-8", "surrogatepass")) for at in range(0, len(text), _SIZE_SLICE)
    )


@dataclass(frozen=True, slots=True)
class Body:
    """A JSON body in pieces: JSON text and blobs, in order."""

    pieces: tuple[bytes | memoryview, ...]

    def __len__(self) -> int:
        return sum(len(p) for p in self.pieces)

    async def aiter(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            view = memoryview(piece)
            # A blob in a spilled message's mapping (gateway/core/spill.py): its pages, read for a slice, are
            # released once the slice is copied out, so the message does not come back into memory as it is sent.
            mapped = view.obj if isinstance(view.obj, mmap.mmap) else None
            for start in range(0, len(view), SLICE):
                yield bytes(view[start : start + SLICE])
                if mapped is not None and not mapped.closed:
                    mapped.madvise(mmap.MADV_DONTNEED)

    def join(self) -> bytes:
        """The whole body in one piece (tests, and the rare transport that needs it)."""
        return b"".join(self.pieces)  # join takes views too


def encode(payload: Any) -> bytes | Body:
    blobs: list[Blob] = []
    nonce = ""  # made with the first blob (no text of the payload can contain the markers): most payloads have none

    def placeholder(value: Any) -> str:
        nonlocal nonce
        if isinstance(value, Blob):
            nonce = nonce or secrets.token_hex(8)
            blobs.append(value)
            return f"\x00{nonce}:{len(blobs) - 1}\x00"  # written by orjson as "\\u0000<nonce>:N\\u0000"
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    encoded = orjson.dumps(payload, default=placeholder, option=orjson.OPT_PASSTHROUGH_DATACLASS)
    if not blobs:
        return encoded
    pieces: list[bytes | memoryview] = []
    rest = encoded
    for n, blob in enumerate(blobs):
        marker = f'"\\u0000{nonce}:{n}\\u0000"'.encode()
        before, found, rest = rest.partition(marker)
        if not found:  # pragma: no cover - the marker is ours and orjson's escaping is stable
            raise AssertionError("blob marker not found in the encoded payload")
        pieces += [before + b'"', blob.data, b'"']
    pieces.append(rest)
    return Body(tuple(p for p in pieces if p))
