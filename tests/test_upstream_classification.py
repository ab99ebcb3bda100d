"""When a call fails, did the request reach the upstream? HttpClient against real loopback sockets, with
both transports: nothing listening is "not sent" (safe to resend); a server that takes the request and
then stays silent, closes, or resets is "answer lost" (AnswerLost: the upstream may have it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest

from gateway.core.errors import AnswerInvalid, AnswerLost, AnswerTooLarge, UpstreamUnavailable
from gateway.mime import jsonbody
from gateway.upstream.aiohttp_transport import AiohttpTransport, said
from gateway.upstream.client import MAX_RESPONSE, HttpClient
from gateway.upstream.response import HttpResponse
from gateway.upstream.upload import Upload
from tests.smtputil import reset_on_close

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TRANSPORTS = ["aiohttp", "httpx"]


def _length(head: bytes) -> int:
    return next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )


async def _read_request(reader: asyncio.StreamReader) -> None:
    await reader.readexactly(_length(await reader.readuntil(b"\r\n\r\n")))


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await asyncio.sleep(30)


async def close_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.close()


async def reset_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    reset_on_close(writer.get_extra_info("socket"))
    writer.close()


async def half_an_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"status":')
    await writer.drain()
    writer.close()


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    writer.close()


async def _server(behaviour: Behaviour) -> AsyncIterator[int]:
    """A loopback server running `behaviour` per connection; every connection is closed at the end."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await behaviour(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def _call(port: int, transport: str) -> None:
    client = HttpClient(f"http://127.0.0.1:{port}", upstream="Test", account="t", timeout=0.5, transport=transport)  # type: ignore[arg-type]
    try:
        await client.request("send", "POST", "/send", headers={"Content-Type": "application/json"}, content=b"{}")
    finally:
        await client.aclose()


async def _answer(port: int, transport: str) -> HttpResponse:
    client = HttpClient(f"http://127.0.0.1:{port}", upstream="Test", account="t", timeout=2, transport=transport)  # type: ignore[arg-type]
    try:
        return await client.request("send", "POST", "/send", headers={}, content=b"{}")
    finally:
        await client.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_nothing_listening_is_not_sent(transport: str) -> None:
    with socket.socket() as s:  # a port held by this test, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        with pytest.raises(UpstreamUnavailable) as info:
            await _call(s.getsockname()[1], transport)
    assert not isinstance(info.value, AnswerLost)
    assert "not sent" in info.value.reason


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("behaviour", [silent, close_after_reading, reset_after_reading, half_an_answer])
async def test_a_request_that_went_out_without_a_complete_answer_is_ambiguous(
    transport: str, behaviour: Behaviour
) -> None:
    async for port in _server(behaviour):
        with pytest.raises(AnswerLost):
            await _call(port, transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answer_is_an_answer_whatever_its_status(transport: str) -> None:
    async for port in _server(answer):
        response = await _answer(port, transport)
        assert response.status == 503 and response.json() == {}


KEY = "k3y-5ecret-0f-the-account"


async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}")  # not a status code
    await writer.drain()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answer_that_is_not_http_says_so_without_the_url(transport: str) -> None:
    """aiohttp's text of a malformed answer ends `url='<the whole URL>'`: a vendor's key in its query (or a
    hook's token in its path) would go with it to the logs and the ledger."""
    async for port in _server(not_http):
        client = HttpClient(f"http://127.0.0.1:{port}", upstream="Test", account="t", timeout=2, transport=transport)  # type: ignore[arg-type]
        try:
            with pytest.raises(AnswerInvalid) as info:
                await client.request("send", "POST", f"/send/{KEY}?key={KEY}", headers={}, content=b"{}")
        finally:
            await client.aclose()
    assert "not HTTP" in info.value.reason
    assert KEY not in info.value.reason and KEY not in str(info.value.__cause__), info.value.reason


def test_aiohttps_error_texts_lose_their_urls() -> None:
    """The texts of aiohttp's errors that name the URL (a connect timeout says `to host <the URL>`) as the
    transport passes them on."""
    import aiohttp

    url = f"https://api.vendor.example/v1/{KEY}?key={KEY}"
    timeout = aiohttp.ConnectionTimeoutError(f"Connection timeout to host {url}")
    assert said(timeout) == "Connection timeout to host https://api.vendor.example/**********"
    invalid = aiohttp.InvalidURL(url, "bad port")
    assert KEY not in said(invalid)


async def too_large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    size = MAX_RESPONSE + 1
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
    await writer.drain()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answer_over_the_size_read_is_lost_and_says_so(transport: str) -> None:
    """Not read into memory: an ambiguous answer (the request went), typed so that an event poll can say
    what helps (a smaller page)."""
    async for port in _server(too_large):
        with pytest.raises(AnswerTooLarge) as info:
            await _answer(port, transport)
    assert f"more than {MAX_RESPONSE} bytes" in info.value.reason


async def two_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-ID: one\r\nWarning: a\r\nwarning: b\r\n\r\n{}")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answers_headers_read_alike_over_both_transports(transport: str) -> None:
    """Names lower-cased, a header sent twice as one value joined by ", " (aiohttp's path has no httpx
    Response to do it)."""
    async for port in _server(two_headers):
        response = await _answer(port, transport)
        assert response.headers["x-request-id"] == "one"
        assert response.headers["warning"] == "a, b"


async def test_large_bodies_stream_in_slices_with_their_length() -> None:
    seen: list[int] = []

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"chunked" not in head.lower()
        seen.append(len(await reader.readexactly(_length(head))))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async for port in _server(count):
        client = HttpClient(f"http://127.0.0.1:{port}", upstream="Test", account="t", timeout=5)
        try:
            await client.request("send", "POST", "/send", headers={}, content=b"x" * (3 * 1024 * 1024 + 7))
        finally:
            await client.aclose()
    assert seen == [3 * 1024 * 1024 + 7]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_json_body_with_blobs_streams_byte_identical(transport: str) -> None:
    """Large base64 values are written from the bytes they are in, not copied into one JSON text."""
    blob = b"QUJD" * (1 << 19)  # 2 MiB of base64 text
    payload = {"subject": "scan", "attachments": [{"name": "a.pdf", "content": jsonbody.Blob(blob)}]}
    body = jsonbody.encode(payload)
    assert isinstance(body, jsonbody.Body)
    seen: list[bytes] = []

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"chunked" not in head.lower()
        seen.append(await reader.readexactly(_length(head)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async for port in _server(capture):
        client = HttpClient(f"http://127.0.0.1:{port}", upstream="Test", account="t", timeout=5, transport=transport)  # type: ignore[arg-type]
        try:
            await client.request("send", "POST", "/send", headers={"Content-Type": "application/json"}, content=body)
        finally:
            await client.aclose()
    assert seen == [body.join()]
    assert orjson.loads(seen[0])["attachments"][0]["content"] == blob.decode()


async def stop_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Takes the request's head and a little of its body, then reads nothing more and never answers."""
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1024)
    await asyncio.Event().wait()  # until the test ends (the server cancels it)


async def _big_body_not_sent(behaviour: Behaviour, transport: str, timeout: float) -> None:
    """A 64 MiB POST (far more than the loopback socket buffers hold) to an upstream behaving so fails as
    not sent: its last piece never went out."""
    body = b"x" * (64 << 20)
    async for port in _server(behaviour):
        client = HttpClient(
            f"http://127.0.0.1:{port}", upstream="Test", account="t", timeout=timeout, transport=transport
        )  # type: ignore[arg-type]
        try:
            with pytest.raises(UpstreamUnavailable, match="request not sent"):
                await asyncio.wait_for(client.request("send", "POST", "/send", headers={}, content=body), 30)
        finally:
            await client.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_upstream_that_stops_reading_the_body_does_not_hold_the_call(transport: str) -> None:
    """No transport has a timeout on writing a body whole; the call's own deadline ends it, and as the body's
    last piece never went out, the upstream cannot have the request: not sent."""
    # Without the deadline the call would wait for ever: the test's guard only keeps a failure from hanging.
    await _big_body_not_sent(stop_reading, transport, timeout=0.5)


async def test_a_body_handed_over_whole_then_stalled_is_ambiguous() -> None:
    """The body's one piece went to the connection whole (it sits in the socket buffers when the upstream stops
    reading): the upstream may yet read and act on it, so the deadline is an answer lost, not "not sent"."""
    body = b"x" * (64 << 20)

    async def one_piece() -> AsyncIterator[bytes]:
        yield body

    async for port in _server(stop_reading):
        transport = AiohttpTransport(1)
        timeouts = HttpClient.timeouts(0.5)
        try:
            with pytest.raises(httpx.ReadTimeout):
                await asyncio.wait_for(
                    transport.exchange(
                        "POST",
                        f"http://127.0.0.1:{port}/send",
                        {"Content-Length": str(len(body))},
                        one_piece(),
                        timeouts,
                    ),
                    30,
                )
        finally:
            await transport.aclose()


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the request, then answers a byte at a time, each before the read timeout runs out."""
    await _read_request(reader)
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answer_that_trickles_is_bounded(transport: str) -> None:
    """Read timeouts restart with every byte; the call's deadline does not: an answer lost."""
    async for port in _server(trickle):
        with pytest.raises(AnswerLost, match="answer"):
            await asyncio.wait_for(_call(port, transport), 30)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answer_to_a_request_without_a_body_that_trickles_is_bounded(transport: str) -> None:
    """A GET (the event polls, the token checks) has no body to move the deadline: the one it starts with
    (connect + write + read) must hold."""
    async for port in _server(trickle):
        client = HttpClient(f"http://127.0.0.1:{port}", upstream="Test", account="t", timeout=0.5, transport=transport)  # type: ignore[arg-type]
        try:
            with pytest.raises(AnswerLost, match="answer"):
                await asyncio.wait_for(client.request("events", "GET", "/events", headers={}), 30)
        finally:
            await client.aclose()


async def test_a_body_is_complete_only_as_its_last_piece_goes() -> None:
    upload = Upload({"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 1.0}, body=True)
    seen: list[bool] = []

    async def three() -> AsyncIterator[bytes]:
        for piece in (b"a", b"b", b"c"):
            yield piece

    async with upload.bound:
        async for _ in upload.pieces(three()):
            seen.append(upload.complete)
    assert seen == [False, False, True]
    assert Upload({}, body=False).complete  # without a body, the request goes whole with its head


async def reset_in_the_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1024)
    reset_on_close(writer.get_extra_info("socket"))
    writer.close()


async def close_in_the_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1024)
    writer.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("behaviour", [reset_in_the_body, close_in_the_body])
async def test_a_connection_lost_before_the_body_went_whole_is_not_sent(transport: str, behaviour: Behaviour) -> None:
    """aiohttp reports these as ClientOSError, ClientConnectionResetError or ServerDisconnectedError alike
    whether they came while writing or reading: the body's progress decides."""
    await _big_body_not_sent(behaviour, transport, timeout=5)


async def test_an_answer_whose_encoding_cannot_be_undone_is_lost_over_httpx_too() -> None:
    """A corrupt gzip body: aiohttp's transport maps it to ReadError (AnswerLost); httpx raises DecodingError,
    which must be as lost (resent and counted), not an internal error with a traceback on every attempt."""

    def corrupt(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-encoding": "gzip"}, content=b"not gzip")

    client = HttpClient(
        "https://x.example", upstream="DMDS", account="a", timeout=5, transport=httpx.MockTransport(corrupt)
    )
    with pytest.raises(AnswerLost, match="cannot be decoded"):
        await client.request("send_one", "POST", "/v1/envio/send_one_inline/", headers={}, content=b"{}")
