"""The dEngage half of `smtp-gateway sandbox`: login, froms and transactional email under /rest (the report:
sandbox_events.py).

It behaves as upstream-apis.md part 2 describes dEngage: the IP allowlist is checked first (403 with the
reason in `actionResult`), then a real per-second limit per client IP (429 with Retry-After, sliding
one-second window), then the bearer token (401 "Not auhenticated. Please re-login." for an expired or
unknown one); refusals come as HTTP 200 with a non-zero `code` and the vendor's messages; an accepted send
answers a transactional id for its recipient and a group id. Every request is recorded (kinds login,
froms, send); the password, tokens and attachment contents never appear in what is printed.

Answers use the spelling of the sandbox's shape (gateway/providers/sandbox.py):

    answer   seed                                                alt
    login    {"access_token","token_type","expires_in"}          {"code":0,"data":{"accessToken","expiresIn"}}
    froms    {"code":0,"data":[{"id","name","fromAddress",...}]} [{"Id","FromName","FromEmail","CreatedBy",...}]
    send     {"code":0,"data":{"transactionalIds":[T],"groupId"}} {"code":0,"data":{"trackingIds":[{"email",
                                                                  "trackingId":T}],"groupID"}}

Every identity also names the user who created it (`createdBy`, an address that is no sender).

A fault (POST /_sandbox/faults, "err" or a status) answers in the account's `fault_style`, the shapes a
real deployment may see although the vendor's examples do not show them (FAULT_STYLES):

    seed     {"code": 99 (or the status), "message": reason}
    pascal   {"Code": ..., "Message": reason, "Data": null}          (an ASP.NET PascalCase serialiser)
    flag     {"code": 0, "message": reason, "data": {"hasError": true}}   (camelCase)
    bare     {"message": reason}                                      (neither a code nor an id)
    html     a proxy's HTML page (text/html), whatever the status     (a proxy or load balancer)
    empty    no body at all                                           (the allowlist's 403 [C])

    POST /_sandbox/dengage   {"token_ttl": 5, "expire_tokens": true, "rate_limit": 30, "refuse_all": true,
                              "refused_ips": ["127.0.0.1"], "fail_to": {"b@example.com": 1},
                              "froms": ["Team <team@example.com>"], "send_expires_in": false,
                              "fault_style": "pascal"}
    GET  /_sandbox/dengage   the current settings
"""

from __future__ import annotations

import base64
import binascii
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any

import orjson
from aiohttp import web

from gateway.providers.dengage.sandbox_events import install_events, record_send
from gateway.providers.sandbox import Sandbox, email_error, json_response

PROVIDER = "dengage"
NOT_AUTHENTICATED = "Not auhenticated. Please re-login."  # [V] the typo is the vendor's
VALIDATION_CODE = 2  # the sandbox's non-zero code for a refused send (the vendor's numbers are unknown)
REDACTED = "<redacted>"
CREATED_BY = "admin@sandbox-users.example"  # who created the identities: an address that is no sender
FAULT_STYLES = ("seed", "pascal", "flag", "bare", "html", "empty")


@dataclass
class DengageSandbox:
    userkey: str = "sandbox-userkey"
    password: str = "sandbox-password"
    token_ttl: float = 3600.0
    send_expires_in: bool = True  # False: the login answer has no expires_in (clients assume 3600)
    froms: list[str] = field(default_factory=lambda: ["Sandbox Team <team@example.com>"])
    rate_limit: int | None = 30  # requests per second per client IP, all endpoints; None: no limit
    refuse_all: bool = False  # 403 "not whitelisted" for every caller
    refused_ips: set[str] = field(default_factory=set)
    fail_to: dict[str, int] = field(default_factory=dict)  # recipient -> sends to answer 503 first
    fault_style: str = "seed"  # how a fault's answer is written (FAULT_STYLES)
    tokens: dict[str, float] = field(default_factory=dict)  # token -> when it expires (clock)
    windows: dict[str, deque[float]] = field(default_factory=dict)  # client IP -> accepted request times
    clock: Callable[[], float] = time.monotonic

    def settings(self) -> dict[str, Any]:
        return {
            "token_ttl": self.token_ttl,
            "send_expires_in": self.send_expires_in,
            "froms": self.froms,
            "rate_limit": self.rate_limit,
            "refuse_all": self.refuse_all,
            "refused_ips": sorted(self.refused_ips),
            "fail_to": self.fail_to,
            "fault_style": self.fault_style,
            "tokens": len(self.tokens),
        }

    def update(self, spec: dict[str, Any]) -> None:
        if "token_ttl" in spec:
            self.token_ttl = float(spec["token_ttl"])
        if "send_expires_in" in spec:
            self.send_expires_in = bool(spec["send_expires_in"])
        if spec.get("expire_tokens"):
            self.tokens.clear()
        if "rate_limit" in spec:
            self.rate_limit = int(spec["rate_limit"]) if spec["rate_limit"] else None
        if "refuse_all" in spec:
            self.refuse_all = bool(spec["refuse_all"])
        if "refused_ips" in spec:
            self.refused_ips = {str(ip) for ip in spec["refused_ips"]}
        if "fail_to" in spec:
            self.fail_to = {str(k).lower(): int(v) for k, v in dict(spec["fail_to"]).items()}
        if "froms" in spec:
            self.froms = [str(f) for f in spec["froms"]]
        if "fault_style" in spec:
            if spec["fault_style"] not in FAULT_STYLES:
                raise ValueError(f"fault_style must be one of {', '.join(FAULT_STYLES)}")
            self.fault_style = str(spec["fault_style"])


def _refused(message: str, status: int = 200, code: int = VALIDATION_CODE) -> web.Response:
    return json_response({"code": code, "message": message}, status)


def _deserializer_error(path: str) -> web.Response:
    # What ASP.NET model binding answers for a wrong JSON type (C-TT saw one naming send.to).
    problem = f"The JSON value could not be converted to System.String. Path: $.{path}"
    return json_response(
        {"title": "One or more validation errors occurred.", "status": 400, "errors": {path: [problem]}}, 400
    )


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def validate_send(body: Any) -> web.Response | None:
    """The vendor's checks of a transactional email body, with its messages (upstream-apis.md §2.3)."""
    if not isinstance(body, dict):
        return json_response(
            {
                "title": "One or more validation errors occurred.",
                "status": 400,
                "errors": {"$": ["A JSON object is required."]},
            },
            400,
        )
    send = body.get("send")
    if not isinstance(send, dict) or not send:
        return _refused("Send can not be null")
    to = send.get("to")
    if to is not None and not isinstance(to, str):
        return _deserializer_error("send.to")
    if not to:
        return _refused("Send to can not be empty")
    if error := email_error(to):
        return _refused(f"{to} is not a valid email address ({error.removeprefix('invalid email ')})")
    content = body.get("content")
    if content is not None and not isinstance(content, dict):
        return _refused("Content is not valid")
    content = content or {}
    template = content.get("templateId") or content.get("contentId")
    if not template:
        if not isinstance(content.get("subject"), str) or not content["subject"].strip():
            return _refused("Subject cannot be empty")
        if not isinstance(content.get("html"), str) or not content["html"].strip():
            return _refused("Html content must be filled")
    if "current" in body and not _str_map(body["current"]):
        return _refused("Not a valid Current data")
    if "xHeaders" in body and not _str_map(body["xHeaders"]):
        return _refused("xHeaders must be an object of strings")
    if "tags" in body and not (isinstance(body["tags"], list) and all(isinstance(t, str) for t in body["tags"])):
        return _refused("Tags must be a list of strings")
    if "replyTo" in body and (not isinstance(body["replyTo"], str) or email_error(body["replyTo"])):
        return _refused("ReplyTo is not a valid email address")
    for item in body.get("attachments") or []:
        if not isinstance(item, dict) or not item.get("name") or not isinstance(item.get("content"), str):
            return _refused("Attachments need a name and base64 content")
        try:
            base64.b64decode(item["content"], validate=True)
        except (binascii.Error, ValueError):
            return _refused(f"Attachment {item['name']} is not base64")
    return None


def redact(body: dict[str, Any]) -> dict[str, Any]:
    """What is printed and written: attachment contents shortened (secrets are never recorded)."""
    if isinstance(body.get("attachments"), list):
        body = {
            **body,
            "attachments": [
                {**a, "content": f"<{len(str(a.get('content', '')))} base64 chars>"} if isinstance(a, dict) else a
                for a in body["attachments"]
            ],
        }
    return body


def install(sandbox: Sandbox, state: DengageSandbox) -> None:
    """Add the dEngage routes to a sandbox."""

    def fault_body(reason: str, status: int) -> web.Response:
        code, style = 99 if status == 200 else status, state.fault_style
        if style == "pascal":
            return json_response({"Code": code, "Message": reason, "Data": None}, status)
        if style == "flag":
            return json_response({"code": 0, "message": reason, "data": {"hasError": True}}, status)
        if style == "bare":
            return json_response({"message": reason}, status)
        if style == "html":
            page = f"<html><head><title>{status} {reason}</title></head><body><h1>{status} {reason}</h1></body></html>"
            return web.Response(text=page, status=status, content_type="text/html")
        if style == "empty":
            return web.Response(status=status)
        return _refused(reason, status, code=code)

    def ip_of(request: web.Request) -> str:
        return request.remote or "unknown"

    def gate(request: web.Request, entry: dict[str, Any]) -> web.Response | None:
        """The vendor's order: IP allowlist (before credentials), then the per-IP rate limit."""
        ip = ip_of(request)
        if state.refuse_all or ip in state.refused_ips:
            reason = f"Access denied. Your IP address {ip} is not whitelisted for API access."
            body = {"code": 403, "message": "", "actionResult": reason}
            return sandbox.answer(entry, json_response(body, 403), error=reason)
        if state.rate_limit:
            now = state.clock()
            window = state.windows.setdefault(ip, deque())
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= state.rate_limit:
                wait = max(1, math.ceil(window[0] + 1.0 - now))
                response = json_response({"code": 429, "message": "Too Many Requests"}, 429)
                response.headers["Retry-After"] = str(wait)
                return sandbox.answer(entry, response, error=f"rate limit {state.rate_limit}/s, retry after {wait}s")
            window.append(now)
        return None

    def authenticated(request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else header
        expires = state.tokens.get(token)
        if expires is None:
            return False
        if expires <= state.clock():
            del state.tokens[token]
            return False
        return True

    async def read_json(request: web.Request) -> Any:
        try:
            return orjson.loads(await request.read())
        except ValueError:
            return None

    def entry_for(kind: str, request: web.Request, body: Any = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": kind, "provider": PROVIDER, "path": request.path, "at": state.clock()}
        if body is not None:
            entry["body"] = body
        return entry

    async def login(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        # The credentials are never recorded; whether they matched is.
        entry = entry_for("login", request, {"userkey": REDACTED, "password": REDACTED})
        if (early := await sandbox.apply_fault(request, entry, fault_body)) is not None:
            return early
        if (early := gate(request, entry)) is not None:
            return early
        fields = {str(k).lower(): v for k, v in body.items()} if isinstance(body, dict) else {}
        if fields.get("userkey") != state.userkey or fields.get("password") != state.password:
            return sandbox.answer(
                entry, _refused("Userkey or password is wrong", 401, code=401), error="bad credentials"
            )
        token = f"sbx-{uuid.uuid4().hex}"
        state.tokens[token] = state.clock() + state.token_ttl
        ttl = state.token_ttl
        expires = int(ttl) if ttl == int(ttl) else ttl
        if sandbox.state.shape == "alt":
            inner: dict[str, Any] = {"accessToken": token, **({"expiresIn": expires} if state.send_expires_in else {})}
            answer: dict[str, Any] = {"code": 0, "message": "Success", "data": inner}
            shown = {**answer, "data": {**inner, "accessToken": REDACTED}}
            return sandbox.answer(entry, json_response(answer), response_body=shown)
        answer = {"access_token": token, "token_type": "bearer"}
        if state.send_expires_in:
            answer["expires_in"] = expires
        return sandbox.answer(entry, json_response(answer), response_body={**answer, "access_token": REDACTED})

    async def froms(request: web.Request) -> web.StreamResponse:
        entry = entry_for("froms", request)
        if (early := await sandbox.apply_fault(request, entry, fault_body)) is not None:
            return early
        if (early := gate(request, entry)) is not None:
            return early
        if not authenticated(request):
            return sandbox.answer(entry, _refused(NOT_AUTHENTICATED, 401, code=401), error=NOT_AUTHENTICATED)
        items: list[dict[str, Any]] = []
        for number, text in enumerate(state.froms, 1):
            name, address = parseaddr(text)
            if sandbox.state.shape == "alt":
                items.append(
                    {
                        "Id": str(uuid.uuid5(uuid.NAMESPACE_URL, address)),
                        "FromName": name,
                        "FromEmail": address,
                        "CreatedBy": CREATED_BY,
                        "CreatedDate": "2024-08-21T10:00:00",
                    }
                )
            else:
                items.append({"id": number, "name": name, "fromAddress": address, "createdBy": CREATED_BY})
        if sandbox.state.shape == "alt":
            return sandbox.answer(entry, json_response(items))
        return sandbox.answer(entry, json_response({"code": 0, "message": "Success", "data": items}))

    async def send(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        entry = entry_for("send", request, body)
        if isinstance(body, dict) and isinstance(body.get("send"), dict):
            entry["to"] = body["send"].get("to")
        if (early := await sandbox.apply_fault(request, entry, fault_body)) is not None:
            return early
        if (early := gate(request, entry)) is not None:
            return early
        if not authenticated(request):
            return sandbox.answer(entry, _refused(NOT_AUTHENTICATED, 401, code=401), error=NOT_AUTHENTICATED)
        if (refusal := validate_send(body)) is not None:
            assert refusal.body is not None
            reason = orjson.loads(refusal.body)  # type: ignore[arg-type]
            return sandbox.answer(entry, refusal, error=str(reason.get("message") or reason.get("errors")))
        to = str(body["send"]["to"]).lower()
        if state.fail_to.get(to, 0) > 0:
            state.fail_to[to] -= 1
            return sandbox.answer(
                entry,
                _refused("Service temporarily unavailable", 503, code=503),
                error="temporary failure for this recipient",
            )
        entry["upstream_id"] = transactional = str(uuid.uuid4())  # whatever the shape calls it
        record_send(sandbox, body, transactional)
        if sandbox.state.shape == "alt":
            data: dict[str, Any] = {
                "trackingIds": [{"email": body["send"]["to"], "trackingId": transactional}],
                "groupID": str(uuid.uuid4()),
            }
        else:
            data = {"transactionalIds": [transactional], "groupId": str(uuid.uuid4())}
        return sandbox.answer(entry, json_response({"code": 0, "message": "Success", "data": data}))

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                state.update(await request.json())
            except ValueError as exc:
                return json_response({"code": 400, "message": str(exc)}, 400)
        return json_response(state.settings())

    sandbox.app.router.add_post("/rest/login", login)
    sandbox.app.router.add_get("/rest/email/froms", froms)
    sandbox.app.router.add_post("/rest/transactional/email", send)
    sandbox.app.router.add_post("/_sandbox/dengage", control)
    sandbox.app.router.add_get("/_sandbox/dengage", control)
    install_events(sandbox, entry_for, gate, authenticated, _refused, fault_body, NOT_AUTHENTICATED)
    sandbox.redactors.append(redact)
