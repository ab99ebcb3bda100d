"""The memory a large plain-text body takes while it is parsed (docs/messages.md, `limits.max_large_bytes`).

A body of "&" is the most HTML escaping makes of text: five times its size ("&amp;"). Measured as the peak of
Python's own allocations (tracemalloc) during `mime.parse`, before the JSON request is built: deterministic,
no timing. With `head + escaped + tail` the escaped text was held three times at once (16.6x the message);
built in one join it is held twice (11.8x)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from gateway import mime
from gateway.core.errors import ContentRejected
from gateway.mime import jsonbody

SIZE = 4 * 1024 * 1024
HEAD = (
    b"From: info@example.com\r\nTo: someone@example.net\r\nSubject: report\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
)


def _peak_ratio(raw: bytes) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        message = mime.parse(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message.html.count("&amp;") >= SIZE // 2  # the whole body, escaped, not refused
    return (peak - base) / len(raw)


def test_a_plain_text_body_of_ampersands_is_escaped_without_a_third_copy() -> None:
    raw = HEAD + b"\r\n".join([b"&" * 74] * (SIZE // 76)) + b"\r\n"
    # Generous: the source text twice (the parse tree's and the decoded text), the escaped text and the
    # document, each five times the size, make 12; a third escaped copy makes 17.
    assert _peak_ratio(raw) <= 14.0


def test_text_to_html_is_the_escaped_text_in_its_document() -> None:
    assert mime.text_to_html("a & b <c>\r\nd") == (
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head>'
        '<body><div style="white-space:pre-wrap;font-family:monospace">a &amp; b &lt;c&gt;\nd</div></body></html>'
    )


def test_the_ledger_counts_a_body_without_encoding_it_whole() -> None:
    body = "&amp;" * (SIZE // 5)
    gc.collect()
    tracemalloc.start()
    try:
        noted = jsonbody.body_omitted(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert noted == f"({len(body)} bytes, not kept)"
    assert peak < len(body) // 2  # an encoded copy of the whole body would be its size


def test_utf8_size_is_the_encoded_size_across_slices() -> None:
    # A two-byte, a four-byte character and a lone surrogate (kept from a broken charset) on slice edges.
    text = "a" * (1024 * 1024 - 1) + "é" + "\U0001f600" * 3 + "\udc80" + "b"
    assert jsonbody.utf8_size(text) == len(text.encode("utf-8", "surrogatepass"))


def _charges(raw: bytes) -> list[int]:
    charged: list[int] = []
    mime.parse(raw, charge=charged.append)
    return charged


def test_a_text_body_is_charged_what_escaping_adds_before_its_html_is_built() -> None:
    # "&" -> "&amp;" adds 4 characters, "<" and ">" 3 each: what limits.max_large_bytes is charged beyond the
    # raw size (gateway/pipeline.py), so that its memory bound holds for text like this too.
    assert _charges(HEAD + b"a & b <c>\r\n" * 1000) == [(4 + 3 + 3) * 1000]
    assert _charges(HEAD + b"plain words\r\n") == [0]
    # Each character is as wide in memory as the text's widest (PEP 393): "\u20ac" makes them 2 bytes.
    euro = HEAD.replace(b"us-ascii", b"utf-8") + "\u20ac & \u20ac\r\n".encode()
    assert _charges(euro) == [4 * 2]


def test_no_charge_for_text_beside_an_html_alternative() -> None:
    """Only HTML that is built is charged: with the client's HTML part, the text part stays text."""
    raw = (
        b"From: info@example.com\r\nTo: someone@example.net\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
        + b"&" * 5000
        + b"\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>&amp;</p>\r\n--b--\r\n"
    )
    assert _charges(raw) == []
    # Side by side (multipart/mixed) both are shown: the text is escaped into the HTML, and charged.
    assert _charges(raw.replace(b"multipart/alternative", b"multipart/mixed")) == [4 * 5000]


def test_a_refusing_charge_stops_the_parse_before_the_html() -> None:
    raw = HEAD + b"\r\n".join([b"&" * 74] * (SIZE // 76)) + b"\r\n"

    def refuse(extra: int) -> None:
        raise ContentRejected(f"{extra} bytes more")

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(ContentRejected, match=f"^{4 * raw.count(b'&')} bytes more$"):
            mime.parse(raw, charge=refuse)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The parse tree's text and the decoded text: no escaped copy (each five times the size) was made.
    assert (peak - base) / len(raw) <= 4.0
