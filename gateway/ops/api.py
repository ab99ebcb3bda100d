"""The message API on the operator endpoint (aiohttp.web): the ledger's records as JSON for scripts.

    GET /api/v1/messages/{id}    one record (local id, or the id a 250 named, or an upstream id)
                                 200 the record | 300 several messages share that upstream id (a DMDS batch)
                                 | 404 none
    GET /api/v1/messages?...     search: id, reply_id, upstream_id, message_id, sender, recipient, login,
                                 account, state, since, until; limit (<= 500, 50), cursor (the last page's
                                 `next`); newest first, records without their timelines
    GET /api/v1/suppressions?account=&address=   the suppression lists
    DELETE /api/v1/suppressions/{address}?account=   take an address off them (every account's by default)

Every route needs `Authorization: Bearer <token>` (gateway/ops/apiauth.py): 401 with WWW-Authenticate when
it is missing or wrong, 429 while the client IP is locked out. With no tokens configured every /api/ path
answers 404 with a JSON error saying how to enable it. Errors are JSON: {"error": code, "message": text}.
Every answer says `Cache-Control: no-store`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from gateway.ledger.model import MAX_LIMIT, BadQuery, Query, address_key
from gateway.ledger.query import parse_query
from gateway.ledger.returns import ReturnStore
from gateway.ledger.store import LedgerStore, LedgerUnavailable
from gateway.ledger.suppression import SuppressionSet
from gateway.limits.clients import LogSampler
from gateway.ops.apiauth import TokenAuth
from gateway.ops.metrics import API_REQUESTS, INTERNAL_ERRORS

log = structlog.get_logger("gateway.api")

Handler = Callable[[web.Request, str], Awaitable[web.Response]]
NOT_ENABLED = (
    "the message API is not enabled: add an [[http.api_tokens]] table (name, and token_hash made by "
    "`smtp-gateway hash-password` from the token) to the configuration, then reload (SIGHUP)"
)
CHALLENGE = 'Bearer realm="smtp-gateway"'


def error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


class MessageApi:
    def __init__(
        self,
        ledger: LedgerStore,
        auth: TokenAuth,
        returns: ReturnStore | None = None,
        suppressions: SuppressionSet | None = None,
    ) -> None:
        self.ledger = ledger
        self.auth = auth
        self.returns = returns
        self.suppressions = suppressions  # this instance's copy: a removal applies to it at once
        # A locked-out client's requests cost no hash: one line a minute per address (as SMTP's auth_locked_out),
        # each one counted in smtp_gateway_api_auth_total{result="locked_out"}.
        self._sampler = LogSampler()

    def install(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/messages", self._guarded("messages", self.search))
        app.router.add_get("/api/v1/messages/{id}", self._guarded("message", self.one))
        if self.returns is not None:
            app.router.add_get("/api/v1/suppressions", self._guarded("suppressions", self.suppressed))
            app.router.add_delete("/api/v1/suppressions/{address}", self._guarded("suppression", self.unsuppress))
        app.router.add_route("*", "/api/{tail:.*}", self._guarded("other", self.unknown))

    def _guarded(self, route: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def guarded(request: web.Request) -> web.Response:
            response = await self._answer(request, handler)
            # Every answer, errors included: records carry addresses and subjects, which no cache between
            # the script and the gateway (nor the script's HTTP library) is to keep.
            response.headers["Cache-Control"] = "no-store"
            API_REQUESTS.labels(route=route, status=str(response.status)).inc()
            return response

        return guarded

    async def _answer(self, request: web.Request, handler: Handler) -> web.Response:
        if not self.auth.enabled:
            return error(404, "not_enabled", NOT_ENABLED)
        client = request.remote or ""
        verdict = await self.auth.check(request.headers.get("Authorization"), client)
        if verdict.result == "locked_out":
            suppressed = self._sampler.allow(client)
            if suppressed is not None:
                log.warning(
                    "api_auth_locked_out", client=client, retry_after=round(verdict.retry_after), suppressed=suppressed
                )
            response = error(429, "too_many_failures", "too many failed tokens from this address; try again later")
            response.headers["Retry-After"] = str(max(1, round(verdict.retry_after)))
            return response
        if verdict.result != "ok" or verdict.name is None:
            if verdict.result == "invalid":
                log.warning("api_auth_failed", client=client, path=request.path)
            response = error(
                401,
                "unauthorized",
                "send Authorization: Bearer <token>" if verdict.result == "missing" else "the token was refused",
            )
            response.headers["WWW-Authenticate"] = CHALLENGE + (
                ', error="invalid_token"' if verdict.result == "invalid" else ""
            )
            return response
        try:
            response = await handler(request, verdict.name)
        except BadQuery as exc:
            response = error(400, "bad_request", str(exc))
        except LedgerUnavailable as exc:
            log.error("api_ledger_unavailable", error=exc.reason)
            response = error(503, "unavailable", "the message ledger cannot be read now; try again")
        except Exception as exc:  # a bug: once with its traceback, counted; the client gets a plain 500
            INTERNAL_ERRORS.labels(where="api").inc()
            log.error("api_internal_error", token=verdict.name, path=request.path, exc_info=exc)
            response = error(500, "internal_error", "internal error (logged as api_internal_error)")
        log.info("api_request", token=verdict.name, client=client, path=request.path, status=response.status)
        return response

    async def one(self, request: web.Request, who: str) -> web.Response:
        ident = request.match_info["id"].strip()
        record = await self.ledger.get(ident) if len(ident) == 16 else None
        if record is None:
            for by in ("reply_id", "upstream_id"):
                page = await self.ledger.find(Query(**{by: ident}, limit=MAX_LIMIT))  # type: ignore[arg-type]
                if len(page.records) == 1:
                    record = await self.ledger.get(page.records[0].id)
                    break
                if page.records:
                    return error(
                        300,
                        "ambiguous",
                        f"{len(page.records)} messages have {by.replace('_', ' ')} {ident} (a batch): pick one "
                        "by its local id",
                        messages=[r.to_json(full=False) for r in page.records],
                    )
        if record is None:
            what = "a local id, a 250's id or an upstream id"
            return error(404, "not_found", f"no message {ident} in the ledger ({what})")
        return web.json_response(record.to_json())

    async def search(self, request: web.Request, who: str) -> web.Response:
        query = parse_query(dict(request.query))
        page = await self.ledger.find(query)
        return web.json_response(
            {
                "messages": [r.to_json(full=False) for r in page.records],
                "next": page.next.encode() if page.next else None,
                "limit": query.limit,
                "filters": dict(query.filters),
            }
        )

    async def suppressed(self, request: web.Request, who: str) -> web.Response:
        assert self.returns is not None
        unknown = sorted(set(request.query) - {"account", "address"})
        if unknown:
            raise BadQuery(f"unknown parameter {', '.join(unknown)} (filters: account, address)")
        entries = await self.returns.suppressions(request.query.get("account") or None)
        address = address_key(request.query.get("address") or "")  # as stored: lower case, IDNA domain
        if address:
            entries = [e for e in entries if e.address == address]
        return web.json_response({"suppressions": [e.to_json() for e in entries]})

    async def unsuppress(self, request: web.Request, who: str) -> web.Response:
        assert self.returns is not None
        unknown = sorted(set(request.query) - {"account"})
        if unknown:
            raise BadQuery(f"unknown parameter {', '.join(unknown)} (filters: account)")
        address, account = request.match_info["address"], request.query.get("account") or None
        removed = await self.returns.unsuppress(address, account)
        if self.suppressions is not None:
            self.suppressions.remove(address, account)
        log.info("api_suppression_removed", token=who, address=address, account=account, removed=removed)
        if not removed:
            return error(404, "not_found", f"{address} is not suppressed" + (f" in {account}" if account else ""))
        return web.json_response({"address": address.strip().lower(), "account": account, "removed": removed})

    async def unknown(self, request: web.Request, who: str) -> web.Response:
        return error(404, "not_found", f"no such API route: {request.method} {request.path}")
