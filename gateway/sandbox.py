"""A DMDS-compatible upstream for quick starts, tests and outage rehearsals, speaking real HTTP.

It checks the Authorization key (403), the required fields and every address (with DMDS-style
messages), answers with a fresh eeid, records every request, and fails on demand:

    POST /_sandbox/faults   {"status": 500, "count": 3}          next 3 sends answer 500
                            {"status": 429, "probability": 0.3}  30% of sends answer 429, until cleared
                            {"delay": 2.0, "count": 1}           next send answers after 2 s
                            {"mode": "timeout", "count": 1}      next send never answers
                            {"mode": "reset", "count": 1}        next send's connection is dropped
    DELETE /_sandbox/faults                                       clear all faults
    GET  /_sandbox/requests                                       every request recorded (JSON list)
    DELETE /_sandbox/requests                                     forget them
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import uuid
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

import orjson
from aiohttp import web
from email_validator import EmailNotValidError, validate_email

SEND_PATHS = ("/v1/envio/send_one_inline/", "/v1/envio/send_many_inline/")


@dataclass
class Fault:
    status: int | None = None
    mode: str | None = None  # "timeout" | "reset" | "err"
    delay: float = 0.0
    count: int | None = 1  # None: until cleared
    probability: float = 1.0
    reason: str = "sandbox fault"


@dataclass
class SandboxState:
    apikey: str
    campaigns: dict[int, str] = field(default_factory=dict)  # numid -> campaign apikey; empty: any numid
    sender_domains: set[str] = field(default_factory=set)  # empty: any sender domain
    latency: float = 0.0
    record_path: Path | None = None
    echo: TextIO | None = None
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100_000))
    faults: list[Fault] = field(default_factory=list)
    # campania_apikey lookups (numid per request), kept apart from the sends in `requests`.
    lookups: deque[int | str] = field(default_factory=lambda: deque(maxlen=100_000))
    rng: random.Random = field(default_factory=lambda: random.Random(1234))

    def next_fault(self) -> Fault | None:
        for fault in list(self.faults):
            if fault.probability < 1.0 and self.rng.random() >= fault.probability:
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
            return fault
        return None

    def record(self, entry: dict[str, Any]) -> None:
        self.requests.append(entry)
        if self.record_path is not None or self.echo is not None:
            line = json.dumps(_redacted(entry), ensure_ascii=False)
            if self.record_path is not None:
                with self.record_path.open("a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
            if self.echo is not None:
                self.echo.write(line + "\n")
                self.echo.flush()


def _redacted(entry: dict[str, Any]) -> dict[str, Any]:
    """What is printed and written: no key, and attachment contents shortened."""
    out = dict(entry)
    body = out.get("body")
    if isinstance(body, dict) and isinstance(body.get("adjuntos"), list):
        body = dict(body)
        body["adjuntos"] = [
            {**a, "contenido": f"<{len(str(a.get('contenido', '')))} base64 chars>"}
            if isinstance(a, dict)
            else a
            for a in body["adjuntos"]
        ]
        out["body"] = body
    return out


def _err(reason: str, status: int = 400) -> web.Response:
    return web.json_response({"status": "err", "on": reason}, status=status)


def _check_email(value: object, what: str) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{what} missing"
    return _email_error(value)


@lru_cache(maxsize=4096)
def _email_error(value: str) -> str | None:
    # Cached: the benchmark sends the same addresses thousands of times and the sandbox should
    # answer "at once" (bench/README.md).
    try:
        validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        return f"invalid email {exc}"
    return None


def validate_send(body: Any, state: SandboxState, many: bool) -> str | None:
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


class Sandbox:
    """The aiohttp application around a SandboxState."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in SEND_PATHS:
            self.app.router.add_post(path, self.send)
        self.app.router.add_get("/v1/campania_apikey/{numid}", self.campaign_apikey)
        self.app.router.add_get("/_sandbox/requests", self.list_requests)
        self.app.router.add_delete("/_sandbox/requests", self.clear_requests)
        self.app.router.add_post("/_sandbox/faults", self.add_fault)
        self.app.router.add_delete("/_sandbox/faults", self.clear_faults)
        self.app.router.add_get("/_sandbox/health", self.health)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == self.state.apikey

    async def send(self, request: web.Request) -> web.StreamResponse:
        many = request.path.endswith("send_many_inline/")
        fault = self.state.next_fault()
        if self.state.latency:
            await asyncio.sleep(self.state.latency)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.mode == "timeout":
                await asyncio.sleep(3600)
            if fault.mode == "reset":
                if request.transport is not None:
                    request.transport.abort()
                raise web.HTTPInternalServerError()
            if fault.status is not None:
                return _err(fault.reason, fault.status)
            if fault.mode == "err":
                return _err(fault.reason, 200)
        if not self._authorized(request):
            return _err("APIKEY invalida", 403)
        try:
            body = orjson.loads(await request.read())
        except ValueError:
            return _err("invalid JSON")
        if error := validate_send(body, self.state, many):
            self.state.record({"path": request.path, "body": body, "status": 400, "error": error})
            return _err(error)
        eeid = body["eeid"] if body.get("reuse_eeid") else str(uuid.uuid4())
        answer = {"status": "ok", "sent": _count_sent(body, many), "eeid": eeid}
        self.state.record({"path": request.path, "body": body, "status": 200, "response": answer})
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def campaign_apikey(self, request: web.Request) -> web.Response:
        self.state.lookups.append(request.match_info["numid"])
        if not self._authorized(request):
            return _err("APIKEY invalida", 403)
        fault = self.state.next_fault()
        if fault is not None and fault.status is not None:
            return _err(fault.reason, fault.status)
        try:
            numid = int(request.match_info["numid"])
        except ValueError:
            return _err("numid must be numeric")
        key = self.state.campaigns.get(numid)
        if key is None:
            return _err(f"campana {numid} inexistente o no es de tipo API", 404)
        return web.json_response({"status": "ok", "numid": numid, "apikey": key})

    async def list_requests(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.state.requests))

    async def clear_requests(self, request: web.Request) -> web.Response:
        self.state.requests.clear()
        return web.json_response({"status": "ok"})

    async def add_fault(self, request: web.Request) -> web.Response:
        spec = await request.json()
        fault = Fault(
            status=spec.get("status"),
            mode=spec.get("mode"),
            delay=float(spec.get("delay", 0.0)),
            count=spec.get("count", None if "probability" in spec else 1),
            probability=float(spec.get("probability", 1.0)),
            reason=str(spec.get("reason", "sandbox fault")),
        )
        self.state.faults.append(fault)
        return web.json_response({"status": "ok", "faults": len(self.state.faults)})

    async def clear_faults(self, request: web.Request) -> web.Response:
        self.state.faults.clear()
        return web.json_response({"status": "ok"})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "requests": len(self.state.requests)})

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()


async def run_forever(state: SandboxState, host: str, port: int) -> None:
    sandbox = Sandbox(state)
    bound = await sandbox.start(host, port)
    print(f"sandbox: DMDS-compatible upstream on http://{host}:{bound}", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sandbox.stop()
