"""AUTH: mechanisms, prompts, TLS requirements, failures, and the DMDS login styles with their cache."""

from __future__ import annotations

import base64
import smtplib
from collections.abc import Callable

import pytest
import structlog

from tests.harness import APIKEY, CAMPAIGNS, PASSWORD, PASSWORD_HASH, USER, Running
from tests.smtputil import RECIPIENT, SENDER, RawClient, message, send, session


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("listener", ["plain", "starttls", "implicit"])
def test_auth_plain_and_send_on_every_listener(gateway: Running, listener: str) -> None:
    with session(gateway, listener) as client:
        code, text = send(client, message(subject=f"via {listener}"))
    assert code == 250, text
    assert gateway.sent[0]["body"]["asunto"] == f"via {listener}"


def test_auth_login_prompts(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        first = client.cmd("AUTH LOGIN")
        assert first.startswith("334 ")
        assert base64.b64decode(first[4:]) == b"Username:"
        second = client.cmd(b64(USER))
        assert base64.b64decode(second[4:]) == b"Password:"
        assert client.cmd(b64(PASSWORD)).startswith("235 2.7.0 ")


def test_auth_login_with_initial_response(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        prompt = client.cmd(f"AUTH LOGIN {b64(USER)}")
        assert base64.b64decode(prompt[4:]) == b"Password:"
        assert client.cmd(b64(PASSWORD)).startswith("235 2.7.0 ")


def test_auth_plain_with_empty_initial_response(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd("AUTH PLAIN") == "334 "
        assert client.cmd(b64(f"\0{USER}\0{PASSWORD}")).startswith("235 2.7.0 ")


def test_smtplib_auth_login(gateway: Running) -> None:
    with session(gateway, user=None) as client:
        client.user, client.password = USER, PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235
        code, text = send(client, message())
    assert code == 250, text


def test_auth_refused_before_starttls(gateway: Running) -> None:
    with RawClient(gateway, "starttls") as client:
        client.cmd("EHLO client.test")
        assert client.cmd(f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + PASSWORD)}").startswith("538 5.7.11 ")
        assert client.cmd("AUTH LOGIN").startswith("538 5.7.11 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("530 5.7.0 ")


def test_wrong_password_is_535(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.login(USER, "wrong") == "535 5.7.8 Authentication credentials invalid"
        assert client.login(USER, PASSWORD).startswith("235 ")


def test_auth_plain_authorization_identity_must_be_the_login(gateway_factory: Callable[..., Running]) -> None:
    """RFC 4616's authzid asks to act as another identity (the maddy CVE-2023-27582 class): refused, as
    Postfix does, so `victim\\0login\\0password` logs in as neither; the login itself as authzid is fine."""
    gw = gateway_factory(extra_users=[{"username": "victim", "password_hash": PASSWORD_HASH, "campaign": 23}])
    with structlog.testing.capture_logs() as logs, RawClient(gw) as client:
        client.cmd("EHLO client.test")
        assert client.cmd(f"AUTH PLAIN {b64(f'victim{chr(0)}{USER}{chr(0)}{PASSWORD}')}") == (
            "535 5.7.8 Authentication credentials invalid"
        )
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("530 5.7.0 ")  # not logged in as anyone
        assert client.cmd(f"AUTH PLAIN {b64(f'{USER}{chr(0)}{USER}{chr(0)}{PASSWORD}')}").startswith("235 2.7.0 ")
        code, text = send_raw(client)
    assert code == "250", text
    assert [e["event"] for e in logs if e["event"].startswith("auth_")] == ["auth_failed", "auth_ok"]
    refused = next(e for e in logs if e["event"] == "auth_failed")
    assert (refused["login"], refused["authzid"]) == (USER, "differs from the login")
    assert next(e for e in logs if e["event"] == "auth_ok")["login"] == USER
    assert [r["body"]["campana_id"] for r in gw.sent] == [22]  # the login's campaign, not the victim's


def send_raw(client: RawClient) -> tuple[str, str]:
    for line in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>", "DATA"):
        assert client.cmd(line)[0] in "23", line
    client.write(message() + b".\r\n")
    reply = client.reply()[-1]
    return reply[:3], reply


def test_smtplib_sees_535(gateway: Running) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as info, session(gateway, password="wrong"):
        pass
    assert info.value.smtp_code == 535


def test_unknown_user_is_535(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.login("nobody", "x").startswith("535 5.7.8 ")


def test_connection_dropped_after_too_many_failures(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.login(USER, "bad1").startswith("535 5.7.8 ")
        assert client.login(USER, "bad2").startswith("535 5.7.8 ")
        assert client.login(USER, "bad3").startswith("421 4.7.0 ")
        assert client.closed()


def test_bad_base64_is_501(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd("AUTH PLAIN !!!").startswith("501 5.5.2 ")
        assert client.cmd(f"AUTH PLAIN {b64('no-nul-separators')}").startswith("501 5.5.2 ")


# -- DMDS SMTP-API logins: <dmdsid>-<numid> + the campaign's apikey --------------------------------


def test_campaign_login_sends_to_its_campaign_and_is_cached(gateway: Running) -> None:
    with session(gateway, user="acme-23", password=CAMPAIGNS[23]) as client:
        code, text = send(client, message(subject="campaign 23"))
    assert code == 250, text
    assert gateway.lookups == ["23"]
    body = gateway.sent[0]["body"]
    assert body["campana_id"] == 23
    assert body["asunto"] == "campaign 23"
    # A second login with the same pair is answered from the cache: no new upstream lookup.
    with session(gateway, "starttls", user="acme-23", password=CAMPAIGNS[23]) as client:
        code, text = send(client, message(subject="again"))
    assert code == 250, text
    assert gateway.lookups == ["23"]
    assert len(gateway.sent) == 2


def test_campaign_login_with_wrong_key_is_535(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.login("acme-22", CAMPAIGNS[23]).startswith("535 5.7.8 ")
        # The refusal is cached too.
        assert client.login("acme-22", CAMPAIGNS[23]).startswith("535 5.7.8 ")
    assert gateway.lookups == ["22"]


def test_campaign_login_for_unknown_campaign_is_535(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.login("acme-99", "anything").startswith("535 5.7.8 ")


def test_campaign_login_when_lookup_fails_is_454(gateway: Running) -> None:
    gateway.fault(status=500)
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.login("acme-22", CAMPAIGNS[22]).startswith("454 4.7.0 ")
        # Temporary failures are not cached: the next attempt asks DMDS again and succeeds.
        assert client.login("acme-22", CAMPAIGNS[22]).startswith("235 2.7.0 ")
    assert gateway.lookups == ["22", "22"]


# -- SMTP-DMDS sandbox logins: <dmdsid> + the account APIKEY, campaign from "[NN]" in the Subject ----


def test_sandbox_login_takes_campaign_from_subject(gateway: Running) -> None:
    with session(gateway, user="acme", password=APIKEY) as client:
        code, text = send(client, message(subject="[22]Hello good afternoon"))
        assert code == 250, text
        code, text = send(client, message(subject="[23] Second"))
        assert code == 250, text
    first, second = (r["body"] for r in gateway.sent)
    assert (first["campana_id"], first["asunto"]) == (22, "Hello good afternoon")
    assert (second["campana_id"], second["asunto"]) == (23, "Second")


def test_sandbox_login_without_prefix_is_554(gateway: Running) -> None:
    with session(gateway, user="acme", password=APIKEY) as client:
        code, text = send(client, message(subject="No campaign here"))
    assert code == 554
    assert text.startswith("5.6.0 ")
    assert gateway.sent == []


def test_sandbox_login_unknown_campaign_is_554(gateway: Running) -> None:
    with session(gateway, user="acme", password=APIKEY) as client:
        code, text = send(client, message(subject="[99]Nope"))
    assert code == 554
    assert "99" in text
    assert gateway.sent == []


def test_sandbox_login_with_wrong_apikey_is_535(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.login("acme", "not-the-key").startswith("535 5.7.8 ")


def test_sandbox_logins_can_be_disabled(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory()
    account = running.settings.accounts["acme"].model_dump(mode="python")
    account["apikey"] = APIKEY
    account["users"] = [{**u, "password_hash": u["password_hash"].get_secret_value()} for u in account["users"]]
    other = gateway_factory(accounts={"acme": {**account, "sandbox_logins": False, "smtp_api_logins": False}})
    with RawClient(other) as client:
        client.cmd("EHLO client.test")
        assert client.login("acme", APIKEY).startswith("535 ")
        assert client.login("acme-22", CAMPAIGNS[22]).startswith("535 ")
    assert other.lookups == []


def test_mail_before_auth_then_after(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("530 5.7.0 ")
        client.login()
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 2.1.0 ")
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 2.1.5 ")
