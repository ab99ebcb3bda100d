"""Open-relay probes: without a login, before TLS, or as a sender the login does not own, nothing is relayed."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from tests.harness import APIKEY, PASSWORD, PASSWORD_HASH, USER, Running
from tests.smtputil import RECIPIENT, SENDER, RawClient, message

OTHER_USER = "other-scanner"


@pytest.fixture
def two_accounts(gateway_factory: Callable[..., Running]) -> tuple[Running, Running]:
    """A gateway with acme (acme.example) and a second account, other (other.example), and the gateway whose
    sandbox upstream both accounts use (the config names the upstream's port before the start)."""
    upstream = gateway_factory()
    running = gateway_factory(
        accounts={
            "acme": {"api_base": upstream.sandbox_url},  # the rest as usual
            "other": {
                "dmdsid": "other",
                "apikey": APIKEY,
                "api_base": upstream.sandbox_url,
                "sender_domains": {"other.example": "dmds-other@nl.other.example"},
                "users": [{"username": OTHER_USER, "password_hash": PASSWORD_HASH, "campaign": 22}],
            },
        }
    )
    return running, upstream


def probe(client: RawClient, sender: str, rcpt: str = RECIPIENT) -> list[str]:
    """MAIL, RCPT and DATA (with a message) as a relay tester sends them; every final reply."""
    replies = [client.cmd(f"MAIL FROM:<{sender}>"), client.cmd(f"RCPT TO:<{rcpt}>"), client.cmd("DATA")]
    if replies[-1].startswith("354"):
        client.write(message(sender=sender, to=rcpt) + b".\r\n")
        replies.append(client.reply()[-1])
    return replies


def test_no_auth_is_refused(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO relay-test.example")
        replies = probe(client, "probe@gmail.com", "victim@example.net")
    assert [r[:9] for r in replies] == ["530 5.7.0", "503 5.5.1", "503 5.5.1"]
    assert gateway.requests == []


def test_auth_before_tls_on_a_tls_listener_is_refused(gateway: Running) -> None:
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    with RawClient(gateway, "starttls") as client:
        client.write(b"EHLO relay-test.example\r\n")
        assert not any("AUTH" in line for line in client.reply())
        assert client.cmd(f"AUTH PLAIN {blob}").startswith("538 5.7.11 ")
        assert client.cmd("AUTH LOGIN").startswith("538 5.7.11 ")
        replies = probe(client, SENDER)
    assert replies[0].startswith("530 5.7.0 ")
    assert gateway.requests == []


@pytest.mark.parametrize("sender", ["probe@gmail.com", "billing@acme.example.evil.net", "billing@nl.acme.example"])
def test_foreign_sender_domain_is_refused(gateway: Running, sender: str) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO relay-test.example")
        assert client.login().startswith("235 ")
        replies = probe(client, sender)
    assert replies[0].startswith("553 5.7.1 "), replies
    assert gateway.requests == []


def test_another_accounts_domain_is_refused(two_accounts: tuple[Running, Running]) -> None:
    running, upstream = two_accounts
    with RawClient(running) as client:
        client.cmd("EHLO relay-test.example")
        assert client.login(USER).startswith("235 ")
        assert probe(client, "billing@other.example")[0].startswith("553 5.7.1 ")
        # Its own envelope sender, but the other account's domain in the From: header.
        assert client.cmd("RSET").startswith("250 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.write(message(sender="billing@other.example") + b".\r\n")
        assert client.reply()[-1].startswith("550 5.7.1 From: header domain other.example ")
    with RawClient(running) as client:
        client.cmd("EHLO relay-test.example")
        assert client.login(OTHER_USER).startswith("235 ")
        assert probe(client, SENDER)[0].startswith("553 5.7.1 ")
        # The other account's own domain is fine for its own login.
        assert probe(client, "billing@other.example")[-1].startswith("250 2.0.0 ")
    (request,) = upstream.requests
    assert request["body"]["remitente"] == "billing@other.example"
