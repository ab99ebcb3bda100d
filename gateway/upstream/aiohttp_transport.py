"""An httpx transport over aiohttp's client, mapping each failure to the httpx class that says when it
happened: before the request was sent (ConnectError, ConnectTimeout) or after (ReadTimeout, ReadError,
RemoteProtocolError). A server that disconnects after the request was sent must never read as a connect
failure: a possibly delivered call would then look safe to resend."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import httpx

# Request bodies are streamed in slices of this size: no multi-megabyte single write, and no copy.
_SLICE = 256 * 1024


async def _slices(body: bytes) -> AsyncIterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(view), _SLICE):
        yield bytes(view[start : start + _SLICE])


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

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=self._keepalive, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, trust_env=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("pool"),  # waiting for a pooled connection, then connecting
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        streamed = request.extensions.get("body")  # a jsonbody.Body: its pieces, sliced, without a copy
        if streamed is not None:
            data: AsyncIterator[bytes] | bytes | None = streamed.aiter()
        else:
            body = request.content
            data = _slices(body) if len(body) > _SLICE else (body or None)
        headers = dict(request.headers)
        try:
            async with self._get_session().request(
                request.method,
                str(request.url),
                headers=headers,
                data=data,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                content = bytearray()
                while chunk := await response.content.read(_SLICE):
                    content += chunk
                    if len(content) > self._max_response:
                        # No API answer is this big: stop reading (a misbehaving upstream must not fill memory).
                        raise httpx.ReadError(f"answer larger than {self._max_response} bytes", request=request)
                return httpx.Response(
                    response.status,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
                    content=bytes(content),
                    request=request,
                )
        except aiohttp.ConnectionTimeoutError as exc:  # connect / pool timeout: nothing was sent
            raise httpx.ConnectTimeout(str(exc) or "connect timeout", request=request) from exc
        except aiohttp.ClientConnectorError as exc:  # refused, unreachable, DNS, TLS handshake
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.SocketTimeoutError as exc:  # sent; no answer within the read timeout
            raise httpx.ReadTimeout(str(exc) or "read timeout", request=request) from exc
        except aiohttp.ServerDisconnectedError as exc:  # sent; the server closed without answering
            raise httpx.RemoteProtocolError(str(exc) or "server disconnected", request=request) from exc
        except aiohttp.ClientResponseError as exc:  # sent; the answer was not valid HTTP
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:  # reset while sending or reading
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
