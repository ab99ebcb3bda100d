"""The DMDS half of `smtp-gateway sandbox`: send_one_inline / send_many_inline, campania_apikey, the campaign
listing and the version call (its events and contacts: sandbox_events.py).

It checks the Authorization key (403), the required fields and every address (with DMDS-style
messages), answers with a fresh eeid (or the given one with reuse_eeid), and fails on demand (faults).
Answers use the spelling of the sandbox's shape (gateway/providers/sandbox.py):

    answer              seed                                        alt
    send                {"status":"ok","sent":2,"eeid":E}           {"status":"ok","sent":"2","envio_efectivo_id":E}
    refusal             {"status":"err","on":R}                     {"status":"error","msg":R}
    campania_apikey     {"status":"ok","numid":N,"camp_apikey":K}   {"status":"ok","numid":N,"apikey":K}
    GET /v1/campania/   {"status":"ok","campanias":[{numid,tipo}]}  [{"camp_numid":N,"type":"api",...}]
    GET /v1/version/    {"status":"ok","version":"1.5"}             {"version":"v1.5"}

    POST /_sandbox/dmds  {"unsent": ["a@example.com"], "listing": false}   GET: the current settings
        unsent: recipients taken but not sent (`sent` counts them out, as DMDS does for bad addresses);
        listing: false answers the campaign listing 404 (as if the path did not exist)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.providers.dmds.sandbox_events import (
    CONTACT_LISTS,
    contact_list,
    install_events,
    record_send,
    send_addresses,
)
from gateway.providers.sandbox import Sandbox, Shape, email_error, json_response

SEND_PATHS = ("/v1/envio/send_one_inline/", "/v1/envio/send_many_inline/")


VERSION = "1.5"


@dataclass
class DmdsSandbox:
    apikey: str = "sandbox-account-apikey"
    campaigns: dict[int, str] = field(default_factory=dict)  # numid -> campaign apikey; empty: any numid
    sender_domains: set[str] = field(default_factory=set)  # empty: any sender domain
    unsent: set[str] = field(default_factory=set)  # recipients accepted but not sent (counted out of `sent`)
    listing: bool = True  # False: GET /v1/campania/ answers 404

    def settings(self) -> dict[str, Any]:
        return {"unsent": sorted(self.unsent), "listing": self.listing, "campaigns": sorted(self.campaigns)}

    def update(self, spec: dict[str, Any]) -> None:
        if "unsent" in spec:
            self.unsent = {str(a).lower() for a in spec["unsent"]}
        if "listing" in spec:
            self.listing = bool(spec["listing"])


def _err(reason: str, status: int = 400, shape: Shape = "seed") -> web.Response:
    if shape == "alt":
        return json_response({"status": "error", "msg": reason}, status)
    return json_response({"status": "err", "on": reason}, status)


def _check_email(value: object, what: str) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{what} missing"
    return email_error(value)


def validate_send(body: Any, state: DmdsSandbox, many: bool) -> str | None:
    """DMDS-style validation of a send body; returns the error text or None."""
    if not isinstance(body, dict):
        return "JSON object expected"
    if not isinstance(body.get("campana_id"), int):
        return "campana_id missing or not numeric"
    if state.campaigns and body["campana_id"] not in state.campaigns:
        return f"campana {body['campana_id']} inexistente"
    if body.get("email") is not True:
        return "email must be true"
    if not isinstance(body.get("html"), str) or not body["html"]:
        return "html missing"
    contacts = contact_list(body, many)
    if not isinstance(contacts, list) or not contacts:
        return "contactos missing" if many else "contacto missing"
    for contact in contacts:
        if not isinstance(contact, dict):
            return "contacto must be an object"
        # One contact's bad address refuses a send_one; a send_many sends to the others, with a lower `sent`
        # (the seed: "the number of emails sent ... may be less than the number of specified recipients").
        if not many and (error := _check_email(contact.get("email"), "contacto email")):
            return error
    for key, sub in (("copia", "cc_email"), ("copia_oculta", "bcc_email")):
        for item in body.get(key) or []:
            if not isinstance(item, dict) or (error := _check_email(item.get(sub), sub)):
                return error or f"{key} items must be objects"
    if "remitente" in body:
        if error := _check_email(body["remitente"], "remitente"):
            return error.replace("invalid email", "remitente invalido")
        domain = str(body["remitente"]).rpartition("@")[2].lower()
        if state.sender_domains and domain not in state.sender_domains:
            return "dominio remitente no permitido"
    if "reply-to" in body and (error := _check_email(body["reply-to"], "reply-to")):
        return error
    for att in body.get("adjuntos") or []:
        if not isinstance(att, dict) or not att.get("nombre") or not isinstance(att.get("contenido"), str):
            return "adjuntos items need nombre and contenido"
    if body.get("reuse_eeid") and not body.get("eeid"):
        return "reuse_eeid needs eeid"
    return None


def without_bad_addresses(body: dict[str, Any], many: bool) -> tuple[dict[str, Any], set[str]]:
    """A send_many without its contacts whose address DMDS would not take, and those addresses (lower case):
    they are neither sent nor counted in `sent`."""
    if not many:
        return body, set()
    key = next(k for k in CONTACT_LISTS if k in body)
    bad = [c for c in body[key] if _check_email(c.get("email"), "contacto email")]
    if not bad:
        return body, set()
    return {**body, key: [c for c in body[key] if c not in bad]}, {str(c.get("email")).lower() for c in bad}


def _count_sent(body: dict[str, Any], many: bool, unsent: set[str]) -> int:
    """Mails the call sends: every contact and copy (DMDS counts copies [V]) but the ones it does not send."""
    return sum(1 for a in send_addresses(body, many) if a.lower() not in unsent)


def redact(body: dict[str, Any]) -> dict[str, Any]:
    """What is printed and written: attachment contents shortened."""
    if isinstance(body.get("adjuntos"), list):
        body = {
            **body,
            "adjuntos": [
                {**a, "contenido": f"<{len(str(a.get('contenido', '')))} base64 chars>"} if isinstance(a, dict) else a
                for a in body["adjuntos"]
            ],
        }
    return body


def _campaign(numid: int, shape: Shape) -> dict[str, Any]:
    """One API campaign as the listing shows it."""
    if shape == "alt":
        return {"camp_numid": numid, "name": f"Campaign {numid}", "type": "api", "created": "2024-08-21T10:00:00"}
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_OID, str(numid))),
        "numid": numid,
        "nombre": f"Campaign {numid}",
        "tipo": "api",
    }


def install(sandbox: Sandbox, state: DmdsSandbox) -> None:
    """Add the DMDS routes to a sandbox."""

    def authorized(request: web.Request) -> bool:
        return request.headers.get("Authorization") == state.apikey

    def err(reason: str, status: int = 400) -> web.Response:
        return _err(reason, status, sandbox.state.shape)

    async def send(request: web.Request) -> web.StreamResponse:
        many = request.path.endswith("send_many_inline/")
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except ValueError:
            body = None
        entry: dict[str, Any] = {"kind": "send", "provider": "dmds", "path": request.path, "body": body}
        faulted = await sandbox.apply_fault(request, entry, err)
        if faulted is not None:
            return faulted
        if not authorized(request):
            return sandbox.answer(entry, err("APIKEY invalida", 403), error="APIKEY invalida")
        if body is None:
            return sandbox.answer(entry, err("invalid JSON"), error="invalid JSON")
        if error := validate_send(body, state, many):
            return sandbox.answer(entry, err(error), error=error)
        eeid = body["eeid"] if body.get("reuse_eeid") else str(uuid.uuid4())
        # Counted out: the recipients set as unsent, and those whose fate is not to be sent (fates.py).
        sendable, _ = without_bad_addresses(body, many)
        sent = _count_sent(sendable, many, state.unsent | record_send(sandbox, sendable, many, eeid))
        entry["upstream_id"] = eeid  # whatever the shape calls it
        if sandbox.state.shape == "alt":
            return sandbox.answer(entry, json_response({"status": "ok", "sent": str(sent), "envio_efectivo_id": eeid}))
        return sandbox.answer(entry, json_response({"status": "ok", "sent": sent, "eeid": eeid}))

    async def campaign_apikey(request: web.Request) -> web.StreamResponse:
        numid_text = request.match_info["numid"]
        sandbox.state.lookups.append(numid_text)
        entry: dict[str, Any] = {"kind": "lookup", "provider": "dmds", "path": request.path}
        if not authorized(request):
            return sandbox.answer(entry, err("APIKEY invalida", 403), error="APIKEY invalida")
        faulted = await sandbox.apply_fault(request, entry, err)
        if faulted is not None:
            return faulted
        try:
            numid = int(numid_text)
        except ValueError:
            return sandbox.answer(entry, err("numid must be numeric"), error="numid must be numeric")
        key = state.campaigns.get(numid)
        if key is None:
            error = f"campana {numid} inexistente o no es de tipo API"
            return sandbox.answer(entry, err(error, 404), error=error)
        # The apikey is a secret: the record shows that it was answered, not what it was.
        name = "apikey" if sandbox.state.shape == "alt" else "camp_apikey"
        return sandbox.answer(
            entry,
            json_response({"status": "ok", "numid": numid, name: key}),
            response_body={"status": "ok", "numid": numid, name: "<redacted>"},
        )

    async def campaigns(request: web.Request) -> web.StreamResponse:
        """GET /v1/campania/ with its filters in a JSON body (the seed's curl) or the query."""
        raw = await request.read()
        try:
            filters = orjson.loads(raw) if raw else {}
        except ValueError:
            filters = None
        if not isinstance(filters, dict):
            filters = {}
        filters = {**request.query, **filters}
        entry: dict[str, Any] = {"kind": "listing", "provider": "dmds", "path": request.path, "body": filters}
        if not authorized(request):
            return sandbox.answer(entry, err("APIKEY invalida", 403), error="APIKEY invalida")
        if (faulted := await sandbox.apply_fault(request, entry, err)) is not None:
            return faulted
        if not state.listing:
            return sandbox.answer(entry, web.Response(status=404, text="Not Found"), error="no listing")
        wanted = filters.get("numid")
        if wanted is not None and not str(wanted).isdigit():
            return sandbox.answer(entry, err("numid must be numeric"), error="numid must be numeric")
        if str(filters.get("tipo", "api")) != "api":
            numids: list[int] = []  # the sandbox's campaigns are all of type api
        elif wanted is not None:
            numids = [int(wanted)] if not state.campaigns or int(wanted) in state.campaigns else []
        else:
            numids = sorted(state.campaigns)
        items = [_campaign(n, sandbox.state.shape) for n in numids]
        answer: Any = items if sandbox.state.shape == "alt" else {"status": "ok", "campanias": items}
        return sandbox.answer(entry, json_response(answer))

    async def version(request: web.Request) -> web.StreamResponse:
        entry: dict[str, Any] = {"kind": "version", "provider": "dmds", "path": request.path}
        if not authorized(request):
            return sandbox.answer(entry, err("APIKEY invalida", 403), error="APIKEY invalida")
        if (faulted := await sandbox.apply_fault(request, entry, err)) is not None:
            return faulted
        if sandbox.state.shape == "alt":
            return sandbox.answer(entry, json_response({"version": f"v{VERSION}"}))
        return sandbox.answer(entry, json_response({"status": "ok", "version": VERSION}))

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST":
            state.update(await request.json())
        return json_response(state.settings())

    for path in SEND_PATHS:
        sandbox.app.router.add_post(path, send)
    sandbox.app.router.add_get("/v1/campania_apikey/{numid}", campaign_apikey)
    sandbox.app.router.add_get("/v1/campania/", campaigns)
    sandbox.app.router.add_get("/v1/version/", version)
    sandbox.app.router.add_post("/_sandbox/dmds", control)
    sandbox.app.router.add_get("/_sandbox/dmds", control)
    install_events(sandbox, authorized, err)
    sandbox.redactors.append(redact)
