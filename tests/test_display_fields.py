"""Bidirectional controls never reach a field a recipient reads: each display field of each provider's API
call, through the real gateway (SMTP in, the sandbox's recorded request out)."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import orjson
import pytest

from tests.harness import DENGAGE_SENDER, DENGAGE_USER, PASSWORD, USER, Running

# Unicode's Bidi_Control characters: embeddings, overrides, isolates and the marks.
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"


def spoofed(text: str) -> str:
    """`text` with every bidi control in it, a right-to-left override first (the classic trick)."""
    return f"{text[:3]}\u202e{text[3:]}" + "".join(f"{c}x" for c in BIDI)


def without(text: str) -> str:
    return text[:3] + text[3:] + "x" * len(BIDI)


def mail(sender: str, to: str) -> EmailMessage:
    msg = EmailMessage()
    # Written as RFC 2047 encoded words on the wire, as a mail client writes non-ASCII names and subjects.
    msg["From"] = f"{spoofed('Billing Dept')} <{sender}>"
    msg["To"] = f"{spoofed('Ana Lopez')} <{to}>"
    msg["Cc"] = f"{spoofed('Bob Smith')} <bob@example.com>"
    msg["Subject"] = spoofed("Invoice 42 attached")
    msg["X-Order"] = spoofed("order 42")
    msg.set_content("see the attachment")
    msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename=spoofed("invoice.exe.pdf"))
    return msg


def deliver(running: Running, user: str, sender: str) -> None:
    with smtplib.SMTP("127.0.0.1", running.port(), timeout=30) as client:
        client.login(user, PASSWORD)
        refused = client.send_message(mail(sender, "ana@example.com"), sender, ["ana@example.com", "bob@example.com"])
        assert refused == {}


def no_bidi(body: Any) -> list[str]:
    """Every bidi control left anywhere in a request body (names, values, nested)."""
    text = orjson.dumps(body).decode()
    return [f"U+{ord(c):04X}" for c in BIDI if c in text]


DMDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "asunto": lambda b: b["asunto"],
    "remitente_nombre": lambda b: b["remitente_nombre"],
    "contact nombre/apellido": lambda b: (b["contacto"]["nombre"], b["contacto"].get("apellido")),
    "copia cc_nombre": lambda b: b["copia"][0]["cc_nombre"],
    "attachment nombre": lambda b: b["adjuntos"][0]["nombre"],
}


def test_dmds_display_fields_carry_no_bidi_controls(gateway: Running) -> None:
    deliver(gateway, USER, "billing@acme.example")
    [request] = gateway.sent
    body = request["body"]
    shown = {name: read(body) for name, read in DMDS.items()}
    assert shown == {
        "asunto": without("Invoice 42 attached"),
        "remitente_nombre": without("Billing Dept"),
        "contact nombre/apellido": ("Ana", without("Ana Lopez")[4:]),
        "copia cc_nombre": without("Bob Smith"),
        "attachment nombre": without("invoice.exe.pdf"),
    }
    assert no_bidi(body) == []


@pytest.mark.parametrize("recipient", ["ana@example.com", "bob@example.com"])
def test_dengage_display_fields_carry_no_bidi_controls(gateway_factory: Callable[..., Running], recipient: str) -> None:
    gw = gateway_factory(dengage={"forward_x_headers": ["X-Order"]})
    deliver(gw, DENGAGE_USER, DENGAGE_SENDER)
    body = next(r["body"] for r in gw.calls("send", status=200) if r["to"] == recipient)
    assert body["content"]["subject"] == without("Invoice 42 attached")
    assert body["xHeaders"]["X-Order"] == without("order 42")
    assert [a["name"] for a in body["attachments"]] == [without("invoice.exe.pdf")]
    assert no_bidi(body) == []
