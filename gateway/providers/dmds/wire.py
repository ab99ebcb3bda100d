"""Pure: the Planisys DMDS REST v1 wire protocol: request bodies and answers (no HTTP client here)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.core.errors import AnswerLost, RateLimited, UpstreamAuthFailed, UpstreamRejected, UpstreamUnavailable
from gateway.core.model import Address, Submission
from gateway.mime import jsonbody
from gateway.providers.dmds.data import DmdsParams
from gateway.providers.dmds.legs import Leg
from gateway.upstream.response import AMBIGUOUS_STATUSES, HttpResponse
from gateway.upstream.shape import Reading, keys, number

# Every wire name in one table, tagged as in shared/upstream-apis.md:
#   [V] vendor docs, [C] seen in real client code, [S] seed document only, [I] our inference.
# A name found to be wrong is corrected here, in one line, and in tests/fixtures/dmds/*.json.
WIRE = {
    "send_one": "/v1/envio/send_one_inline/",  # [C] path; [V] method name
    "send_many": "/v1/envio/send_many_inline/",  # [V] method name; path [I] by analogy
    "campaign_apikey": "/v1/campania_apikey/{numid}",  # [S] method name (GET with a numid); path [I]
    "campaigns": "/v1/campania/",  # [S] GET: the campaign listing (the seed's curl); its answer is a screenshot
    "campaigns_type": "tipo",  # [S] filter "api" | "normal" | "bulk": a JSON body of the GET [S], also a query [I]
    "campaigns_numid": "numid",  # [S] filter: one campaign
    "campaign_type_api": "api",  # [S]
    "version": "/v1/version/",  # [S] method name (since v1.2); path [I]
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
    "reply_to": "reply-to",  # [S] single address, no display name; send_one_inline / send_one_uri only
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

# The answers' key names: each field with its candidates, first match wins (letter case ignored). The vendor
# shows most answers only in screenshots, so every spelling its documents use is accepted.
ANSWERS: dict[str, tuple[str, ...]] = {
    "status": ("status",),  # [V] "ok"; [S] "err" on a refusal
    "eeid": ("eeid", "envio_efectivo_id"),  # [V] eeid; the long name is the concept's [V], as a key [I]
    "sent": ("sent",),  # [V] mails the call sent, copies included; may be fewer than the recipients [V]
    "reason": ("on", "msg", "message", "error", "detail"),  # [S] on; [S] msg (whitelist), [V] Planimail; [I] rest
    # [S] camp_apikey: the only campaign answer the seed shows (creating one); [S] apikey: the argument that
    # sets one (POST campania_apikey); [I] the rest.
    "apikey": ("camp_apikey", "apikey", "api_key", "campania_apikey", "key"),
    "campaigns": ("campanias", "campañas", "campaigns", "data", "result", "results", "items"),  # [I]
    "numid": ("numid", "camp_numid", "campana_id", "campaign_numid", "campaign_id"),  # [S] numid; [I] the rest
    "type": ("tipo", "type"),  # [S] tipo ("api", "normal", "bulk")
    "version": ("version", "api_version", "msg"),  # [I]: "returns the API version number" [S]
}
# Keys a campaign of the listing may have that the gateway does not read (not reported as unexpected).
CAMPAIGN_KEYS = ("id", "nombre", "name", "asunto", "remitente", "remitente_nombre", "replyto", "uri", "asunto_uri")


class ListingUnusable(Exception):
    """The campaign listing cannot say which campaigns exist (its path is not there, or its answer is not
    one the gateway recognises): campania_apikey answers instead."""


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
    *,
    bodies: bool = True,
) -> dict[str, Any]:
    """The JSON body for one leg (`attachment`: what an attachment carries; `bodies` false: the HTML's size
    instead of the HTML, for the message ledger). Pure: golden-tested in tests/test_dmds_payload.py."""
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
    if msg.reply_to is not None and len(leg.contacts) == 1:
        # Documented for the send_one calls only [S] (messages with a Reply-To get one call per contact).
        body[WIRE["reply_to"]] = msg.reply_to.email
    if leg.cc:
        body[WIRE["cc"]] = [
            {WIRE["cc_email"]: a.email, **({WIRE["cc_name"]: a.name} if a.name else {})} for a in leg.cc
        ]
    if leg.bcc:
        body[WIRE["bcc"]] = [{WIRE["bcc_email"]: a.email} for a in leg.bcc]
    body[WIRE["html"]] = msg.html if bodies else jsonbody.body_omitted(msg.html)
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


def _object(response: HttpResponse) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


EXCERPT = 200  # characters of a foreign body kept for the log (never for a reply)


def excerpt(response: HttpResponse) -> str:
    """The start of an answer's body on one line, for a log line: a proxy's page is no reply text."""
    text = " ".join(response.text().split())
    return text[:EXCERPT] + ("..." if len(text) > EXCERPT else "") if text else "an empty body"


def upstream_reason(response: HttpResponse) -> str:
    """DMDS' own words: {"status":"err","on":"<reason>"} [S], or another of ANSWERS["reason"]; without any,
    what the answer was (never its raw body: the reason is the client's reply text)."""
    data = _object(response)
    reason = Reading().first(data, "reason", ANSWERS["reason"])
    if isinstance(reason, (str, int, float)) and str(reason).strip():
        return str(reason)
    return f"DMDS refused the call (HTTP {response.status}) without a reason ({_shape(data)})"


def foreign(response: HttpResponse, what: str) -> None:
    """A 4xx that is not JSON is no DMDS answer (DMDS answers in JSON [S]): a proxy's or load balancer's page
    (400, 407, 408, 421), an operator matter and temporary by nature; its start goes to the log only."""
    if 400 <= response.status < 500 and _object(response) is None:
        raise UpstreamUnavailable(
            f"DMDS answered {response.status} to {what} with no DMDS answer (not JSON; a proxy or load "
            f"balancer?): {excerpt(response)}"
        )


def key_refused(response: HttpResponse, what: str, whose: str = "the gateway's") -> None:
    """A 401 or 403 is DMDS refusing the APIKEY only in DMDS' own answer, JSON (DMDS answers in JSON [S]);
    an HTML page or an empty body is a proxy's or WAF's in front of it (its own authentication, a blocked
    address, a rule matched): an operator matter and temporary, never "wrong key" (a 535 at AUTH, the
    account named as refusing in /readyz), its start for the log only."""
    status = response.status
    if status not in (401, 403):
        return
    if _object(response) is None:
        raise UpstreamUnavailable(
            f"DMDS answered {status} to {what} with no DMDS answer (not JSON; a proxy or WAF in front of it?): "
            f"{excerpt(response)}"
        )
    raise UpstreamAuthFailed(f"DMDS answered {status} to {what}: {whose} APIKEY was refused")


def _shape(data: Any) -> str:
    """What an answer is, for a log line (never its values): its keys, or its JSON type."""
    return keys(data) if isinstance(data, dict) else f"a JSON {type(data).__name__}"


@dataclass(frozen=True, slots=True)
class SendResult:
    """DMDS' answer to one send: the batch id (eeid) and how many mails it sent (contacts + copies) [V]."""

    upstream_id: str
    sent: int | None = None


def classify(response: HttpResponse) -> SendResult:
    """Map a send answer to its result, or raise the typed error of design.md's reply table."""
    status = response.status
    key_refused(response, "the send")
    if status == 429:
        raise RateLimited("DMDS rate limit (429)", retry_after=response.retry_after(time.time()))
    if status == 500 and _says_failed(response):
        # DMDS' own JSON saying it failed (review today8b F4): not sent, a plain temporary failure. Ambiguous,
        # an outage answering 500 to every call would hold every message under ambiguous = "hold".
        raise UpstreamUnavailable(f"DMDS answered 500 with its own error, not sent ({excerpt(response)})")
    if status in AMBIGUOUS_STATUSES:
        # Sent, and whatever failed (DMDS itself, or a proxy that forwarded it) may have failed after the mail
        # went: resending may deliver a second copy (counted, held under ambiguous = "hold").
        raise AnswerLost(f"DMDS answered {status} to the send: it may have been sent ({excerpt(response)})")
    if status >= 500:
        raise UpstreamUnavailable(f"DMDS answered {status}")
    redirect(response, "the send")
    if status >= 400:
        not_found(response, "the send")
        foreign(response, "the send")
        raise UpstreamRejected(upstream_reason(response))
    data = _object(response)
    if data is None:
        # A 2xx whose body is not JSON (a proxy's page, a cut answer): DMDS may well have taken the message.
        raise AnswerLost(f"DMDS answered {status} with a body that is not JSON")
    reading = Reading()
    said = reading.first(data, "status", ANSWERS["status"])
    if not isinstance(said, str) or not said.strip():
        # No status the gateway can read (none, another envelope, a list, a status that is no word): neither
        # "ok" nor a refusal, and a 2xx; DMDS may have sent it (resending counts it as a possible copy).
        raise AnswerLost(f"DMDS answered {status} without a status it can read ({_shape(data)})")
    if said.strip().lower() != "ok":
        raise UpstreamRejected(upstream_reason(response))
    eeid = _id(reading.first(data, "eeid", ANSWERS["eeid"]))
    if not eeid:
        # Sent, and no batch id the gateway can read (none, or an object, a list, a bool): ambiguous.
        raise AnswerLost("DMDS answered ok without an eeid it can read")
    return SendResult(eeid, number(reading.first(data, "sent", ANSWERS["sent"])))


def _says_failed(response: HttpResponse) -> bool:
    """Whether an answer is DMDS' own JSON saying the call failed: an object whose `status` is a word other
    than ok (`{"status": "err", ...}`). Anything else (a page, other JSON, no status, "ok") says nothing of
    whether the mail went."""
    data = _object(response)
    said = Reading().first(data, "status", ANSWERS["status"]) if isinstance(data, dict) else None
    return isinstance(said, str) and said.strip().lower() not in ("", "ok")


def _id(value: Any) -> str | None:
    """An id as answers write it, a string or a number ("7f3c...", 123, 123.0): its text; None otherwise."""
    if isinstance(value, str):
        return value.strip() or None
    found = number(value)
    return None if found is None else str(found)


def redirect(response: HttpResponse, what: str) -> None:
    """A 3xx is no DMDS answer (redirects are not followed): the request was not processed where it was sent,
    a wrong api_base (http for https, a moved host). Temporary, and not ambiguous: nothing was sent there."""
    if 300 <= response.status < 400:
        raise UpstreamUnavailable(f"DMDS answered {response.status} (a redirect) to {what}: check api_base")


def dmds_answer(data: Any) -> bool:
    """Whether a JSON answer has DMDS' own shape, a `status` key ({"status": "err", "on": ...} [S]): a web
    framework's "not found" ({"detail": "Not Found"}, {"title": "404 Not Found"}) has none."""
    return Reading().first(data, "status", ANSWERS["status"]) is not None


def not_found(response: HttpResponse, what: str) -> None:
    """A 404 or 405 that is not DMDS' own answer (no JSON, or JSON without DMDS' `status`: a framework's page)
    says the path or the host is wrong (a wrong guess in WIRE, or api_base), which no message or login
    should be refused for: temporary."""
    if response.status in (404, 405) and not dmds_answer(_object(response)):
        raise UpstreamUnavailable(
            f"DMDS answered {response.status} to {what} with no DMDS answer: the path or api_base is wrong "
            "(smtp-gateway check-upstream shows which)"
        )


def _readable(response: HttpResponse, what: str) -> Any:
    """The JSON of a read-only call's answer; typed errors for what is not the answer's business."""
    key_refused(response, what, "the account")
    if response.status == 429 or response.status >= 500:
        raise UpstreamUnavailable(f"DMDS answered {response.status} to {what}")
    redirect(response, what)
    return _object(response)


def campaign_apikey(response: HttpResponse, reading: Reading | None = None) -> str | None:
    """The campania_apikey answer: the campaign's apikey, or None when DMDS has no such API campaign."""
    data = _readable(response, "campania_apikey")
    not_found(response, "campania_apikey")
    foreign(response, "campania_apikey")
    if response.status in (404, 400):
        if not dmds_answer(data):
            # A 400 that is JSON but not DMDS' (a framework's or a proxy's): no word on the campaign.
            raise UpstreamUnavailable(f"DMDS answered {response.status} to campania_apikey with no DMDS answer")
        return None
    if data is None:
        raise UpstreamUnavailable("campania_apikey answer is not JSON")
    reading = reading if reading is not None else Reading()
    if not isinstance(data, dict):
        # A bare string, a list, a number: the answer's shape is [S]/[I] and this is not it. A string may be
        # the key or an error's text; neither can be told, so nothing is refused for it (docs/unconfirmed.md).
        raise UpstreamUnavailable(f"campania_apikey answered with a shape the gateway does not know ({_shape(data)})")
    fields = reading.fields(data, {k: ANSWERS[k] for k in ("status", "apikey", "numid", "reason")}, known=["id"])
    status, key = fields.get("status"), fields.get("apikey")
    if status is None:
        # No DMDS `status`: a key under a known name says the campaign has one (taken); without one, the answer
        # says nothing the gateway can read, never "no such campaign" (a 535 cached for a right password).
        if isinstance(key, (str, int)) and not isinstance(key, bool) and str(key).strip():
            return str(key).strip()
        raise UpstreamUnavailable(
            f"campania_apikey answered without a status or an apikey the gateway recognises ({reading.describe()})"
        )
    if str(status).lower() != "ok":
        return None
    if not key:
        # "ok" and no key under any known name: a spelling the gateway does not know, not a missing campaign
        # (refusing every login of that campaign for good would be the wrong guess's cost).
        raise UpstreamUnavailable(
            f"campania_apikey answered ok without an apikey under any name the gateway knows ({reading.describe()})"
        )
    return str(fields["apikey"])


def listing_request(numid: int | None) -> tuple[str, bytes]:
    """The listing call's path (with its filters as a query) and its JSON body (the filters again)."""
    filters: dict[str, Any] = {WIRE["campaigns_type"]: WIRE["campaign_type_api"]}
    if numid is not None:
        filters[WIRE["campaigns_numid"]] = numid
    query = "&".join(f"{k}={v}" for k, v in filters.items())
    return f"{WIRE['campaigns']}?{query}", orjson.dumps(filters)


def campaign_listing(response: HttpResponse, reading: Reading | None = None) -> frozenset[int]:
    """The numids of the API campaigns the listing names; ListingUnusable when it names none in a way the
    gateway recognises (no such path, not JSON, no list, no numids)."""
    data = _readable(response, "the campaign listing")
    if response.status >= 300:
        raise ListingUnusable(f"DMDS answered {response.status} to the campaign listing")
    reading = reading if reading is not None else Reading()
    items = data
    if isinstance(data, dict):
        fields = reading.fields(data, {k: ANSWERS[k] for k in ("status", "campaigns", "reason")})
        if "status" in fields and str(fields["status"]).lower() != "ok":
            raise ListingUnusable(f"DMDS refused the campaign listing: {fields.get('reason') or fields['status']}")
        items = fields.get("campaigns")
    if not isinstance(items, list):
        raise ListingUnusable("the campaign listing's answer holds no list of campaigns")
    numids: set[int] = set()
    unknown_types: list[str] = []
    for item in items:
        if not isinstance(item, dict):
            raise ListingUnusable("the campaign listing's items are not objects")
        fields = reading.fields(item, {k: ANSWERS[k] for k in ("numid", "type")}, "campaigns[].", CAMPAIGN_KEYS)
        numid = number(fields.get("numid"))
        if numid is None:
            raise ListingUnusable("a campaign of the listing has no numid the gateway recognises")
        kind = campaign_type(fields.get("type", WIRE["campaign_type_api"]))
        if kind == WIRE["campaign_type_api"]:
            numids.add(numid)
        elif kind is None:
            unknown_types.append(str(fields["type"])[:40])
    if unknown_types and not numids:
        # The type is written some other way ("API REST", a code): refusing every [NN] campaign for good
        # would be the guess's cost; campania_apikey can say instead.
        raise ListingUnusable(
            "the campaign listing names campaigns but none of a type the gateway reads as API "
            f"(types seen: {', '.join(sorted(set(unknown_types))[:5])})"
        )
    return frozenset(numids)


OTHER_TYPES = ("normal", "bulk")  # [S] the campaign types that are not API


def campaign_type(value: Any) -> str | None:
    """A listing's campaign type as the gateway reads it: "api" for any text naming it in any letter case
    ("api", "API", "API REST"), "normal" or "bulk", None for anything else (a code, another word)."""
    if not isinstance(value, str):
        return None
    words = value.strip().lower().replace("-", " ").replace("_", " ").split()
    if WIRE["campaign_type_api"] in words:
        return WIRE["campaign_type_api"]
    return next((kind for kind in OTHER_TYPES if kind in words), None)


def version(response: HttpResponse, reading: Reading | None = None) -> str | None:
    """The version call's answer: the API version, or None when the answer names none."""
    data = _readable(response, "the version call")
    if response.status >= 300 or not isinstance(data, dict):
        return None
    reading = reading if reading is not None else Reading()
    found = reading.fields(data, {k: ANSWERS[k] for k in ("status", "version")})
    value = found.get("version")
    return str(value) if isinstance(value, (str, int, float)) and value != "" else None
