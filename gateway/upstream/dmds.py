"""Planisys DMDS REST v1 driver: send_one_inline / send_many_inline and the campania_apikey lookup."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import orjson

from gateway.errors import UpstreamAuthFailed, UpstreamRejected, UpstreamUnavailable
from gateway.model import Address, Leg, SendResult, Submission
from gateway.observability import UPSTREAM_SECONDS
from gateway.replies import RATE_LIMITED
from gateway.upstream.base import Transport, make_transport

# Every wire name in one table, tagged as in shared/upstream-apis.md:
#   [V] vendor docs, [C] seen in real client code, [S] seed document only, [I] our inference.
# A name found to be wrong is corrected here, in one line, and in tests/fixtures/dmds/*.json.
WIRE = {
    "send_one": "/v1/envio/send_one_inline/",  # [C] path; [V] method name
    "send_many": "/v1/envio/send_many_inline/",  # [V] method name; path [I] by analogy
    "campaign_apikey": "/v1/campania_apikey/{numid}",  # [S] method name; path [I]
    "campaign": "campana_id",  # [C]
    "email_flag": "email",  # [C] always true
    "contact": "contacto",  # [C] single recipient object {email, nombre, apellido}
    "contacts": "contactos",  # [I] list form; the seed says "contacts", real code uses Spanish names
    "contact_email": "email",  # [C]
    "contact_name": "nombre",  # [C]
    "html": "html",  # [C]
    "subject": "asunto",  # [S]
    "sender": "remitente",  # [S] (seed's error examples use it)
    "sender_name": "remitente_nombre",  # [S]
    "reply_to": "reply-to",  # [S] single address, no display name
    "cc": "copia",  # [S] list of {cc_email, cc_nombre}
    "cc_email": "cc_email",  # [S]
    "cc_name": "cc_nombre",  # [S]
    "bcc": "copia_oculta",  # [S] list of {bcc_email}
    "bcc_email": "bcc_email",  # [S]
    "archive": "archive",  # [V] since v1.4
    "reuse_eeid": "reuse_eeid",  # [V]
    "eeid": "eeid",  # [V]
    "attachments": "adjuntos",  # [I] attachments exist [V], field name and shape unknown
    "att_name": "nombre",  # [I]
    "att_type": "tipo",  # [I]
    "att_content": "contenido",  # [I] base64
    "att_cid": "cid",  # [I] Content-ID for inline (cid:) images
    "att_inline": "inline",  # [I]
}


def _split_name(name: str) -> tuple[str, str]:
    first, _, last = name.strip().partition(" ")
    return first, last.strip()


def _contact(addr: Address) -> dict[str, str]:
    contact = {WIRE["contact_email"]: addr.email}
    if addr.name:
        first, last = _split_name(addr.name)
        contact[WIRE["contact_name"]] = first
        if last:
            contact["apellido"] = last  # [C]
    return contact


def build_payload(submission: Submission, leg: Leg, batch_id: str | None) -> dict[str, Any]:
    """The JSON body for one leg. Pure: golden-tested in tests/test_dmds_payload.py."""
    msg = submission.message
    body: dict[str, Any] = {WIRE["campaign"]: submission.campaign, WIRE["email_flag"]: True}
    if len(leg.contacts) == 1:
        body[WIRE["contact"]] = _contact(leg.contacts[0])
    else:
        body[WIRE["contacts"]] = [_contact(a) for a in leg.contacts]
    if msg.subject:
        body[WIRE["subject"]] = msg.subject
    if msg.from_ is not None:
        body[WIRE["sender"]] = msg.from_.email
        if msg.from_.name:
            body[WIRE["sender_name"]] = msg.from_.name
    if msg.reply_to is not None:
        body[WIRE["reply_to"]] = msg.reply_to.email
    if leg.cc:
        body[WIRE["cc"]] = [
            {WIRE["cc_email"]: a.email, **({WIRE["cc_name"]: a.name} if a.name else {})} for a in leg.cc
        ]
    if leg.bcc:
        body[WIRE["bcc"]] = [{WIRE["bcc_email"]: a.email} for a in leg.bcc]
    body[WIRE["html"]] = msg.html
    if msg.attachments:
        body[WIRE["attachments"]] = [
            {
                WIRE["att_name"]: a.filename,
                WIRE["att_type"]: a.content_type,
                WIRE["att_content"]: base64.b64encode(a.data).decode("ascii"),
                **({WIRE["att_cid"]: a.content_id} if a.content_id else {}),
                **({WIRE["att_inline"]: True} if a.inline else {}),
            }
            for a in msg.attachments
        ]
    if submission.archive:
        body[WIRE["archive"]] = True
    if batch_id:
        body[WIRE["reuse_eeid"]] = True
        body[WIRE["eeid"]] = batch_id
    return body


def upstream_reason(response: httpx.Response) -> str:
    """DMDS errors look like {"status":"err","on":"<reason>"} [S]; Planimail uses "msg" [V]."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(data, dict):
        for key in ("on", "msg", "message", "error", "detail"):
            if data.get(key):
                return str(data[key])
    return response.text[:300]


def classify(response: httpx.Response) -> SendResult:
    """Map an upstream answer to a result or a typed error (design.md reply table)."""
    status = response.status_code
    if status in (401, 403):
        raise UpstreamAuthFailed(f"DMDS answered {status}: the gateway's APIKEY was refused")
    if status == 429:
        raise UpstreamUnavailable("DMDS rate limit (429)", reply=RATE_LIMITED)
    if status >= 500:
        raise UpstreamUnavailable(f"DMDS answered {status}")
    if status >= 400:
        raise UpstreamRejected(upstream_reason(response))
    try:
        data = response.json()
    except ValueError:
        raise UpstreamUnavailable(f"DMDS answered {status} with a body that is not JSON") from None
    if not isinstance(data, dict) or data.get("status") != "ok":
        raise UpstreamRejected(upstream_reason(response))
    eeid = data.get("eeid")
    if not eeid:
        raise UpstreamUnavailable("DMDS answered ok without an eeid")
    sent = data.get("sent")
    return SendResult(upstream_id=str(eeid), sent=sent if isinstance(sent, int) else None)


class DmdsDriver:
    """One DMDS account: its APIKEY and one pooled HTTP client."""

    name = "dmds"

    def __init__(
        self,
        base_url: str,
        apikey: str,
        *,
        timeout: float = 30.0,
        max_connections: int = 50,
        transport: Transport | httpx.AsyncBaseTransport = "httpx",
        account: str = "default",
    ) -> None:
        self.account = account
        self._base = base_url.rstrip("/")
        # The raw key goes in Authorization with no scheme (upstream-apis.md §1.1, [V]).
        self._headers = {"Authorization": apikey, "Accept": "application/json", "Content-Type": "application/json"}
        self._timeout = {"connect": min(timeout, 10.0), "read": timeout, "write": timeout, "pool": timeout}
        # The transport is driven directly: the client layers (cookies, redirects, auth flows, URL
        # merging) cost ~10 % of the gateway's CPU per message and none of them applies here.
        self._transport = (
            transport if isinstance(transport, httpx.AsyncBaseTransport) else make_transport(max_connections, transport)
        )
        self._latency = {
            outcome: UPSTREAM_SECONDS.labels(account=account, outcome=outcome) for outcome in ("ok", "error")
        }

    async def send(self, submission: Submission, leg: Leg, batch_id: str | None) -> SendResult:
        path = WIRE["send_one"] if len(leg.contacts) == 1 else WIRE["send_many"]
        content = orjson.dumps(build_payload(submission, leg, batch_id))
        started = time.perf_counter()
        outcome = "error"
        try:
            response = await self._request("POST", path, content)
            result = classify(response)
            outcome = "ok"
            return result
        finally:
            self._latency[outcome].observe(time.perf_counter() - started)

    async def _request(self, method: str, path: str, content: bytes | None = None) -> httpx.Response:
        request = httpx.Request(
            method, self._base + path, headers=self._headers, content=content, extensions={"timeout": self._timeout}
        )
        try:
            response = await self._transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable(f"DMDS timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"DMDS unreachable ({type(exc).__name__})") from exc
        return response

    async def campaign_apikey(self, numid: int) -> str | None:
        """The campaign's apikey, or None when DMDS has no such API campaign."""
        response = await self._request("GET", WIRE["campaign_apikey"].format(numid=numid))
        if response.status_code in (401, 403):
            raise UpstreamAuthFailed(f"DMDS answered {response.status_code} to campania_apikey")
        if response.status_code in (404, 400):
            return None
        if response.status_code == 429 or response.status_code >= 500:
            raise UpstreamUnavailable(f"DMDS answered {response.status_code} to campania_apikey")
        try:
            data = response.json()
        except ValueError:
            raise UpstreamUnavailable("campania_apikey answer is not JSON") from None
        if not isinstance(data, dict) or data.get("status") != "ok" or not data.get("apikey"):
            return None
        return str(data["apikey"])

    async def aclose(self) -> None:
        await self._transport.aclose()
