"""The first promise: an authenticated message becomes a DMDS call and the client gets its eeid."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

from tests.harness import PASSWORD, USER, Running


def test_authenticated_message_is_sent_upstream(gateway: Running) -> None:
    msg = EmailMessage()
    msg["From"] = "Billing <billing@acme.example>"
    msg["To"] = "Client <client@example.com>"
    msg["Subject"] = "Invoice 42"
    msg.set_content("Hello\nthe invoice is attached.")
    with smtplib.SMTP("127.0.0.1", gateway.port("plain")) as client:
        client.login(USER, PASSWORD)
        client.send_message(msg)
        code, _text = client.noop()
    assert code == 250
    sent = gateway.sent
    assert len(sent) == 1
    body = sent[0]["body"]
    assert body["contacto"] == {"email": "client@example.com", "nombre": "Client"}
    assert body["asunto"] == "Invoice 42"
    assert body["remitente"] == "billing@acme.example"
    assert "the invoice is attached." in body["html"]


def test_reply_carries_upstream_eeid(gateway: Running) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.port("plain")) as client:
        client.login(USER, PASSWORD)
        client.mail("billing@acme.example")
        client.rcpt("client@example.com")
        code, text = client.data(b"From: billing@acme.example\r\nTo: client@example.com\r\nSubject: x\r\n\r\nhi\r\n")
    assert code == 250
    eeid = gateway.sent[0]["upstream_id"]
    assert text.decode() == f"2.0.0 Ok: queued as {eeid}"
