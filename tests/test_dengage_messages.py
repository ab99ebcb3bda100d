"""dEngage messages as the sender wrote them: the From where the account says (off by default, said at startup
and by check-config), inline images with their Content-ID, a default Subject, only the X- headers the
account forwards; against the sandbox in both answer shapes."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest

from gateway.providers.sandbox import SHAPES, SandboxState
from tests.harness import DENGAGE_SENDER, DENGAGE_USER, Running, sandbox_for_tests
from tests.ops_util import captured_with_context, sample
from tests.test_dengage_e2e import message, send

FROM_FIELDS = {
    "from_address_field": "content.fromAddress",
    "from_name_field": "content.fromName",
    "from_identity_field": "content.fromId",
}


def sent_body(gw: Running) -> dict[str, Any]:
    body: dict[str, Any] = gw.calls("send", status=200)[-1]["body"]
    return body


def test_from_is_not_sent_by_default_and_startup_says_so(gateway_factory: Callable[..., Running]) -> None:
    with captured_with_context() as logs:
        gw = gateway_factory(dengage={})
    [note] = [e for e in logs if e["event"] == "account_note"]
    assert note["account"] == "crm" and "default sender" in note["note"] and note["log_level"] == "warning"
    assert send(gw, message("default sender", sender="CRM Billing <billing@crm.example>"))[0] == 250
    body = sent_body(gw)
    assert set(body) == {"send", "content", "tags"} and set(body["content"]) == {"subject", "html"}


@pytest.mark.parametrize("shape", SHAPES)
def test_from_fields_and_identity_where_the_account_says(gateway_factory: Callable[..., Running], shape: str) -> None:
    sandbox = sandbox_for_tests(SandboxState(shape=shape))  # type: ignore[arg-type]
    with captured_with_context() as logs:
        gw = gateway_factory(sandbox=sandbox, dengage=FROM_FIELDS)
    assert [e for e in logs if e["event"] == "account_note"] == []
    assert send(gw, message("exact identity", sender="CRM Billing <billing@crm.example>"))[0] == 250
    assert (
        send(gw, message("same domain", sender="Desk <desk@mail.crm.example>"), mail_from="desk@mail.crm.example")[0]
        == 250
    )
    answer = gw.calls("froms")[0]["response"]
    items = answer if isinstance(answer, list) else answer["data"]
    ids = {str(i.get("id", i.get("Id"))): i.get("fromAddress", i.get("FromEmail")) for i in items}
    exact, domain = (r["body"]["content"] for r in gw.calls("send", status=200))
    assert (exact["fromAddress"], exact["fromName"], ids[exact["fromId"]]) == (
        "billing@crm.example",
        "CRM Billing",
        "billing@crm.example",
    )
    # The local part and the name may vary within an identity's domain (dEngage documents it): that
    # domain's identity, with the message's own address and name.
    assert (domain["fromAddress"], domain["fromName"], ids[domain["fromId"]]) == (
        "desk@mail.crm.example",
        "Desk",
        "news@mail.crm.example",
    )


def test_inline_image_keeps_its_content_id(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    png = base64.b64encode(b"\x89PNG-logo").decode()
    raw = (
        f"From: {DENGAGE_SENDER}\r\nTo: client@example.com\r\nSubject: inline\r\n"
        'Content-Type: multipart/related; boundary="r"\r\n\r\n'
        '--r\r\nContent-Type: text/html\r\n\r\n<p><img src="cid:logo@crm.example"></p>\r\n'
        "--r\r\nContent-Type: image/png\r\nContent-ID: <logo@crm.example>\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{png}\r\n"
        "--r--\r\n"
    ).encode()
    dropped = sample("smtp_gateway_fields_not_sent_total", account="crm", field="content_id")
    assert send(gw, raw)[0] == 250
    body = sent_body(gw)
    assert 'src="cid:logo@crm.example"' in body["content"]["html"]
    assert body["attachments"] == [
        {"name": "attachment.png", "content": png, "type": "image/png", "contentId": "logo@crm.example"}
    ]
    assert sample("smtp_gateway_fields_not_sent_total", account="crm", field="content_id") == dropped


@pytest.mark.parametrize(
    ("template", "subject"),
    [
        ("(no subject)", "(no subject)"),
        ("Scan from {login} ({from_name})", f"Scan from {DENGAGE_USER} (Scanner 3)"),
        ("{{{account}}} {from}", "{crm} scanner@crm.example"),
    ],
)
def test_default_subject_for_a_message_without_one(
    gateway_factory: Callable[..., Running], template: str, subject: str
) -> None:
    gw = gateway_factory(dengage={"default_subject": template})
    raw = b"From: Scanner 3 <scanner@crm.example>\r\nTo: client@example.com\r\n\r\nscan attached\r\n"
    code, text = send(gw, raw, mail_from="scanner@crm.example")
    assert code == 250, text
    assert sent_body(gw)["content"]["subject"] == subject
    assert send(gw, message("its own subject"))[0] == 250
    assert sent_body(gw)["content"]["subject"] == "its own subject"


def test_date_placeholder_is_the_day_of_acceptance(gateway_factory: Callable[..., Running]) -> None:
    from datetime import UTC, datetime

    gw = gateway_factory(dengage={"default_subject": "Scan {date}"})
    before = datetime.now(UTC).date().isoformat()
    assert send(gw, f"From: {DENGAGE_SENDER}\r\nTo: c@example.com\r\n\r\nx\r\n".encode())[0] == 250
    after = datetime.now(UTC).date().isoformat()
    assert sent_body(gw)["content"]["subject"] in {f"Scan {before}", f"Scan {after}"}


def test_only_allowed_x_headers_are_forwarded(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={"forward_x_headers": ["X-Mailer", "X-Custom-*"]})
    extra = (
        "X-Mailer: Scan2Mail 4.1\r\nx-custom-order: 42\r\nX-CUSTOM-Shop: north\r\n"
        "X-Originating-IP: [192.0.2.7]\r\nX-Spam-Score: 0.1\r\n"
    )
    dropped = sample("smtp_gateway_fields_not_sent_total", account="crm", field="x_headers")
    assert send(gw, message("headers", extra=extra))[0] == 250
    assert sent_body(gw)["xHeaders"] == {"X-Mailer": "Scan2Mail 4.1", "x-custom-order": "42", "X-CUSTOM-Shop": "north"}
    assert sample("smtp_gateway_fields_not_sent_total", account="crm", field="x_headers") == dropped + 1


def test_no_x_header_is_forwarded_by_default(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    assert send(gw, message("headers", extra="X-Mailer: Scan2Mail\r\nX-Originating-IP: [192.0.2.7]\r\n"))[0] == 250
    assert "xHeaders" not in sent_body(gw)
