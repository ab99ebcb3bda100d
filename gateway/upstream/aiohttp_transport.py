"""An httpx transport over aiohttp's client, mapping each failure to the httpx class that says when it
happened: before the request was whole (ConnectError, ConnectTimeout, WriteError, WriteTimeout) or after
(ReadTimeout, ReadError, RemoteProtocolError). A server that disconnects after the request was sent must
never read as a connect failure: a possibly delivered call would then look safe to resend. Each call is
bounded as a whole and knows whether its body went out whole (gateway.upstream.upload)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import httpx
import yarl

from gateway.config.urls import without_urls
from gateway.upstream.upload import Upload, deadline

# Parsed URLs and timeouts kept for reuse: an upstream is called at a handful of URLs with one or two
# timeouts, and aiohttp would otherwise parse the URL again for every call. Bounded, in case a URL carries ids.
_MEMO_MAX = 256

# Request bodies are streamed in slices of this size: no multi-megabyte single write, and no copy.
_SLICE = 256 * 1024


async def slices(body: bytes | bytearray) -> AsyncIterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(view), _SLICE):
        yield bytes(view[start : start + _SLICE])


class OverLimit(httpx.ReadError):
    """An answer over the size read (`max_response`): it was not read, so it is lost like a broken read."""


class NotHttp(httpx.RemoteProtocolError):
    """An answer came that is not HTTP (a malformed status line or header): the request had gone."""


def said(exc: BaseException, default: str = "") -> str:
    """What an error of aiohttp's says, without the URL it names (aiohttp's texts end `url='<the URL>'` or say
    `to host <the URL>`): a hook's path or a vendor's query string may be its key, and these texts go to the
    logs, the ledger and the API."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{exc.status}, message={exc.message!r}"
    return without_urls(str(exc)) or default or type(exc).__name__


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One pooled keep-alive aiohttp session; created on first use, inside the running event loop."""

    def __init__(
        self,
        max_connections: int,
        keepalive_expiry: float = 15.0,
        max_response: int = 1 << 20,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._limit = max_connections
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._max_response = max_response
        self._keepalive = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, yarl.URL] = {}
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=self._keepalive, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, trust_env=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    def _timeout(self, timeouts: dict[str, float], whole: bool = False) -> aiohttp.ClientTimeout:
        """aiohttp's timeouts for `timeouts`; `whole`: a request that goes whole with its head, bounded as a
        whole by aiohttp's `total` (upload.deadline); otherwise the Upload bounds the call."""
        key = (timeouts.get("pool"), timeouts.get("connect"), timeouts.get("read"), whole)
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=deadline(timeouts) if whole else None,
                connect=key[0],  # waiting for a pooled connection, then connecting
                sock_connect=key[1],
                sock_read=key[2],
            )
            if len(self._timeouts) < _MEMO_MAX:
                self._timeouts[key] = timeout
        return timeout

    def _url(self, text: str) -> yarl.URL:
        url = self._urls.get(text)
        if url is None:
            url = yarl.URL(text)
            if len(self._urls) < _MEMO_MAX:
                self._urls[text] = url
        return url

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        streamed = request.extensions.get("body")  # a jsonbody.Body: its pieces, sliced, without a copy
        status, headers, content = await self.exchange(
            request.method,
            str(request.url),
            dict(request.headers),
            streamed.aiter() if streamed is not None else request.content,
            request.extensions.get("timeout", {}),
            request,
        )
        return httpx.Response(status, headers=headers, content=content, request=request)

    async def exchange(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | AsyncIterator[bytes] | None,
        timeouts: dict[str, float],
        request: httpx.Request | None = None,
        keep: int | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """One call without httpx's request and response objects (HttpClient's own path): the status, the
        headers as sent (latin-1) and the body. Failures raise the same httpx errors as handle_async_request;
        `request`: the one they name, if any. `keep`: only the body's first `keep` bytes are read (the rest is
        not: the connection is closed), for a caller that needs no more (over `max_response` is then no error)."""
        if body is None or (isinstance(body, bytes | bytearray) and len(body) <= _SLICE):
            # Whole with the request's head (the socket's buffers take it at once): the request is complete as
            # it goes, and aiohttp's own `total` bounds the call (an asyncio.timeout per call cost about 10 %
            # of the call's instructions, measured under callgrind). Connecting has its own, shorter timeouts,
            # which aiohttp reports as such: a deadline that strikes later struck an answer.
            total = self._timeout(timeouts, whole=True)
            try:
                return await self._call(method, url, headers, None, body or None, None, total, request, keep)
            except TimeoutError:
                raise httpx.ReadTimeout("no complete answer before the call's deadline", request=request) from None
        if isinstance(body, bytes | bytearray):
            # Sliced, with its length (aiohttp would send an iterator's pieces chunked), through the Upload, which
            # tells when the last piece was handed over.
            if not any(name.lower() == "content-length" for name in headers):
                headers = {**headers, "Content-Length": str(len(body))}
            body = slices(body)
        upload = Upload(timeouts, body=True)
        try:
            async with upload.bound:
                return await self._call(
                    method, url, headers, body, None, upload, self._timeout(timeouts), request, keep
                )
        except TimeoutError:  # the call's deadline (aiohttp's own timeouts are mapped inside)
            if upload.complete:
                raise httpx.ReadTimeout("no complete answer before the call's deadline", request=request) from None
            raise httpx.WriteTimeout("request body not written before the call's deadline", request=request) from None

    async def _call(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: AsyncIterator[bytes] | None,
        data: bytes | bytearray | None,
        upload: Upload | None,
        timeout: aiohttp.ClientTimeout,
        request: httpx.Request | None,
        keep: int | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """The call; `upload`: the body's, when it is sent in pieces (else the request is whole as it goes);
        `keep`: exchange's."""
        try:
            target = self._url(url)
        except ValueError as exc:  # yarl's: its text quotes the URL
            raise httpx.UnsupportedProtocol(f"a URL that cannot be requested ({type(exc).__name__})") from exc
        try:
            async with self._get_session().request(
                method,
                target,
                headers=headers,
                data=upload.pieces(body) if upload is not None and body is not None else data,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                content = bytearray()
                while (keep is None or len(content) < keep) and (
                    chunk := await response.content.read(_SLICE if keep is None else min(_SLICE, keep - len(content)))
                ):
                    content += chunk
                    if keep is None and len(content) > self._max_response:
                        # No API answer is this big: stop reading (a misbehaving upstream must not fill memory).
                        raise OverLimit(f"answer larger than {self._max_response} bytes", request=request)
                return (
                    response.status,
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
                    bytes(content),
                )
        except aiohttp.ConnectionTimeoutError as exc:  # connect / pool timeout: nothing was sent
            raise httpx.ConnectTimeout(said(exc, "connect timeout"), request=request) from exc
        except (aiohttp.ClientConnectorError, aiohttp.ServerFingerprintMismatch) as exc:
            # refused, unreachable, DNS, TLS handshake, a certificate not the pinned one: before any request
            raise httpx.ConnectError(said(exc), request=request) from exc
        except aiohttp.ClientResponseError as exc:  # an answer, not valid HTTP: the request had gone
            raise NotHttp(said(exc), request=request) from exc
        except aiohttp.ClientPayloadError as exc:  # the answer's body cut short
            raise httpx.ReadError(said(exc), request=request) from exc
        except aiohttp.ServerTimeoutError as exc:  # the read timeout; it starts once the body is written
            if upload is not None and not upload.complete:
                raise httpx.WriteTimeout(said(exc, "write timeout"), request=request) from exc
            raise httpx.ReadTimeout(said(exc, "read timeout"), request=request) from exc
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:  # before anything was sent
            raise httpx.UnsupportedProtocol(f"a URL that cannot be requested ({type(exc).__name__})") from exc
        except aiohttp.ClientConnectionError as exc:
            # Closed, reset or failed while writing or reading (ServerDisconnectedError, ClientOSError,
            # ClientConnectionResetError, ...): whether the request had gone decides, not the error's class.
            if upload is not None and not upload.complete:
                raise httpx.WriteError(said(exc), request=request) from exc
            if isinstance(exc, aiohttp.ServerDisconnectedError):
                raise httpx.RemoteProtocolError(said(exc, "server disconnected"), request=request) from exc
            raise httpx.ReadError(said(exc), request=request) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
