"""HttpClient: one per upstream account, shared by every session and the retry worker.

Every failure is classified by when it happened, because that decides whether resending is safe:

    nothing sent (refused, unreachable, connect or pool timeout, TLS failure)  -> UpstreamUnavailable
    sent, no complete answer (read timeout, reset or close after sending)      -> AnswerLost
    an answer                                                                  -> HttpResponse (any status)

Write errors and timeouts count as "nothing sent" while the body's last piece has not been handed over: an
upstream cannot act on a request it did not receive whole; after that, they are "answer lost". Each call is
bounded as a whole (gateway.upstream.upload): an upstream that stops reading cannot hold it for ever.

A request waits for one of the account's `max_connections` first (here, not inside the transport), so
that its `before_send` (the delivery owner's fencing check) runs after every wait and right before the
request is written. It takes its rate limit slot (`limiter`) only then, holding the connection: a slot is a
moment, and slots taken by calls still waiting for a connection (a slow upstream holding them all) would
be spent together the instant connections free up, up to `max_connections` requests at once, far past
`rate_burst`. Holding a connection while waiting for the slot costs nothing the rate does not already
impose, with two limits: calls waiting for slots hold at most `max_connections - 1` connections (one
while `max_connections` is 1), so a call that takes no slot (DMDS' campania_apikey for an SMTP-API AUTH,
check-upstream's reads) is never queued behind a 429's pause; and only calls that take a slot themselves
wait out the slot waiters past the pool timeout (a call without a limiter gets its pool timeout as always).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Literal

import httpx
from prometheus_client import Histogram

from gateway.config.urls import without_urls
from gateway.core.errors import AnswerInvalid, AnswerLost, AnswerTooLarge, UpstreamUnavailable
from gateway.mime import jsonbody
from gateway.ops.metrics import OUTBOUND_SECONDS, UPSTREAM_SECONDS
from gateway.upstream.aiohttp_transport import AiohttpTransport, NotHttp, OverLimit, slices
from gateway.upstream.ratelimit import RateLimiter
from gateway.upstream.response import HttpResponse
from gateway.upstream.upload import Upload

TransportKind = Literal["httpx", "aiohttp"]
_OUTCOMES = {2: "ok", 4: "client_error", 5: "server_error"}
# No API answer the gateway reads is anywhere near this: a bigger one is a misbehaving upstream (or a proxy's
# error page gone wrong) and is not read into memory.
MAX_RESPONSE = 1 << 20
_URLS_MAX = 256
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteError, httpx.WriteTimeout)


def make_transport(
    max_connections: int, kind: TransportKind = "aiohttp", ssl_context: ssl.SSLContext | None = None
) -> httpx.AsyncBaseTransport:
    if kind == "aiohttp":
        # aiohttp's client costs a fraction of httpx's own transport's CPU per request (docs/development/benchmarks.md).
        return AiohttpTransport(max_connections, ssl_context=ssl_context)
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=15.0
    )
    return httpx.AsyncHTTPTransport(limits=limits, trust_env=False, verify=ssl_context or True)


class HttpClient:
    """Requests to one upstream base URL over one pooled transport (driven directly: httpx's client
    layers, cookies, redirects and auth flows, cost CPU on every request and none applies here)."""

    def __init__(
        self,
        base_url: str,
        *,
        upstream: str,
        account: str,
        timeout: float,
        max_connections: int = 50,
        transport: TransportKind | httpx.AsyncBaseTransport = "aiohttp",
        ca_file: Path | None = None,
        vendor: bool = True,
    ) -> None:
        """`ca_file`: CA certificates (PEM) to trust instead of the system's (a private CA). `vendor`: an
        account's upstream, timed in smtp_gateway_upstream_seconds{account}; else (webhooks, JWKS) in
        smtp_gateway_outbound_http_seconds{client}, so that an account's figures and alert hold its vendor's
        calls only."""
        self.base_url = base_url.rstrip("/")
        self.upstream = upstream  # "DMDS", "dEngage": for log reasons
        self.account = account
        self.vendor = vendor
        self._timeout = self.timeouts(timeout)
        context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
        self._transport = (
            transport
            if isinstance(transport, httpx.AsyncBaseTransport)
            else make_transport(max_connections, transport, context)
        )
        # Metric children by (endpoint, outcome), bound once: labels() costs a lock and a dict walk per call.
        self._metrics: dict[tuple[str, str], Histogram] = {}
        # One per connection of the pool: a request holding one never waits inside the transport.
        self._connections = asyncio.Semaphore(max_connections)
        # How many holders of a connection are waiting for their rate slot (not sending): see _connection().
        self._for_slot = 0
        # Taken before a connection by calls with a limiter, given back once their slot is taken: slot waiters
        # never hold the last connection (while there are two or more), left for calls that take no slot.
        self._slot_waiters = asyncio.Semaphore(max(1, max_connections - 1))
        # Each path's URL parsed once (httpx parses a string URL for every request); bounded, in case a path
        # carries ids.
        self._urls: dict[str, httpx.URL] = {}

    async def request(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        content: bytes | jsonbody.Body | Callable[[], bytes | jsonbody.Body] | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        timeout: float | None = None,
        keep: int | None = None,
        limiter: RateLimiter | None = None,
    ) -> HttpResponse:
        """One call; `endpoint` is a short stable name for metrics ("send_one", "login", ...). A `Body` (a JSON
        body with large blobs) is streamed from its pieces, with its Content-Length. `before_send` runs once
        a connection is free, right before the request goes; what it raises, the request does not send. A
        callable `content` is called for the body only then (after `before_send`): callers with many requests
        waiting for a connection (one per recipient) hold at most as many bodies as there are connections.
        `timeout`: this call's (the client's otherwise). `keep`: only the answer body's first `keep` bytes
        are read and returned, the rest never (for a caller that needs its status and a few words of it: a
        big body is then no AnswerTooLarge). `limiter`: the account's rate limit, whose slot is taken once the
        connection is free (before `before_send`); what it raises (RateLimited), the request does not send."""
        limits = self._timeout if timeout is None else self.timeouts(timeout)
        if limiter is None:
            await self._connection(endpoint, limits["pool"], behind_rate=False)
        else:
            await self._connection_and_slot(endpoint, limits["pool"], limiter)
        try:
            if before_send is not None:
                await before_send()
            body = content() if callable(content) else content
            return await self._send(endpoint, method, path, headers, body, limits, keep)
        finally:
            self._connections.release()

    async def _connection_and_slot(self, endpoint: str, pool: float, limiter: RateLimiter) -> None:
        """A connection, then the rate slot while holding it (the request goes within the slot's moment). The
        wait for a turn among slot waiters has no timer: its holders wait for a connection (with one) or for
        the rate. On any failure the connection is given back."""
        async with self._slot_waiters:
            await self._connection(endpoint, pool, behind_rate=True)
            self._for_slot += 1
            try:
                await limiter.acquire()
            except BaseException:  # RateLimited, a cancellation: the request does not go
                self._connections.release()
                raise
            finally:
                self._for_slot -= 1

    async def _connection(self, endpoint: str, pool: float, *, behind_rate: bool) -> None:
        """One of the connections, or UpstreamUnavailable when every one stayed busy for `pool` seconds. For a
        call that takes a rate slot itself (`behind_rate`), a wait behind holders waiting for their rate slots
        is the rate's, as long as the rate makes it (it was, when calls took their slots before a connection):
        the timer then starts again. A call without a limiter is not held by the rate: its pool timeout stands
        (and slot waiters leave it a connection: _slot_waiters)."""
        if not self._connections.locked():
            await self._connections.acquire()  # free: no timer needed
            return
        started = time.perf_counter()
        while True:
            try:
                async with asyncio.timeout(pool):
                    await self._connections.acquire()
                return
            except TimeoutError:
                if not (behind_rate and self._for_slot):
                    self._observe(endpoint, "not_sent", time.perf_counter() - started)
                    raise UpstreamUnavailable(
                        f"{self.upstream}: no free connection within {pool:g}s, request not sent"
                    ) from None

    async def _send(
        self,
        endpoint: str,
        method: str,
        path: str,
        headers: dict[str, str],
        content: bytes | jsonbody.Body | None,
        limits: dict[str, float],
        keep: int | None = None,
    ) -> HttpResponse:
        if isinstance(content, jsonbody.Body):
            headers = {**headers, "Content-Length": str(len(content))}
        started = time.perf_counter()
        outcome = "answer_lost"
        try:
            status, answer_headers, body = await self._exchange(method, path, headers, content, limits, keep)
        except _NOT_SENT as exc:
            outcome = "not_sent"
            raise UpstreamUnavailable(
                f"{self.upstream} unreachable, request not sent ({type(exc).__name__}: {_said(exc)})"
            ) from exc
        except OverLimit as exc:
            raise AnswerTooLarge(f"{self.upstream} answered with more than {MAX_RESPONSE} bytes, not read") from exc
        except httpx.ReadTimeout as exc:
            raise AnswerLost(
                f"{self.upstream} sent no answer in time after the request was sent ({_said(exc)})"
            ) from exc
        except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
            if _not_http(exc):
                raise AnswerInvalid(
                    f"{self.upstream} answered with something that is not HTTP after the request was sent"
                    f" ({_said(exc)})"
                ) from exc
            raise AnswerLost(
                f"{self.upstream} connection lost after the request was sent ({type(exc).__name__}: {_said(exc)})"
            ) from exc
        except httpx.DecodingError as exc:
            # A body its Content-Encoding cannot undo (a corrupt gzip): the request went, the answer is
            # unreadable; as lost as aiohttp's payload errors, which its transport maps to ReadError.
            raise AnswerLost(
                f"{self.upstream} answered with a body that cannot be decoded after the request was sent ({_said(exc)})"
            ) from exc
        else:
            outcome = _OUTCOMES.get(status // 100, "server_error")
        finally:
            self._observe(endpoint, outcome, time.perf_counter() - started)
        return HttpResponse(status=status, body=body, headers=answer_headers)

    async def _exchange(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        content: bytes | jsonbody.Body | None,
        limits: dict[str, float],
        keep: int | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """The status, the answer's headers (names lower-cased, a header sent twice: its values joined by
        ", ") and body. Over aiohttp without httpx's request and response objects, which only cost CPU there."""
        if isinstance(self._transport, AiohttpTransport):
            status, raw_headers, body = await self._transport.exchange(
                method,
                self.base_url + path,
                headers,
                content.aiter() if isinstance(content, jsonbody.Body) else content,
                limits,
                keep=keep,
            )
            joined: dict[str, str] = {}
            for name, value in raw_headers:
                key = name.lower()
                joined[key] = f"{joined[key]}, {value}" if key in joined else value
            return status, joined, body
        # The body through an Upload, as the aiohttp transport does: the call is bounded as a whole (httpx's
        # timeouts are per read and per write), and a write that fails once the last piece was handed over
        # failed on a request that may be whole at the upstream.
        if isinstance(content, jsonbody.Body):
            pieces: AsyncIterator[bytes] | None = content.aiter()
        elif content:
            pieces = slices(content)
            headers = {**headers, "Content-Length": str(len(content))}
        else:
            pieces = None
        upload = Upload(limits, body=pieces is not None)
        request = httpx.Request(
            method,
            self._url(path),
            headers=headers,
            content=upload.pieces(pieces) if pieces is not None else None,
            extensions={"timeout": limits},
        )
        try:
            async with upload.bound:
                response = await self._transport.handle_async_request(request)
                try:
                    body = await _read_capped(response, MAX_RESPONSE, keep)
                finally:
                    await response.aclose()
        except TimeoutError:  # the call's deadline (httpx's own timeouts raise httpx's errors)
            if upload.complete:
                raise httpx.ReadTimeout("no complete answer before the call's deadline", request=request) from None
            raise httpx.WriteTimeout("request body not written before the call's deadline", request=request) from None
        except (httpx.WriteError, httpx.WriteTimeout) as exc:
            if upload.complete:  # the last piece was being written: the upstream may have it whole
                raise httpx.ReadError(f"{type(exc).__name__} after the whole request was handed over: {exc}") from exc
            raise
        except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
            if not upload.complete:  # httpcore reads for an early answer when a write fails: the body never went whole
                raise httpx.WriteError(f"connection lost before the whole request went ({exc!r})") from exc
            raise
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}, body

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(self.base_url + path)
            if len(self._urls) < _URLS_MAX:
                self._urls[path] = url
        return url

    @staticmethod
    def timeouts(seconds: float) -> dict[str, float]:
        return {"connect": min(seconds, 10.0), "read": seconds, "write": seconds, "pool": seconds}

    def _observe(self, endpoint: str, outcome: str, seconds: float) -> None:
        child = self._metrics.get((endpoint, outcome))
        if child is None:
            child = self._metrics[(endpoint, outcome)] = (
                UPSTREAM_SECONDS.labels(account=self.account, endpoint=endpoint, outcome=outcome)
                if self.vendor
                else OUTBOUND_SECONDS.labels(client=self.account, endpoint=endpoint, outcome=outcome)
            )
        child.observe(seconds)

    async def aclose(self) -> None:
        await self._transport.aclose()


def _said(exc: BaseException) -> str:
    """An HTTP library's error text without the URLs it names (a hook's path, a vendor's query may be a key):
    reasons go to the logs, the ledger and the API. The aiohttp transport's texts carry none already; httpx's
    own transport's, and what one of them wraps, are cleaned here."""
    return without_urls(str(exc))


H11_REMOTE_ERROR = ("h11", "RemoteProtocolError")  # what the peer sent is not HTTP, in httpcore's parser


def _not_http(exc: BaseException) -> bool:
    """Whether a protocol error is an answer that is not HTTP, not a connection closed without one: the aiohttp
    transport says so by its class; httpx's, by the parser's (h11) error at the root of the chain."""
    seen: BaseException | None = exc
    while seen is not None:
        # h11 is httpcore's parser, not a dependency of the gateway's own: its error is known by its module.
        kind = type(seen)
        if isinstance(seen, NotHttp) or (kind.__module__.partition(".")[0], kind.__name__) == H11_REMOTE_ERROR:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _read_capped(response: httpx.Response, limit: int, keep: int | None = None) -> bytes:
    """The body, at most `limit` bytes (OverLimit past it); with `keep`, its first `keep` bytes and no more read
    (the response is closed unread: its connection is not reused)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if keep is not None and len(body) >= keep:
            return bytes(body[:keep])
        if len(body) > limit:
            raise OverLimit(f"answer larger than {limit} bytes")
    return bytes(body)
