"""The DMDS sandbox's event and contact routes, answered from what its sends recorded (gateway/providers/fates.py),
with the names of the gateway's wire table (eventwire.EVENT_WIRE: mostly unconfirmed, so the sandbox and
the gateway agree by construction; docs/after-250.md says what DMDS itself may name otherwise).

    GET /v1/ver_eventos/       JSON {desde, hasta, pagina, cantidad}: a page of the events between two
                               date-times (UTC), oldest first
    GET /v1/eeid/{eeid}        one batch's events
    GET /v1/contactos/invalidos/   the contacts invalidated by hard bounces (whitelisted ones never are)
    GET|POST|PUT|DELETE /v1/whitelist/{email}   check, add, remove
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from gateway.providers.dmds.eventwire import EVENT_WIRE, FIRST_PAGE
from gateway.providers.fates import Recorded
from gateway.providers.sandbox import Sandbox, json_response

STAMP = "%Y-%m-%dT%H:%M:%S"  # as the seed's contact events write times


def _event(e: Recorded) -> dict[str, Any]:
    out: dict[str, Any] = {
        "evento": e.name,
        "email": e.address,
        "timestamp": datetime.fromtimestamp(int(e.at), UTC).strftime(STAMP),
        "eeid": e.upstream_id,
    }
    if e.detail:
        out["detalle"] = e.detail
    return out


def _time(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return int(datetime.strptime(text, EVENT_WIRE["datetime"]).replace(tzinfo=UTC).timestamp())
    except ValueError:
        return None


CONTACT_LISTS = ("contactos", "contacts")  # the gateway's [I] word; the seed's own ("change contact to contacts")


def contact_list(body: dict[str, Any], many: bool) -> Any:
    """A send's contacts: send_many's list under either name, or send_one's single contact as a list."""
    if not many:
        return [body.get("contacto")]
    return next((body[key] for key in CONTACT_LISTS if key in body), None)


def send_addresses(body: dict[str, Any], many: bool) -> list[str]:
    """Every address a send names: its contacts and copies (DMDS counts copies in `sent` [V])."""
    addresses = [c["email"] for c in contact_list(body, many)]
    addresses += [c["cc_email"] for c in body.get("copia") or []]
    addresses += [c["bcc_email"] for c in body.get("copia_oculta") or []]
    return [str(a) for a in addresses]


def record_send(sandbox: Sandbox, body: dict[str, Any], many: bool, eeid: str) -> set[str]:
    """Record a send's events; returns the addresses (lower case) DMDS does not send (counted out of `sent`)."""
    return sandbox.state.fates.sent("dmds", eeid, send_addresses(body, many))


def install_events(
    sandbox: Sandbox, authorized: Callable[[web.Request], bool], err: Callable[..., web.Response]
) -> None:
    fates = sandbox.state.fates
    sandbox.polls.update({("dmds", "events"), ("dmds", "contacts")})  # read on a timer by the return path

    async def guarded(request: web.Request, kind: str, body: Any = None) -> tuple[dict[str, Any], web.Response | None]:
        entry: dict[str, Any] = {"kind": kind, "provider": "dmds", "path": request.path}
        if body is not None:
            entry["body"] = body
        if not authorized(request):
            return entry, sandbox.answer(entry, err("APIKEY invalida", 403), error="APIKEY invalida")
        return entry, await sandbox.apply_fault(request, entry, err)

    async def events(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else {}
        except ValueError:
            body = None
        entry, early = await guarded(request, "events", body)
        if early is not None:
            return early
        if not isinstance(body, dict):
            return sandbox.answer(entry, err("invalid JSON"), error="invalid JSON")
        page, size = body.get(EVENT_WIRE["page"]), body.get(EVENT_WIRE["size"])
        if not isinstance(page, int) or not isinstance(size, int) or isinstance(page, bool) or isinstance(size, bool):
            error = "pagina y cantidad deben ser numericos"  # [V] they must be numeric
            return sandbox.answer(entry, err(error), error=error)
        since, until = _time(body.get(EVENT_WIRE["since"])), _time(body.get(EVENT_WIRE["until"]))
        if since is None or until is None or page < FIRST_PAGE or size < 10:
            error = f"{EVENT_WIRE['since']}/{EVENT_WIRE['until']} YYYY-MM-DD HH:MM:SS, pagina >= 1, cantidad >= 10"
            return sandbox.answer(entry, err(error), error=error)
        found = fates.window("dmds", since, until)
        start = (page - FIRST_PAGE) * size
        items = [_event(e) for e in found[start : start + size]]
        entry["events"] = len(items)
        answer = {"status": "ok", EVENT_WIRE["page"]: page, EVENT_WIRE["size"]: size, "eventos": items}
        return sandbox.answer(entry, json_response(answer), response_body={**answer, "eventos": len(items)})

    async def batch(request: web.Request) -> web.StreamResponse:
        entry, early = await guarded(request, "events")
        if early is not None:
            return early
        eeid = request.match_info["eeid"]
        items = [_event(e) for e in fates.of_batch(eeid) if e.provider == "dmds"]
        return sandbox.answer(entry, json_response({"status": "ok", "eeid": eeid, "eventos": items}))

    async def invalid(request: web.Request) -> web.StreamResponse:
        entry, early = await guarded(request, "contacts")
        if early is not None:
            return early
        items = [
            {"email": a, "invalido": True, "actualizado": datetime.fromtimestamp(int(t), UTC).strftime(STAMP)}
            for a, t in sorted(fates.invalid.items())
        ]
        return sandbox.answer(entry, json_response({"status": "ok", "contactos": items}))

    async def whitelist(request: web.Request) -> web.StreamResponse:
        entry, early = await guarded(request, "whitelist")
        if early is not None:
            return early
        address = request.match_info["email"].strip().lower()
        if request.method in ("POST", "PUT"):
            fates.whitelist.add(address)
            fates.invalid.pop(address, None)  # a whitelisted contact is not invalid
        elif request.method == "DELETE":
            fates.whitelist.discard(address)
        listed = address in fates.whitelist
        text = f"{address} {'whitelisted' if listed else 'not whitelisted'}"
        return sandbox.answer(entry, json_response({"status": "ok", "msg": text}))

    router = sandbox.app.router
    router.add_route(EVENT_WIRE["events_method"], EVENT_WIRE["events"], events)
    router.add_get(EVENT_WIRE["batch"], batch)
    router.add_get(EVENT_WIRE["invalid"], invalid)
    for method in ("GET", "POST", "PUT", "DELETE"):
        router.add_route(method, EVENT_WIRE["whitelist"], whitelist)
