"""Pure: the Planisys DMDS REST v1 wire protocol: request bodies and answers (no HTTP client here)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gateway.core.errors import AnswerLost, RateLimited, UpstreamAuthFailed, UpstreamRejected, UpstreamUnavailable
from gateway.core.model import Address, Submission
from gateway.mime import jsonbody
from gateway.providers.dmds.data import DmdsParams
from gateway.providers.dmds.legs import Leg
from gateway.upstream.response import HttpResponse

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


def build_payload(
    submission: Submission,
    leg: Leg,
    batch_id: str | None,
    attachment: jsonbody.AttachmentContent = jsonbody.attachment_base64,
) -> dict[str, Any]:
    """The JSON body for one leg (`attachment`: what an attachment carries). Pure: golden-tested in
    tests/test_dmds_payload.py."""
    msg = submission.message
    params = DmdsParams.read(submission.params)
    body: dict[str, Any] = {WIRE["campaign"]: params.campaign, WIRE["email_flag"]: True}
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
                WIRE["att_content"]: attachment(a),
                **({WIRE["att_cid"]: a.content_id} if a.content_id else {}),
                **({WIRE["att_inline"]: True} if a.inline else {}),
            }
            for a in msg.attachments
        ]
    if params.archive:
        body[WIRE["archive"]] = True
    if batch_id:
        body[WIRE["reuse_eeid"]] = True
        body[WIRE["eeid"]] = batch_id
    return body


def upstream_reason(response: HttpResponse) -> str:
    """DMDS errors look like {"status":"err","on":"<reason>"} [S]; Planimail uses "msg" [V]."""
    try:
        data = response.json()
    except ValueError:
        return response.text() or f"HTTP {response.status}"
    if isinstance(data, dict):
        for key in ("on", "msg", "message", "error", "detail"):
            if data.get(key):
                return str(data[key])
    return response.text()


@dataclass(frozen=True, slots=True)
class SendResult:
    """DMDS' answer to one send: the batch id (eeid) and how many mails it sent (contacts + copies) [V]."""

    upstream_id: str
    sent: int | None = None


def classify(response: HttpResponse) -> SendResult:
    """Map a send answer to its result, or raise the typed error of design.md's reply table."""
    status = response.status
    if status in (401, 403):
        raise UpstreamAuthFailed(f"DMDS answered {status}: the gateway's APIKEY was refused")
    if status == 429:
        raise RateLimited("DMDS rate limit (429)", retry_after=response.retry_after(time.time()))
    if status >= 500:
        raise UpstreamUnavailable(f"DMDS answered {status}")
    if status >= 400:
        raise UpstreamRejected(upstream_reason(response))
    try:
        data = response.json()
    except ValueError:
        # A 2xx whose body is not JSON (a proxy's page, a cut answer): DMDS may well have taken the message.
        raise AnswerLost(f"DMDS answered {status} with a body that is not JSON") from None
    if not isinstance(data, dict) or data.get("status") != "ok":
        raise UpstreamRejected(upstream_reason(response))
    eeid = data.get("eeid")
    if not eeid:
        raise AnswerLost("DMDS answered ok without an eeid")
    sent = data.get("sent")
    return SendResult(str(eeid), sent if isinstance(sent, int) else None)


def campaign_apikey(response: HttpResponse) -> str | None:
    """The campania_apikey answer: the campaign's apikey, or None when DMDS has no such API campaign."""
    if response.status in (401, 403):
        raise UpstreamAuthFailed(f"DMDS answered {response.status} to campania_apikey")
    if response.status in (404, 400):
        return None
    if response.status == 429 or response.status >= 500:
        raise UpstreamUnavailable(f"DMDS answered {response.status} to campania_apikey")
    try:
        data = response.json()
    except ValueError:
        raise UpstreamUnavailable("campania_apikey answer is not JSON") from None
    if not isinstance(data, dict) or data.get("status") != "ok" or not data.get("apikey"):
        return None
    return str(data["apikey"])
