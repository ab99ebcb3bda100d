"""The DMDS half of `smtp-gateway sandbox`: send_one_inline / send_many_inline and campania_apikey (its events
and contacts: sandbox_events.py).

It checks the Authorization key (403), the required fields and every address (with DMDS-style
messages), answers with a fresh eeid (or the given one with reuse_eeid), and fails on demand (faults).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.providers.dmds.sandbox_events import install_events, record_send
from gateway.providers.sandbox import Sandbox, email_error, json_response

SEND_PATHS = ("/v1/envio/send_one_inline/", "/v1/envio/send_many_inline/")


@dataclass
class DmdsSandbox:
    apikey: str = "sandbox-account-apikey"
    campaigns: dict[int, str] = field(default_factory=dict)  # numid -> campaign apikey; empty: any numid
    sender_domains: set[str] = field(default_factory=set)  # empty: any sender domain


def _err(reason: str, status: int = 400) -> web.Response:
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
    contacts = body.get("contactos") if many else [body.get("contacto")]
    if not isinstance(contacts, list) or not contacts:
        return "contactos missing" if many else "contacto missing"
    for contact in contacts:
        if not isinstance(contact, dict):
            return "contacto must be an object"
        if error := _check_email(contact.get("email"), "contacto email"):
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


def _count_sent(body: dict[str, Any], many: bool) -> int:
    contacts = len(body["contactos"]) if many else 1
    return contacts + len(body.get("copia") or []) + len(body.get("copia_oculta") or [])


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


def install(sandbox: Sandbox, state: DmdsSandbox) -> None:
    """Add the DMDS routes to a sandbox."""

    def authorized(request: web.Request) -> bool:
        return request.headers.get("Authorization") == state.apikey

    async def send(request: web.Request) -> web.StreamResponse:
        many = request.path.endswith("send_many_inline/")
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except ValueError:
            body = None
        entry: dict[str, Any] = {"kind": "send", "provider": "dmds", "path": request.path, "body": body}
        faulted = await sandbox.apply_fault(request, entry, lambda reason, status: _err(reason, status))
        if faulted is not None:
            return faulted
        if not authorized(request):
            return sandbox.answer(entry, _err("APIKEY invalida", 403), error="APIKEY invalida")
        if body is None:
            return sandbox.answer(entry, _err("invalid JSON"), error="invalid JSON")
        if error := validate_send(body, state, many):
            return sandbox.answer(entry, _err(error), error=error)
        eeid = body["eeid"] if body.get("reuse_eeid") else str(uuid.uuid4())
        sent = _count_sent(body, many) - record_send(sandbox, body, many, eeid)
        return sandbox.answer(entry, json_response({"status": "ok", "sent": sent, "eeid": eeid}))

    async def campaign_apikey(request: web.Request) -> web.StreamResponse:
        numid_text = request.match_info["numid"]
        sandbox.state.lookups.append(numid_text)
        entry: dict[str, Any] = {"kind": "lookup", "provider": "dmds", "path": request.path}
        if not authorized(request):
            return sandbox.answer(entry, _err("APIKEY invalida", 403), error="APIKEY invalida")
        faulted = await sandbox.apply_fault(request, entry, lambda reason, status: _err(reason, status))
        if faulted is not None:
            return faulted
        try:
            numid = int(numid_text)
        except ValueError:
            return sandbox.answer(entry, _err("numid must be numeric"), error="numid must be numeric")
        key = state.campaigns.get(numid)
        if key is None:
            error = f"campana {numid} inexistente o no es de tipo API"
            return sandbox.answer(entry, _err(error, 404), error=error)
        # The apikey is a secret: the record shows that it was answered, not what it was.
        return sandbox.answer(
            entry,
            json_response({"status": "ok", "numid": numid, "apikey": key}),
            response_body={"status": "ok", "numid": numid, "apikey": "<redacted>"},
        )

    for path in SEND_PATHS:
        sandbox.app.router.add_post(path, send)
    sandbox.app.router.add_get("/v1/campania_apikey/{numid}", campaign_apikey)
    install_events(sandbox, authorized, _err)
    sandbox.redactors.append(redact)
