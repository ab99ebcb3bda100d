"""Golden JSON for the dEngage wire (gateway/providers/dengage/wire.py): every request name checked in one
place, and the answers (ids, code != 0, allowlist 403, froms) parsed as the wire table says.

Regenerate after a deliberate wire change: UPDATE_GOLDEN=1 python -m pytest tests/test_dengage_payload.py
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.core.errors import AnswerLost, RateLimited, UpstreamAuthFailed, UpstreamRejected, UpstreamUnavailable
from gateway.core.model import Address, Attachment, Message, Principal, Submission
from gateway.mime import parse, text_to_html
from gateway.providers.dengage import wire
from gateway.providers.dengage.data import DengageLogin, DengageParams
from gateway.upstream.response import HttpResponse
from gateway.upstream.shape import Reading

FIXTURES = Path(__file__).parent / "fixtures" / "dengage"
PRINCIPAL = Principal(account="crm", login="erp", extra=DengageLogin(("erp",)))
ANN = "ann@example.com"


def submission(
    subject: str = "Invoice 42", html: str = "<p>Hello</p>", text: str | None = "Hello", **kwargs: Any
) -> Submission:
    message = Message(
        subject=subject,
        from_=Address("billing@crm.example", "CRM Billing"),
        sender=None,
        reply_to=kwargs.pop("reply_to", None),
        to=(Address(ANN, "Ann"),),
        cc=(Address("carl@example.com", "Carl"),),
        html=html,
        text=text,
        attachments=kwargs.pop("attachments", ()),
        x_headers=kwargs.pop("x_headers", ()),
    )
    params = DengageParams(tags=tuple(kwargs.pop("tags", [])), template=kwargs.pop("template", None), ref="r" * 32)
    return Submission(
        principal=PRINCIPAL,
        mail_from="billing@crm.example",
        rcpt_tos=(ANN, "carl@example.com", "hidden@example.com"),
        message=message,
        params=params,
    )


CASES: dict[str, tuple[Submission, str]] = {
    "one_recipient": (submission(reply_to=Address("support@crm.example", "Support")), ANN),
    "bcc_recipient": (submission(), "hidden@example.com"),
    "attachments": (
        submission(
            attachments=(
                Attachment("invoice.pdf", "application/pdf", b"%PDF-1.4\x00\xff"),
                Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo@crm", inline=True),
            )
        ),
        ANN,
    ),
    "x_headers_and_tags": (
        submission(
            x_headers=(("X-Order-Id", "42"), ("X-Campaign", "spring"), ("X-Campaign", "b2b")),
            tags=["crm", "erp", "invoices"],
        ),
        ANN,
    ),
    "template_only": (
        submission(subject="", html=text_to_html(""), text=None, template="2206f32b-8d1a-4058-929c-de600493862a"),
        ANN,
    ),
    "template_with_body": (submission(template="2206f32b-8d1a-4058-929c-de600493862a"), ANN),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_payload_matches_golden(name: str) -> None:
    sub, recipient = CASES[name]
    payload = wire.build_payload(sub, recipient)
    path = FIXTURES / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert payload == json.loads(path.read_text(encoding="utf-8"))


def test_a_call_names_only_its_own_recipient() -> None:
    sub, _ = CASES["one_recipient"]
    for recipient in sub.rcpt_tos:
        text = json.dumps(wire.build_payload(sub, recipient))
        others = [r for r in sub.rcpt_tos if r != recipient]
        assert recipient in text and not any(other in text for other in others)


def test_attachment_bytes_survive_base64() -> None:
    sub, _ = CASES["attachments"]
    [pdf, png] = wire.build_payload(sub, ANN)["attachments"]
    assert base64.b64decode(pdf["content"]) == b"%PDF-1.4\x00\xff"
    assert (png["name"], png["type"]) == ("logo.png", "image/png")


def test_x_headers_come_from_mime_without_the_gateway_options() -> None:
    message = parse(
        b"From: a@crm.example\r\nTo: b@example.com\r\nSubject: s\r\nX-Order-Id: 42\r\n"
        b"X-Gateway-Tags: t1\r\nx-trace: =?utf-8?q?caf=C3=A9?=\r\nX-Mailer: ERP 9\r\n\r\nbody\r\n"
    )
    assert message.x_headers == (("X-Order-Id", "42"), ("x-trace", "café"), ("X-Mailer", "ERP 9"))
    assert message.options == {"tags": "t1"}


def test_idempotency_key_is_stable_per_message_and_recipient() -> None:
    key = wire.idempotency_key("ref-1", "Ann@Example.com")
    assert key == wire.idempotency_key("ref-1", "ann@example.com")
    assert key != wire.idempotency_key("ref-1", "bob@example.com")
    assert key != wire.idempotency_key("ref-2", "ann@example.com")


PROXY_PAGE = b"<html><head><title>408 Request Time-out</title></head><body><h1>408 Request Time-out</h1></body></html>"


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> HttpResponse:
    raw = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else b""
    return HttpResponse(status=status, body=raw, headers=headers or {})


@pytest.mark.parametrize(
    ("body", "upstream_id", "group"),
    [
        ({"code": 0, "data": {"transactionalIds": ["t-1"], "groupId": "g-1"}}, "t-1", "g-1"),
        ({"code": 0, "data": {"transactionalIds": [{"email": ANN, "transactionalId": "t-2"}]}}, "t-2", None),
        ({"code": 0, "data": {"transactionalIds": {ANN: "t-3"}, "groupId": "g-3"}}, "t-3", "g-3"),
        ({"code": 0, "transactionId": "t-4", "data": {}}, "t-4", None),
        ({"code": 0, "data": {"trackingId": "t-5"}}, "t-5", None),
        ({"message": "Success", "data": {"groupId": "g-6"}}, "", "g-6"),  # no code, no recipient id
        # The fields' JSON types are [C]/[I]: numbers as strings or floats, ids as numbers, all read.
        ({"code": "0", "data": {"transactionalIds": ["t-7"], "errorCount": "0", "HasError": "false"}}, "t-7", None),
        ({"code": 0.0, "data": {"transactionalIds": ["t-8"], "errorCount": 0.0, "HasError": 0}}, "t-8", None),
        ({"code": 0, "data": {"transactionId": 123456}}, "123456", None),
        ({"code": 0, "data": {"transactionalIds": [987, "t-9"], "groupId": 55}}, "987", "55"),
        ({"code": 0, "data": {"transactionalIds": {ANN: 4242}}}, "4242", None),
        # Letter case ignored (an ASP.NET serialiser writes PascalCase or camelCase).
        ({"Code": 0, "Data": {"TransactionalIds": ["t-10"], "GroupId": "g-10"}}, "t-10", "g-10"),
        ({"code": 0, "data": {"transactionalids": [{"Email": ANN, "TransactionalId": "t-11"}]}}, "t-11", None),
        # Never the recipient's address, nor a value under a key no table names (review vendors3 F6): no id.
        ({"code": 0, "data": {"transactionalIds": [{"email": ANN, "trackingNo": "T-1"}]}}, "", None),
        ({"code": 0, "data": {"transactionalIds": [ANN]}}, "", None),
        ({"code": 0, "data": {"transactionId": ANN, "groupId": "g-12"}}, "", "g-12"),
    ],
)
def test_send_answers_give_the_recipient_id(body: dict[str, Any], upstream_id: str, group: str | None) -> None:
    result = wire.send_result(answer(200, body))
    assert (result.upstream_id, result.group_id) == (upstream_id, group)


@pytest.mark.parametrize(
    ("response", "error", "text"),
    [
        (answer(200, {"code": 11, "message": "2206f32b content is null"}), UpstreamRejected, "content is null"),
        (answer(200, {"code": 4711, "message": "Something new"}), UpstreamRejected, "Something new"),
        (answer(200, {"code": "7"}), UpstreamRejected, "code 7"),
        (answer(200, {"code": 0, "data": {"HasError": True}, "message": "1 error"}), UpstreamRejected, "1 error"),
        (answer(200, {"code": 0, "data": {"HasError": "True"}, "message": "2 errors"}), UpstreamRejected, "2 errors"),
        (answer(200, {"code": "0", "data": {"errorCount": "1"}, "message": "3 errors"}), UpstreamRejected, "3 errors"),
        # The failure spelled in another letter case is still a failure (never a 250 for nothing sent).
        (answer(200, {"Code": 11, "Message": "c1 content is null", "Data": None}), UpstreamRejected, "c1 content"),
        (answer(200, {"code": 0, "data": {"hasError": True}, "message": "4 errors"}), UpstreamRejected, "4 errors"),
        (answer(200, {"CODE": "0", "Data": {"ErrorCount": 2}, "MESSAGE": "5 errors"}), UpstreamRejected, "5 errors"),
        (answer(200, {"Code": 0, "Data": {"HASERROR": "true"}}), UpstreamRejected, "code 0"),
        # Nothing says the call was taken (no code, no id; or an empty id list): ambiguous, resent and counted.
        (answer(200, {"message": "Subject cannot be empty"}), AnswerLost, "neither a code nor an id"),
        (answer(200, {}), AnswerLost, "neither a code nor an id"),
        (answer(200, {"code": 0, "data": {"transactionalIds": []}}), AnswerLost, "empty transactionalIds"),
        (answer(200, {"code": 0, "data": {"transactionalIds": [], "groupId": "g"}}), AnswerLost, "empty"),
        # Sent, and the status fields cannot be read: ambiguous (AnswerLost), never a crash.
        (answer(200, {"code": 0, "data": {"errorCount": "some"}}), AnswerLost, "unreadable status field"),
        (answer(200, {"code": [0], "data": {}}), AnswerLost, "unreadable status field"),
        (answer(200, {"code": "ok"}), AnswerLost, "unreadable status field"),
        (answer(200, {"code": 0, "data": {"HasError": {"any": 1}}}), AnswerLost, "unreadable status field"),
        (
            answer(400, {"title": "One or more validation errors occurred.", "errors": {"send.to": ["not a string"]}}),
            UpstreamRejected,
            "send.to: not a string",
        ),
        (answer(401, {"message": "Not auhenticated. Please re-login."}), wire.TokenRejected, "re-login"),
        (
            answer(403, {"actionResult": "Your IP address 203.0.113.9 is not whitelisted"}),
            wire.IpNotAllowlisted,
            "203.0.113.9",
        ),
        (answer(403, {"message": "Permission denied"}), UpstreamAuthFailed, "Permission denied"),
        (answer(429, b"", {"retry-after": "3"}), RateLimited, "429"),
        (answer(503, b"unavailable"), UpstreamUnavailable, "503"),
        (answer(200, b"<html>proxy</html>"), AnswerLost, "not a JSON object"),
        # No dEngage answer: a path or an api_base guessed wrong refuses no message.
        (answer(404, b"<html>Not Found</html>"), UpstreamUnavailable, "the path or api_base is wrong"),
        (answer(405, b""), UpstreamUnavailable, "the path or api_base is wrong"),
        (answer(404, {"code": 404, "message": "Content not found"}), UpstreamRejected, "Content not found"),
        # A web framework's own JSON 404 (no dEngage envelope): the path is wrong too.
        (answer(404, {"detail": "Not Found"}), UpstreamUnavailable, "the path or api_base is wrong"),
        (answer(404, {"title": "Not Found", "status": 404}), UpstreamUnavailable, "the path or api_base is wrong"),
        # A 4xx that is not dEngage's JSON (a proxy's or load balancer's page): temporary, never a refusal.
        (answer(400, PROXY_PAGE), UpstreamUnavailable, "no dEngage answer"),
        (answer(407, PROXY_PAGE), UpstreamUnavailable, "408 Request Time-out"),  # the page, cut, in the log
        (answer(408, PROXY_PAGE), UpstreamUnavailable, "a proxy or load balancer"),
        (answer(421, b""), UpstreamUnavailable, "an empty body"),
        (answer(403, PROXY_PAGE), UpstreamUnavailable, "no dEngage answer"),
        # The allowlist's 403 "sometimes with an empty body" [C]: the allowlist, not the API user refused.
        (answer(403, b""), wire.IpNotAllowlisted, "API IP allowlist"),
    ],
)
def test_send_failures_are_typed(response: HttpResponse, error: type[Exception], text: str) -> None:
    with pytest.raises(error) as info:
        wire.send_result(response)
    assert text in str(info.value)


GATEWAY_TIMEOUT = b"<html><body><h1>504 Gateway Time-out</h1></body></html>"


@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_5xx_after_sending_is_ambiguous(status: int) -> None:
    """dEngage's own 500, or a proxy's 502/504 after it forwarded the call: the mail may be out. AnswerLost:
    counted in smtp_gateway_ambiguous_calls_total and held under ambiguous = "hold" (review vendors3 F3)."""
    with pytest.raises(AnswerLost) as info:
        wire.send_result(answer(status, GATEWAY_TIMEOUT, {"content-type": "text/html"}))
    assert str(status) in info.value.reason and "<html" not in info.value.reply.text.lower()


@pytest.mark.parametrize(
    ("status", "body", "ambiguous"),
    [
        (500, {"code": 500, "message": "Internal error"}, False),  # dEngage's envelope: it failed, not sent
        (500, {"code": 0, "data": {"HasError": True, "Errors": ["db down"]}}, False),
        (500, {"Code": "17", "Message": "Service unavailable"}, False),
        (500, {"message": "An error has occurred."}, True),  # no code: says nothing of the mail
        (500, {"code": 0, "data": {"transactionId": "t-1"}}, True),  # a success inside a 500: cannot tell
        (500, {"code": "x"}, True),  # a code that is no number
        (502, {"code": 500, "message": "Internal error"}, True),  # a proxy's status: the answer may be lost
        (504, {"code": 500, "message": "Internal error"}, True),
    ],
)
def test_a_500_in_dengages_own_error_envelope_is_temporary(status: int, body: object, ambiguous: bool) -> None:
    """Review today8b F4: a 500 whose body is dEngage's envelope saying it failed is a plain temporary failure
    (not sent, not counted ambiguous, never held); other 500s, and 502/504, stay ambiguous."""
    with pytest.raises(UpstreamUnavailable) as info:
        wire.send_result(answer(status, body))
    assert isinstance(info.value, AnswerLost) is ambiguous


@pytest.mark.parametrize("status", [503, 429])
def test_a_503_or_429_says_it_was_not_taken(status: int) -> None:
    with pytest.raises(UpstreamUnavailable) as info:
        wire.send_result(answer(status, GATEWAY_TIMEOUT, {"content-type": "text/html"}))
    assert not isinstance(info.value, AnswerLost)


def test_a_refusal_without_dengages_words_is_not_quoted_in_the_reply() -> None:
    """dEngage's JSON 4xx with none of the message keys: a generic reply, the body in the log only (as DMDS)
    (review vendors3 F7)."""
    with pytest.raises(UpstreamRejected) as info:
        wire.send_result(answer(400, {"internalTrace": "at Dengage.Api.Controllers.Send(...) line 42"}))
    assert "Dengage.Api" not in info.value.reply.text and "HTTP 400" in info.value.reply.text
    assert "Dengage.Api" in info.value.reason  # for the log
    assert info.value.reply.code == 554


def test_a_page_that_is_not_dengages_answer_never_reaches_a_reply() -> None:
    for status in (400, 403, 407, 408, 421):
        with pytest.raises(UpstreamUnavailable) as info:
            wire.send_result(answer(status, PROXY_PAGE + b" " * 50 + b"x" * 500))
        assert "<html" not in info.value.reply.text.lower()
        assert len(info.value.reason) < 400  # the page is cut short in the log too


def test_allowlist_refusal_names_the_caller_ip_and_is_an_auth_failure() -> None:
    with pytest.raises(wire.IpNotAllowlisted) as info:
        wire.send_result(answer(403, {"message": "", "actionResult": "IP 2001:db8::7 not whitelisted."}))
    assert isinstance(info.value, UpstreamAuthFailed)
    assert info.value.caller_ip == "2001:db8::7"
    assert "API IP allowlist" in info.value.reason


def test_rate_limit_carries_retry_after() -> None:
    with pytest.raises(RateLimited) as info:
        wire.send_result(answer(429, b"", {"retry-after": "3"}))
    assert info.value.retry_after == 3.0


def test_login_answers() -> None:
    assert wire.login_token(answer(200, {"access_token": "tok", "expires_in": 120})) == wire.Token("tok", 120.0)
    assert wire.login_token(answer(200, {"access_token": "tok"})).expires_in == 3600.0  # absent: an hour
    assert wire.login_token(answer(200, {"access_token": "tok", "expires_in": "120"})).expires_in == 120.0
    assert wire.login_token(answer(200, {"access_token": "tok", "expires_in": "soon"})).expires_in == 3600.0
    with pytest.raises(UpstreamAuthFailed, match="credentials"):
        wire.login_token(answer(401, {"message": "bad"}))
    with pytest.raises(wire.IpNotAllowlisted):
        wire.login_token(answer(403, {"actionResult": "IP 10.1.2.3 is not whitelisted"}))
    with pytest.raises(UpstreamAuthFailed, match="no token"):
        wire.login_token(answer(200, {"code": 5, "message": "User locked"}))
    # Not a verdict on the credentials: a proxy's page is temporary, an empty 403 is the allowlist [C].
    with pytest.raises(UpstreamUnavailable, match="no dEngage answer"):
        wire.login_token(answer(407, PROXY_PAGE))
    with pytest.raises(wire.IpNotAllowlisted):
        wire.login_token(answer(403, b""))
    assert wire.login_body("k", "p") == {"userkey": "k", "password": "p"}


TOKEN = "eyJhbGciOi.SessionTokenSecret.42"


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        # A 2xx with the token under a name the gateway does not read: named by its keys, never quoted.
        (200, {"jwt": TOKEN, "expires": 3600}, UpstreamAuthFailed),
        (200, {"result": {"access_token": TOKEN}}, UpstreamAuthFailed),
        (200, {"code": 0, "data": {"jwt": TOKEN}}, UpstreamAuthFailed),
        (200, TOKEN, UpstreamAuthFailed),  # a bare JSON string
        (200, [TOKEN], UpstreamAuthFailed),
        # Refusals whose JSON has no message: the same (their raw body was the reason).
        (401, {"jwt": TOKEN}, UpstreamAuthFailed),
        (403, {"jwt": TOKEN}, UpstreamAuthFailed),
        (400, {"jwt": TOKEN}, UpstreamAuthFailed),
        (401, TOKEN.encode(), UpstreamAuthFailed),  # not JSON
        # An allowlist refusal found in a raw body: the refusal without the body.
        (403, {"jwt": TOKEN, "note": "not whitelisted"}, wire.IpNotAllowlisted),
    ],
)
def test_a_login_answer_is_never_quoted(status: int, body: Any, error: type[Exception]) -> None:
    """The login's answer may hold the token under a name the gateway does not read (the login wire is
    [C]/[I]): its reason, logged, queued as last_error, printed by check-upstream and served by /readyz,
    names the answer's keys or its type only."""
    with pytest.raises(error) as info:
        wire.login_token(answer(status, body))
    assert TOKEN not in str(info.value) and "SessionTokenSecret" not in str(info.value)
    if status == 200 and isinstance(body, dict):
        assert "keys: " in str(info.value)  # what came instead, for TOKEN_KEYS
    # A call that is not the login keeps dEngage's raw answer as its reason.
    if status == 400:
        with pytest.raises(UpstreamRejected, match="SessionTokenSecret"):
            wire.send_result(answer(status, body))


@pytest.mark.parametrize(
    "body",
    [
        {
            "code": 0,
            "data": [
                {"id": 1, "name": "CRM", "fromAddress": "Billing@CRM.example"},
                {"id": 2, "name": "News", "fromAddress": "news@mail.crm.example"},
            ],
        },
        [{"EmailFrom": "CRM Billing <billing@crm.example>"}, {"EmailFrom": "news@mail.crm.example"}],
        {"data": {"items": [{"from": {"address": "billing@crm.example"}}, "news@mail.crm.example"]}},
    ],
)
def test_froms_are_found_in_any_shape(body: Any) -> None:
    found = wire.from_identities(answer(200, body))
    assert [i.address for i in found] == ["billing@crm.example", "news@mail.crm.example"]


def test_identities_keep_id_name_and_address_and_only_their_addresses() -> None:
    body = [
        {
            "Id": "7d1c", "FromName": "CRM Billing", "FromEmail": "Billing@CRM.example",
            "CreatedBy": "admin@corp.example", "ReplyTo": "replies@corp.example", "Color": "blue",
        },
        {"publicId": "9e2f", "displayName": "News", "emailAddress": "News <news@mail.crm.example>"},
    ]  # fmt: skip
    reading = Reading()
    found = wire.from_identities(answer(200, body), reading)
    assert found == (
        wire.Identity("7d1c", "CRM Billing", "billing@crm.example"),
        wire.Identity("9e2f", "News", "news@mail.crm.example"),
    )
    # Address-looking values of other keys are no identities; a key nobody expected is named.
    assert reading.unexpected == ["identities[].Color"]
    assert reading.matched["identities[].address"] == "FromEmail"


@pytest.mark.parametrize(
    "body",
    [
        {"code": 0, "data": [{"id": 1, "label": "CRM", "value": "billing@crm.example"}]},  # no address key known
        {"code": 0, "data": {"total": 1}},  # no list
    ],
)
def test_froms_answer_not_recognised_is_temporary(body: Any) -> None:
    # Never "no identities" (every sender refused for good): MAIL FROM gets 451 and the log says why.
    with pytest.raises(UpstreamUnavailable, match="check-upstream"):
        wire.from_identities(answer(200, body))


@pytest.mark.parametrize(
    "body",
    [
        {"access_token": "tok", "expires_in": 600},
        {"code": 0, "message": "Success", "data": {"accessToken": "tok", "expiresIn": 600}},
    ],
)
def test_login_token_in_either_spelling(body: Any) -> None:
    assert wire.login_token(answer(200, body)) == wire.Token("tok", 600.0)


def test_from_fields_go_at_their_paths_beside_the_gateways_own() -> None:
    sender = {"content.fromAddress": "desk@crm.example", "content.fromName": "Desk", "sender.identity.id": "7d1c"}
    body = wire.build_payload(submission(), ANN, sender)
    assert body["content"] == {
        "subject": "Invoice 42",
        "html": "<p>Hello</p>",
        "fromAddress": "desk@crm.example",
        "fromName": "Desk",
    }
    assert body["sender"] == {"identity": {"id": "7d1c"}}
    assert body["send"] == {"to": ANN}


def test_identity_for_an_address_or_its_domain() -> None:
    ids = (
        wire.Identity("1", "Billing", "billing@crm.example"),
        wire.Identity("2", "News", "news@mail.crm.example"),
        wire.Identity("3", "Desk", "desk@crm.example"),
    )
    assert wire.identity_for(ids, "Desk@CRM.example") == ids[2]
    assert wire.identity_for(ids, "someone@crm.example") == ids[0]  # the domain's first
    assert wire.identity_for(ids, "x@other.example") is None
