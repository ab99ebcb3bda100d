"""mime.headers.header_block: the header block a notice quotes, as received (CRLF line ends, cut after the
last whole line within the limit, 8-bit bytes that are not UTF-8 replaced)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.mime.headers import header_block


def line_by_line(raw: bytes, limit: int) -> str:
    """The reference: each line decoded on its own."""
    data = bytes(raw[: limit + 4])
    if data.startswith((b"\r\n", b"\n")):
        return ""
    end = len(data)
    for sep in (b"\r\n\r\n", b"\n\n"):
        found = data.find(sep)
        if found != -1:
            end = min(end, found)
    block = data[:end]
    if len(block) > limit:
        block = block[: block.rfind(b"\n", 0, limit) + 1]
    if not block.strip():
        return ""
    lines = block.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")
    return "".join(line.decode("utf-8", "replace") + "\r\n" for line in lines)


# Header-like bytes: line ends of every kind, blanks, and UTF-8 sequences whole, cut and stray.
PIECES = st.sampled_from(
    [b"\r\n", b"\n", b"\r", b" ", b"\t", b"Subject: x", b"a", b":", b"\xc3\xa9", b"\xc3", b"\xe2\x82", b"\xff", b"\x80"]
)


@given(st.lists(PIECES, max_size=40).map(b"".join), st.integers(min_value=0, max_value=64))
def test_the_block_is_what_each_line_decoded_alone_gives(raw: bytes, limit: int) -> None:
    assert header_block(raw, limit) == line_by_line(raw, limit)
    assert header_block(bytearray(raw), limit) == line_by_line(raw, limit)


def test_a_message_s_block() -> None:
    raw = b"From: a@b.example\r\nSubject: caf\xc3\xa9 \xff\r\n folded\r\n\r\nbody\r\n"
    assert header_block(raw) == "From: a@b.example\r\nSubject: caf\u00e9 \ufffd\r\n folded\r\n"
    assert header_block(b"\r\nbody") == ""
    assert header_block(b"Subject: x\nTo: y\n\nbody") == "Subject: x\r\nTo: y\r\n"
