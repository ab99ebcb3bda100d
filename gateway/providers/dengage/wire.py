"""Pure: the dEngage REST wire protocol: request bodies and answers (no HTTP client here).

Facts come from shared/upstream-apis.md part 2; the tags below are the same as there.
"""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any

from gateway.core import replies
from gateway.core.errors import (
    AnswerLost,
    RateLimited,
    UpstreamAuthFailed,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.core.model import Submission
from gateway.mime import jsonbody, text_to_html
from gateway.providers.dengage.data import DengageParams
from gateway.upstream.response import AMBIGUOUS_STATUSES, HttpResponse
from gateway.upstream.shape import Reading, number
from gateway.upstream.shape import keys as answer_keys

# Every wire name in one table, tagged as in shared/upstream-apis.md part 2:
#   [V] vendor docs, [C] seen in real client code or notes, [I] our inference.
# A name found to be wrong is corrected here, in one line, and in tests/fixtures/dengage/*.json.
# None: the vendor has the feature but the name is not known; the gateway sends nothing for it.
WIRE: dict[str, str | None] = {
    "login": "/login",  # [C] POST {userkey, password} -> {access_token, expires_in}; base ends in /rest
    "login_userkey": "userkey",  # [C] every client sends it lower-case; the docs write userKey
    "login_password": "password",  # [C]
    "send": "/transactional/email",  # [C] POST
    "froms": "/email/froms",  # [C] GET; the answer's shape is [I] (IDENTITY_KEYS)
    "to_object": "send",  # [C] "Send can not be null"
    "to": "to",  # [C] send.to: ONE address, a string (an array is a deserializer error)
    "content": "content",  # [C]
    "subject": "subject",  # [C] content.subject, "Subject cannot be empty"
    "html": "html",  # [C] content.html, "Html content must be filled"
    "template_id": "templateId",  # [C] content.templateId (C-NIS, production); C-TT used contentId: unresolved
    "reply_to": "replyTo",  # [V] exists, root or per content; a plain address here is [I]
    "attachments": "attachments",  # [V] exists, base64; the item keys below are [I]
    "att_name": "name",  # [I]
    "att_content": "content",  # [I] base64
    "att_type": "type",  # [I] MIME type
    # [I] (inline images' Content-ID, so that the body's cid: references resolve); the attachment item's
    # keys are not documented; ASP.NET ignores a key it does not know. None: not sent (and counted).
    "att_cid": "contentId",
    "x_headers": "xHeaders",  # [V] exists; shape [I]: an object header name -> value at the root
    "tags": "tags",  # [C] string list (report filter, [V])
    # Not sent by the gateway (no SMTP equivalent): "current" [C] personalisation object at the root,
    # "reporting" [C] {trackOpen, trackClick}, "send.toLanguage" [C], "multiLangContent" [V].
    # The From: unknown. C-TT found senderId, emailFromId, send.from, send.fromId ignored [C]; the docs allow
    # another sender name and local part [V] without naming the field. Per account: from_address_field,
    # from_name_field, from_identity_field (config.py); these are the defaults when those are unset.
    "from_address": None,
    "from_name": None,
    "from_identity": None,
    # Idempotency: the vendor page announces support for this endpoint, the text is cut off [V]; the only
    # public hint is "traceId for idempotency" on transactional PUSH [C] (salil-dengage/dengage-demos
    # PROJECT-LOG), nothing for email, and not whether it is a header or a field. Unconfirmed: nothing
    # is sent. Set this to the header name once confirmed; `idempotency_key` below derives the value.
    "idempotency_header": None,
}
# The login answer's keys, first match wins (letter case ignored): access_token and expires_in (seconds;
# 3600 when absent) [C]; the camelCase spellings ASP.NET answers use elsewhere [I].
TOKEN_KEYS: dict[str, tuple[str, ...]] = {
    "access_token": ("access_token", "accessToken", "token"),
    "expires_in": ("expires_in", "expiresIn"),
}
# The answer: {"code": 0, "message": ..., "data": {...}} [C]; "transactionId" at the root [C] (C-NIS's
# notes); "transactionalIds per recipient and a groupId for all" [V] with unknown JSON keys: looked for
# under every name below, first match wins (see `send_result`).
ID_KEYS = (
    "transactionalIds",
    "transactionalId",
    "transactionIds",
    "trackingIds",
    "trackingId",
    "transactionId",
    "messageId",
    "id",
)  # [I] order of preference
GROUP_KEYS = ("groupId", "groupID", "group_id")  # [V] concept, [I] key
# Codes seen with HTTP 200 and what they mean [C]; every other non-zero code is a refusal too.
CODES = {
    0: "success",  # [C]
    11: "refused",  # [C] "<id> content is null", "Token not found with given ContactKey" (push)
}
DEFAULT_EXPIRES_IN = 3600.0  # [C] clients fall back to an hour when expires_in is absent
ALLOWLIST_WORDS = ("whitelist", "allowlist", "not allowed ip", "ip restriction")  # [C] "not whitelisted"
IDEMPOTENCY_NAMESPACE = uuid.UUID("1a7c2f0e-5d64-4c1b-9a43-2f6c0a1d7e55")


class IpNotAllowlisted(UpstreamAuthFailed):
    """dEngage refuses this gateway's IP address (API IP Restriction) before looking at credentials: an
    operator error, temporary for the client; `caller_ip` is the address dEngage saw, when it said."""

    def __init__(self, reason: str, caller_ip: str | None) -> None:
        super().__init__(reason)
        self.caller_ip = caller_ip


class TokenRejected(UpstreamAuthFailed):
    """HTTP 401 "Not auhenticated. Please re-login." [V]: the bearer token expired or is unknown. `foreign`:
    the 401 was no dEngage answer (an HTML page or an empty body: a proxy or WAF on the way); a new token is
    still tried once (cheap), but a foreign 401 never says the credentials or the token were refused."""

    def __init__(self, reason: str, foreign: bool = False) -> None:
        super().__init__(reason)
        self.foreign = foreign


class ForeignRefusal(UpstreamUnavailable):
    """A 401 that is no dEngage answer, after a fresh token or on the login: temporary, an operator matter
    (the proxy's or WAF's own authentication or rules), never "wrong password" nor the API user refused."""


# -- requests ------------------------------------------------------------------------------------------


def login_body(userkey: str, password: str) -> dict[str, str]:
    return {str(WIRE["login_userkey"]): userkey, str(WIRE["login_password"]): password}


def has_body(submission: Submission) -> bool:
    """Whether the message carries its own body (an HTML part, or text), so that a template's body is
    overridden only by real content and not by the empty document gateway/mime makes for an empty message."""
    msg = submission.message
    return bool((msg.text or "").strip()) or msg.html != text_to_html(msg.text or "")


def put(body: dict[str, Any], path: str, value: str) -> None:
    """Set a dotted path of a request body ("content.fromName"), making the objects on the way."""
    *parents, leaf = path.split(".")
    node = body
    for name in parents:
        child = node.get(name)
        if not isinstance(child, dict):
            child = node[name] = {}
        node = child
    node[leaf] = value


def build_payload(
    submission: Submission,
    recipient: str,
    sender: Mapping[str, str] | None = None,
    attachment: jsonbody.AttachmentContent = jsonbody.attachment_base64,
    *,
    bodies: bool = True,
) -> dict[str, Any]:
    """The JSON body of the call for one envelope recipient; `sender`: the From's fields where the account's
    settings put them (dotted path -> value); `attachment`: what an attachment carries; `bodies` false: the
    HTML's size instead of the HTML (the message ledger's copy). Pure: golden-tested
    in tests/test_dengage_payload.py. Only this recipient is named: Cc and Bcc recipients get their own call
    and never appear in another's; header To/Cc are never forwarded as recipients."""
    msg = submission.message
    params = DengageParams.read(submission.params)
    w = WIRE
    content: dict[str, Any] = {}
    template = params.template
    if template:
        content[str(w["template_id"])] = template
    if msg.subject:
        content[str(w["subject"])] = msg.subject
    if not template or has_body(submission):
        content[str(w["html"])] = msg.html if bodies else jsonbody.body_omitted(msg.html)
    body: dict[str, Any] = {str(w["to_object"]): {str(w["to"]): recipient}, str(w["content"]): content}
    for path, value in (sender or {}).items():
        put(body, path, value)
    if msg.reply_to is not None:
        body[str(w["reply_to"])] = msg.reply_to.email
    if msg.attachments:
        body[str(w["attachments"])] = [
            {
                str(w["att_name"]): a.filename,
                str(w["att_content"]): attachment(a),
                str(w["att_type"]): a.content_type,
                **({w["att_cid"]: a.content_id} if w["att_cid"] and a.content_id else {}),
            }
            for a in msg.attachments
        ]
    if msg.x_headers:
        headers: dict[str, str] = {}
        for name, value in msg.x_headers:
            # A repeated header keeps every value, comma-joined (as HTTP folds repeated fields).
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        body[str(w["x_headers"])] = headers
    if params.tags:
        body[str(w["tags"])] = list(params.tags)
    return body


def idempotency_key(message_ref: str, recipient: str) -> str:
    """A stable key per (accepted message, recipient): the same on every resend of that call, different
    for every other call. `message_ref` is chosen once at acceptance and kept in the queue (params)."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{message_ref}\0{recipient.lower()}"))


# -- answers -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_in: float


@dataclass(frozen=True, slots=True)
class SendResult:
    """One accepted call: the recipient's transactional id (empty when the answer named none we know),
    the group id, and the answer's top-level keys (for the log when no id was found)."""

    upstream_id: str
    group_id: str | None = None
    keys: tuple[str, ...] = field(default_factory=tuple)


def field_of(obj: Mapping[str, Any], *names: str) -> Any:
    """The value under the first of `names` that `obj` has, letter case ignored (None when it has none).

    dEngage is an ASP.NET API: depending on its serialiser it writes `code`, `Code` or `HasError`,
    `hasError`. docs/unconfirmed.md promises every answer is read ignoring case, and a status field missed
    because of its case would turn a failure into a success. The exact spelling wins over another case."""
    for name in names:
        if name in obj:
            return obj[name]
    folded = {k.lower(): k for k in obj if isinstance(k, str)}
    for name in names:
        key = folded.get(name.lower())
        if key is not None:
            return obj[key]
    return None


def _json(response: HttpResponse) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _words(data: Any) -> str | None:
    """The upstream's own words in a JSON answer: `message` [C], `actionResult` [C], ASP.NET validation
    `errors` [I], or its `code`; None when it has none."""
    if not isinstance(data, dict):
        return None
    parts: list[str] = []
    for key in ("message", "actionResult", "error", "title", "detail"):
        value = field_of(data, key)
        if isinstance(value, str) and value.strip() and value.strip() not in parts:
            parts.append(value.strip())
    errors = field_of(data, "errors")
    if isinstance(errors, dict):
        for name, problems in errors.items():
            texts = problems if isinstance(problems, list) else [problems]
            parts.append(f"{name}: {'; '.join(str(t) for t in texts)}")
    elif isinstance(errors, list):
        parts.extend(str(e) for e in errors)
    if parts:
        return " - ".join(parts)
    code = field_of(data, "code")
    return None if code is None else f"dEngage answered code {code}"


def _shape(data: Any) -> str:
    """What an answer is, never its values: its keys (and those of a `data` envelope), or its JSON type."""
    if not isinstance(data, dict):
        return "not JSON" if data is None else f"a JSON {type(data).__name__}"
    inner = field_of(data, "data")
    return answer_keys(data) + (f"; data {answer_keys(inner)}" if isinstance(inner, dict) else "")


def upstream_reason(response: HttpResponse, data: Any = None, *, quote_body: bool = True) -> str:
    """The upstream's own words (`_words`); without any, the raw body, or with `quote_body` off (an answer
    that may hold a secret: the login's, whose token may sit under a name the gateway does not read) only
    what the answer is (its keys or JSON type), the way DMDS' campania_apikey check names its answer."""
    data = _json(response) if data is None else data
    words = _words(data)
    if words is not None:
        return words
    if not quote_body:
        return f"dEngage answered HTTP {response.status} without a message ({_shape(data)})"
    return response.text().strip() or f"dEngage answered HTTP {response.status}"


_IP = re.compile(r"(?<![\w.:])((?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})(?![\w.:])")


def caller_ip(text: str) -> str | None:
    """The IP address an allowlist refusal names (dEngage puts it in actionResult [C])."""
    for candidate in _IP.findall(text):
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            continue
    return None


def _excerpt(response: HttpResponse) -> str:
    """The start of a body that is not dEngage's answer (a proxy's HTML page), on one line: for the log
    only, never for a reply."""
    return " ".join(response.text().split())[:200] or "an empty body"


def _foreign_page(response: HttpResponse, data: Any) -> bool:
    """Whether a refusal is no dEngage answer: no JSON object, and an empty body or an HTML page (dEngage's
    own 401 is "Not auhenticated. Please re-login." [V], JSON or its text)."""
    if isinstance(data, dict):
        return False
    text = response.text().lstrip()
    html = "html" in response.headers.get("content-type", "").lower() or text.startswith("<")
    return not text or html


def _allowlist_refusal(response: HttpResponse, data: Any, quote_body: bool = True) -> IpNotAllowlisted | None:
    if not response.body.strip():
        # The allowlist's 403 comes before the credentials are checked, "sometimes with an empty body" [C]:
        # an empty 403 cannot mean the API user was refused, so it is taken for the allowlist.
        return IpNotAllowlisted(
            "dEngage answered 403 with an empty body, as it does to an address that is not on the account's "
            "API IP allowlist (Settings > Identity & Access Management > API IP Restriction)",
            None,
        )
    action = field_of(data, "actionResult") if isinstance(data, dict) else None
    text = action if isinstance(action, str) else response.text()
    if not any(word in text.lower() for word in ALLOWLIST_WORDS):
        return None
    ip = caller_ip(text)
    where = f"from {ip}" if ip else "from this gateway's address"
    # dEngage's actionResult is quoted; a raw body only where it cannot be an answer holding a secret.
    said = text if isinstance(action, str) or quote_body else ""
    return IpNotAllowlisted(
        f"dEngage refuses API calls {where}: the address is not on the account's API IP allowlist "
        f"(Settings > Identity & Access Management > API IP Restriction)"
        + (f": {said.strip()[:200]}" if said.strip() else ""),
        ip,
    )


def check_status(response: HttpResponse, what: str, *, quote_body: bool = True) -> Any:
    """The HTTP layer of every dEngage answer: raises the typed error of design.md's reply table, or
    returns the JSON body (None when it is not JSON) of a 2xx answer. `quote_body` off: an answer that may
    hold a secret (the login's): its raw body is quoted nowhere (see upstream_reason)."""
    status = response.status
    data = _json(response)
    if status == 401:
        if _foreign_page(response, data):
            raise TokenRejected(
                f"dEngage answered 401 to {what} with no dEngage answer (a proxy or WAF on the way?): "
                f"{_excerpt(response)}",
                foreign=True,
            )
        raise TokenRejected(f"dEngage answered 401 to {what}: {upstream_reason(response, data, quote_body=quote_body)}")
    if status == 403:
        refusal = _allowlist_refusal(response, data, quote_body)
        if refusal is not None:
            raise refusal
        if not isinstance(data, dict):
            raise UpstreamUnavailable(f"dEngage answered 403 to {what} with no dEngage answer: {_excerpt(response)}")
        raise UpstreamAuthFailed(
            f"dEngage answered 403 to {what}: the API user may not do this "
            f"({upstream_reason(response, data, quote_body=quote_body)})"
        )
    if status == 429:
        raise RateLimited(f"dEngage rate limit (429) on {what}", retry_after=response.retry_after(time.time()))
    if status >= 500:
        raise UpstreamUnavailable(f"dEngage answered {status} to {what}")
    if 300 <= status < 400:
        # Not processed where it was sent: a wrong api_base (http for https, a moved data centre).
        raise UpstreamUnavailable(f"dEngage answered {status} (a redirect) to {what}: check api_base")
    if status in (404, 405) and (not isinstance(data, dict) or field_of(data, "code") is None):
        # No dEngage answer (its envelope has a `code` [C]; a web framework's own 404 is {"detail": ...} or
        # {"title": ...}): the path or api_base is wrong, which no message should be refused for.
        raise UpstreamUnavailable(
            f"dEngage answered {status} to {what} with no dEngage answer: the path or api_base is wrong "
            "(smtp-gateway check-upstream shows which)"
        )
    if status >= 400 and not isinstance(data, dict):
        # No dEngage answer either: a proxy's or load balancer's page (400, 407, 408, 421), an operator
        # matter and temporary by nature. Never a refusal, and the page goes to the log, not to a reply.
        raise UpstreamUnavailable(
            f"dEngage answered {status} to {what} with no dEngage answer (a proxy or load balancer on the way?): "
            f"{_excerpt(response)}"
        )
    if status >= 400:
        words = _words(data)
        if words is None:
            # dEngage's JSON without any of the message keys: its raw body is no reply text (it may be anything,
            # of any length); the client reads a generic refusal, as DMDS' clients do, the log the body's start.
            generic = f"dEngage refused the call (HTTP {status}) without a reason ({_shape(data)})"
            said = f"{generic}: {_excerpt(response)}" if quote_body else generic
            raise UpstreamRejected(said, reply=replies.UPSTREAM_REFUSED.with_text(generic))
        raise UpstreamRejected(words)
    return data


def login_token(response: HttpResponse, reading: Reading | None = None) -> Token:
    """POST /rest/login's answer: the token, or UpstreamAuthFailed when the credentials are refused."""
    try:
        # The login's answer is the token's: never quoted (a token under a name the gateway does not read
        # would be logged, queued as last_error and served by /readyz), only its words or its keys.
        data = check_status(response, "login", quote_body=False)
    except TokenRejected as exc:
        if exc.foreign:
            raise ForeignRefusal(exc.reason) from None
        raise UpstreamAuthFailed(f"dEngage refused the API user's credentials ({exc.reason})") from None
    except UpstreamRejected as exc:
        # 401 or another 4xx in dEngage's own JSON on login: the API user's key or password is wrong (a page that
        # is not dEngage's answer, or an empty 403, is temporary: check_status raised that already).
        raise UpstreamAuthFailed(f"dEngage refused the API user's credentials ({exc.reason})") from None
    reading = reading if reading is not None else Reading()
    # At the root [C], or inside the {code, message, data} envelope the other endpoints use [I].
    places = [p for p in (data, field_of(data, "data") if isinstance(data, dict) else None) if isinstance(p, dict)]
    token = next((t for p in places if (t := reading.first(p, "access_token", TOKEN_KEYS["access_token"]))), None)
    if not isinstance(token, str) or not token:
        if data is None:
            raise UpstreamUnavailable("dEngage answered the login with a body that is not JSON")
        said = _words(data)
        raise UpstreamAuthFailed(f"dEngage login returned no token ({_shape(data)}{f': {said}' if said else ''})")
    expires = next((e for p in places if (e := reading.first(p, "expires_in", TOKEN_KEYS["expires_in"]))), None)
    lasts = expires if isinstance(expires, float) else number(expires)  # 120, 120.5 or "120"
    seconds = float(lasts) if lasts is not None and lasts > 0 else DEFAULT_EXPIRES_IN
    return Token(token, seconds)


class Unreadable(ValueError):
    """A field of an answer whose JSON type or value the gateway cannot read (a number that is no number)."""


class AnswerNotUnderstood(UpstreamUnavailable):
    """dEngage answered, and a status field of the answer cannot be read (its JSON type is [I]): temporary,
    like every answer read by a guess that proved wrong; never a refusal and never an internal error."""


def _count(value: Any) -> int | None:
    """A numeric field read whatever its JSON type (3, 3.0, "3": the types of the answers' fields are [C]/[I],
    never documented); None when absent (null). Raises Unreadable for anything else."""
    if value is None:
        return None
    found = number(value)
    if found is None:
        raise Unreadable(f"{str(value)[:40]!r} is not a number")
    return found


def _flag(value: Any) -> bool:
    """A yes/no field read whatever its JSON type: true, 1, "true", "1" (absent: no). Raises Unreadable."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        return value.strip().lower() == "true"
    return bool(_count(value))


def _failure_code(data: dict[str, Any]) -> int | None:
    """A non-zero `code`, or a `data.HasError`/`errorCount` flag [C] (HTTP 200 with the failure inside).
    Each read whatever its JSON type (0, "0", 0.0) and letter case (Code, hasError); raises Unreadable when
    one is there but unreadable."""
    code = _count(field_of(data, "code"))
    if code is not None and code != 0:
        return code
    inner = field_of(data, "data")
    if isinstance(inner, dict):
        errors = _count(field_of(inner, "errorCount"))
        if _flag(field_of(inner, "HasError")) or (errors is not None and errors > 0):
            return -1
    return None


def _ids(value: Any) -> Iterator[str]:
    """Id strings in a value: a string or a number (a numeric id is kept as its digits), a list of them or of
    objects, or an object of them. Never an address (any value with '@': the id keys are [I], and an object's
    `email` is the recipient, not its id), and from an object only its known id keys (ID_KEYS) or the
    recipient -> id mapping ({"<address>": "<id>"}); else none, as an answer without an id."""
    if isinstance(value, str) and value:
        if "@" not in value:
            yield value
    elif isinstance(value, int) and not isinstance(value, bool):
        yield str(value)
    elif isinstance(value, float) and value.is_integer():
        yield str(int(value))
    elif isinstance(value, list):
        for item in value:
            yield from _ids(item)
    elif isinstance(value, dict):
        for key in ID_KEYS:
            found = field_of(value, key)
            if found is not None:
                yield from _ids(found)
                return
        for name, item in value.items():  # {"<recipient>": "<id>"}: keyed by the address
            if isinstance(name, str) and "@" in name and not isinstance(item, (list, dict)):
                yield from _ids(item)


def _first(places: list[dict[str, Any]], keys: tuple[str, ...]) -> str | None:
    for place in places:
        for key in keys:
            found = next(_ids(field_of(place, key)), None)
            if found:
                return found
    return None


def _says_failed(response: HttpResponse) -> bool:
    """Whether an answer is dEngage's envelope saying the call failed: a JSON object with a non-zero `code`
    or `data.HasError`/`errorCount` (_failure_code). Anything else (a page, other JSON, an unreadable field,
    code 0) says nothing of whether the mail went."""
    data = _json(response)
    if not isinstance(data, dict):
        return False
    try:
        return _failure_code(data) is not None
    except Unreadable:
        return False


def send_result(response: HttpResponse) -> SendResult:
    """POST /rest/transactional/email's answer: the recipient's transactional id, or a typed error.

    HTTP 200 with a non-zero `code` is a failure, never a success [C]: a refusal carrying dEngage's
    message (every code, known or not, refuses: none is documented as temporary)."""
    if response.status == 500 and _says_failed(response):
        # dEngage's own envelope saying the call failed (review today8b F4): not sent, a plain temporary failure.
        # Ambiguous, an outage answering 500 to every call would hold every message under ambiguous = "hold".
        raise UpstreamUnavailable(f"dEngage answered 500 with its own error, not sent ({_excerpt(response)})")
    if response.status in AMBIGUOUS_STATUSES:
        # Sent, and whatever failed (dEngage itself, or a proxy that forwarded it) may have failed after the
        # mail went: resending may deliver a second copy (counted, held under ambiguous = "hold"). Only the
        # send: a read-only call's 5xx stays check_status' plain "temporary".
        raise AnswerLost(
            f"dEngage answered {response.status} to the send: it may have been sent ({_excerpt(response)})"
        )
    data = check_status(response, "the send")
    if not isinstance(data, dict):
        # It answered, but nothing says whether it sent: the ambiguous case, like a lost answer.
        raise AnswerLost(f"dEngage answered {response.status} with a body that is not a JSON object")
    try:
        code = _failure_code(data)
    except Unreadable as exc:
        # Sent, and the answer says neither success nor failure in a way that can be read: ambiguous.
        raise AnswerLost(f"dEngage answered {response.status} with an unreadable status field ({exc})") from None
    if code is not None and CODES.get(code, "refused") == "refused":
        raise UpstreamRejected(upstream_reason(response, data))
    places = [p for p in (field_of(data, "data"), data) if isinstance(p, dict)]
    upstream_id, group_id = _first(places, ID_KEYS), _first(places, GROUP_KEYS)
    if not upstream_id:
        # Only a `code` 0 or an id says the call was taken. An empty id list says no recipient was; an answer
        # with neither ({"message": "Subject cannot be empty"}) says nothing: both ambiguous, resent, counted.
        # (An id list with entries none of which is an id the gateway takes, an address, is not empty: the
        # call was taken, and the reply falls back to the local queue id, logged once.)
        empty = next((key for place in places for key in ID_KEYS if field_of(place, key) in ([], {}, "")), None)
        if empty is not None:
            raise AnswerLost(f"dEngage answered {response.status} with an empty {empty} ({answer_keys(data)})")
        if field_of(data, "code") is None and group_id is None:
            raise AnswerLost(
                f"dEngage answered {response.status} with neither a code nor an id ({answer_keys(data)}): "
                f"{upstream_reason(response, data)[:200]}"
            )
    return SendResult(upstream_id=upstream_id or "", group_id=group_id, keys=tuple(sorted(data)))


# The froms answer's keys [I]: its shape is not documented, and C-TT only names what it lists (a name and an
# address per identity). Each field from its candidates, first match wins, letter case ignored; an item may
# also be a string ("Name <a@b.c>" or "a@b.c"), and an address value an object with the address inside.
IDENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "list": ("data", "items", "result", "results", "froms", "emailFroms", "list"),
    "id": ("id", "fromId", "emailFromId", "publicId", "uuid", "fromNameId"),
    "name": ("name", "fromName", "displayName", "senderName", "title"),
    "address": (
        "fromAddress",
        "address",
        "email",
        "emailAddress",
        "fromEmail",
        "emailFrom",
        "from",
        "senderEmail",
        "senderAddress",
    ),
}
# Keys an identity may have that the gateway does not read: not reported as unexpected. Their values are
# never taken for identities (a `createdBy` address is a user, not a sender).
IDENTITY_OTHER_KEYS = ("createdBy", "createdDate", "modifiedBy", "modifiedDate", "replyTo", "isDefault", "status")


@dataclass(frozen=True, slots=True)
class Identity:
    """One of the account's From identities (GET /rest/email/froms): its id (None when the answer gives
    none), its display name and its address (lower case)."""

    id: str | None
    name: str
    address: str


def _mailbox(value: Any) -> tuple[str, str] | None:
    """(name, address) of "Name <a@b.c>" or "a@b.c"."""
    if not isinstance(value, str) or "@" not in value:
        return None
    name, address = parseaddr(value)
    address = address.strip().lower().rstrip(".")
    return (name.strip(), address) if "@" in address and " " not in address else None


def _identity(item: Any, reading: Reading) -> Identity | None:
    if isinstance(item, str):
        found = _mailbox(item)
        return Identity(None, *found) if found else None
    if not isinstance(item, dict):
        return None
    fields = reading.fields(
        item, {k: IDENTITY_KEYS[k] for k in ("id", "name", "address")}, "identities[].", IDENTITY_OTHER_KEYS
    )
    address = fields.get("address")
    if isinstance(address, dict):  # {"from": {"name": ..., "address": ...}}
        inner = reading.fields(address, {k: IDENTITY_KEYS[k] for k in ("name", "address")}, "identities[].address.")
        address, fields = inner.get("address"), {**inner, **{k: v for k, v in fields.items() if k != "address"}}
    mailbox = _mailbox(address)
    if mailbox is None:
        return None
    raw_id = fields.get("id")
    name = fields.get("name")
    return Identity(
        None if raw_id is None or raw_id == "" else str(raw_id),
        name.strip() if isinstance(name, str) and name.strip() else mailbox[0],
        mailbox[1],
    )


def _identity_list(data: Any, reading: Reading, depth: int = 0) -> list[Any] | None:
    if isinstance(data, list):
        return data
    if not isinstance(data, dict) or depth > 2:
        return None
    inner = reading.first(data, "list", IDENTITY_KEYS["list"])
    return _identity_list(inner, reading, depth + 1)


def from_identities(response: HttpResponse, reading: Reading | None = None) -> tuple[Identity, ...]:
    """GET /rest/email/froms' answer: the account's From identities (in order, each address once).
    UpstreamUnavailable when the answer is not one the gateway can read (never: no identity, which would
    refuse every sender for good)."""
    data = check_status(response, "the froms list")
    if data is None:
        raise UpstreamUnavailable("dEngage answered the froms list with a body that is not JSON")
    if isinstance(data, dict):
        try:
            refused = _failure_code(data) is not None
        except Unreadable as exc:
            # Not a crash: the identities' callers hold this failure (FAILURE_HOLD) as they do any other.
            raise AnswerNotUnderstood(
                f"dEngage's froms answer has a status field (code, data.HasError, data.errorCount) the gateway "
                f"cannot read ({exc}): correct _failure_code in {__name__.replace('.', '/')}.py"
            ) from None
        if refused:
            raise UpstreamUnavailable(f"dEngage refused the froms list: {upstream_reason(response, data)}")
    reading = reading if reading is not None else Reading()
    items = _identity_list(data, reading)
    if items is None:
        raise UpstreamUnavailable(
            "dEngage's froms answer holds no list the gateway recognises (smtp-gateway check-upstream shows it)"
        )
    found: dict[str, Identity] = {}
    for item in items:
        identity = _identity(item, reading)
        if identity is not None:
            found.setdefault(identity.address, identity)
    if items and not found:
        raise UpstreamUnavailable(
            "dEngage's froms answer lists identities without an address the gateway recognises "
            f"({reading.describe()}; smtp-gateway check-upstream shows it)"
        )
    return tuple(found.values())


def identity_for(identities: tuple[Identity, ...], address: str) -> Identity | None:
    """The identity whose address is `address`, else the first of its domain (dEngage lets the local part
    vary [V]), else None."""
    address = address.lower()
    domain = address.rpartition("@")[2]
    same_domain = [i for i in identities if i.address.rpartition("@")[2] == domain]
    return next((i for i in same_domain if i.address == address), same_domain[0] if same_domain else None)
