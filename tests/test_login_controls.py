"""Per-login controls through real SMTP sessions from loopback aliases (127.0.0.2, ...): source networks (also
behind a PROXY header, and for trusted-network clients), TLS required per login with its exceptions, allowed
recipients, test mode; reloaded on SIGHUP. Quotas: tests/test_login_quotas.py; key rotation and OAuth:
tests/test_login_keys.py, tests/test_oauth.py."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest

from tests.configs import listener
from tests.devices_util import b64, captured_logs, events, raw_send
from tests.harness import CAMPAIGNS, PASSWORD, PASSWORD_HASH, Running
from tests.ops_util import proxy_v2, sample
from tests.smtputil import SENDER, RawClient, message
from tests.test_reload import config_of, reload_with

Factory = Callable[..., Running]
PRINTER, SECURE, PICKY, TRIAL = "printer", "secure", "picky", "trial"
WRONG_PASSWORD = "535 5.7.8 Authentication credentials invalid"


def user(name: str, **rules: Any) -> dict[str, Any]:
    return {"username": name, "password_hash": PASSWORD_HASH, "campaign": 22, **rules}


def refusals(login: str, reason: str, account: str = "acme") -> float:
    return sample("smtp_gateway_login_refusals_total", account=account, login=login, reason=reason)


def login_from(gw: Running, source: str, name: str, password: str = PASSWORD, listener_: str = "plain") -> str:
    with RawClient(gw, listener_, source=source) as client:
        client.cmd("EHLO client.test")
        return client.login(name, password)


# -- source networks -----------------------------------------------------------------------------------------


@pytest.fixture
def printer(gateway_factory: Factory) -> Running:
    return gateway_factory(
        networks={"vlan20": ["127.0.0.2/32", "127.0.0.3/32"]},
        extra_users=[user(PRINTER, networks=["vlan20"])],
    )


def test_a_login_works_from_its_networks_only(printer: Running) -> None:
    before = refusals(PRINTER, "network")
    with captured_logs() as logs:
        assert login_from(printer, "127.0.0.2", PRINTER).startswith("235 ")
        with RawClient(printer, source="127.0.0.3") as client:
            client.cmd("EHLO printer.lan")
            assert client.login(PRINTER, PASSWORD).startswith("235 ")
            assert raw_send(client, message(subject="from the VLAN")).startswith("250 2.0.0 ")
        # From elsewhere: exactly the reply to a wrong password, with the right one and with a wrong one.
        assert login_from(printer, "127.0.0.4", PRINTER) == WRONG_PASSWORD
        assert login_from(printer, "127.0.0.4", PRINTER, "wrong") == WRONG_PASSWORD
    assert refusals(PRINTER, "network") == before + 1
    failed = events(logs, "auth_failed")
    assert [(e["login"], e.get("reason"), e.get("password_valid")) for e in failed] == [
        (PRINTER, "network", "yes"),
        (PRINTER, None, None),
    ]
    assert all(e["peer"].startswith("127.0.0.4:") for e in failed)
    # Other logins are unaffected from anywhere.
    assert login_from(printer, "127.0.0.4", "scanner").startswith("235 ")
    assert [r["body"]["asunto"] for r in printer.sent] == ["from the VLAN"]


def test_network_refusals_count_towards_the_clients_auth_failures(gateway_factory: Factory) -> None:
    gw = gateway_factory(
        extra_users=[user(PRINTER, networks=["192.168.20.0/24"])],
        limits={"auth_failures_per_ip": 2, "auth_lockout_failures": 2, "auth_lockout_time": 60},
    )
    for _ in range(2):
        assert login_from(gw, "127.0.0.5", PRINTER).startswith(("535 ", "421 "))
    # Locked out like any guesser: the right password of an unrestricted login is not checked from there.
    assert login_from(gw, "127.0.0.5", "scanner").startswith("421 4.7.0 ")


def test_the_real_client_behind_a_proxy_header_is_what_counts(gateway_factory: Factory) -> None:
    gw = gateway_factory(
        listeners=[listener("lb", proxy_protocol=True, proxy_trusted=["127.0.0.1/32"])],
        extra_users=[user(PRINTER, networks=["192.168.20.0/24"])],
    )

    def through(client_ip: str) -> str:
        with RawClient(gw, "lb", proxy=proxy_v2(client_ip, 40001)) as client:
            client.cmd("EHLO printer.lan")
            return client.login(PRINTER, PASSWORD)

    assert through("192.168.20.7").startswith("235 ")
    assert through("203.0.113.7") == WRONG_PASSWORD


def test_trusted_network_clients_keep_sending_as_their_login(gateway_factory: Factory) -> None:
    """A trusted network within the login's networks: its clients send without AUTH as before (check-config
    refuses one outside them: tests/test_login_config.py)."""
    gw = gateway_factory(
        listeners=[listener("plain"), listener("lan", trusted_networks=["127.0.0.6/32"], trusted_login=PRINTER)],
        extra_users=[user(PRINTER, networks=["127.0.0.0/29"])],
    )
    with RawClient(gw, "lan", source="127.0.0.6") as client:
        client.cmd("EHLO printer.lan")
        assert raw_send(client, message(subject="trusted")).startswith("250 2.0.0 ")
    assert login_from(gw, "127.0.0.9", PRINTER) == WRONG_PASSWORD


# -- TLS per login -----------------------------------------------------------------------------------------


@pytest.fixture
def secure(gateway_factory: Factory) -> Running:
    return gateway_factory(extra_users=[user(SECURE, require_tls=True, require_tls_except=["127.0.0.7/32"])])


def test_a_login_that_requires_tls_is_refused_in_plaintext_unchecked(secure: Running) -> None:
    before = refusals(SECURE, "tls_required")
    failures = sample("smtp_gateway_auth_total", result="invalid")
    with captured_logs() as logs, RawClient(secure, source="127.0.0.2") as client:
        client.cmd("EHLO client.test")
        reply = "538 5.7.11 Encryption required for this login: use STARTTLS or the TLS port"
        # The password is not checked: right or wrong, the same refusal.
        assert client.login(SECURE, PASSWORD) == reply
        assert client.login(SECURE, "wrong") == reply
        # AUTH LOGIN: refused after the username, before the password is asked for.
        assert base64.b64decode(client.cmd("AUTH LOGIN")[4:]) == b"Username:"
        assert client.cmd(b64(SECURE)) == reply
        # Other logins on the same connection are unaffected.
        assert client.login().startswith("235 ")
    assert refusals(SECURE, "tls_required") == before + 3
    assert sample("smtp_gateway_auth_total", result="invalid") == failures
    assert len(events(logs, "auth_tls_required")) == 3 and not events(logs, "auth_failed")


def test_tls_required_refusals_count_towards_the_clients_auth_failures(gateway_factory: Factory) -> None:
    # The 538 after the username tells that the login exists and requires TLS: probing for such logins costs
    # what guessing passwords does (throttled, counted, locked out), as for a network refusal.
    gw = gateway_factory(
        extra_users=[user(SECURE, require_tls=True)],
        limits={"auth_failures_per_ip": 2, "auth_lockout_failures": 2, "auth_delay_max": 0, "auth_lockout_time": 60},
    )
    with captured_logs() as logs, RawClient(gw, source="127.0.0.8") as client:
        client.cmd("EHLO client.test")
        assert client.cmd("AUTH LOGIN").startswith("334 ")
        assert client.cmd(b64(SECURE)).startswith("538 5.7.11 ")
        assert client.login(SECURE, PASSWORD) == "421 4.7.0 Too many failed logins from your address; try again later"
    assert len(events(logs, "auth_tls_required")) == 2 and len(events(logs, "auth_lockout")) == 1
    # Locked out like any guesser: the right password of an unrestricted login is not checked from there.
    assert login_from(gw, "127.0.0.8", "scanner").startswith("421 4.7.0 ")


def test_inside_tls_or_from_an_excepted_network_it_logs_in(secure: Running) -> None:
    for listener_ in ("starttls", "implicit"):
        with RawClient(secure, listener_, source="127.0.0.2") as client:
            client.cmd("EHLO client.test")
            if listener_ == "starttls":
                client.starttls()
                client.cmd("EHLO client.test")
            assert client.login(SECURE, PASSWORD).startswith("235 ")
    assert login_from(secure, "127.0.0.7", SECURE).startswith("235 ")


# -- recipients --------------------------------------------------------------------------------------------


def test_recipients_outside_the_logins_rules_get_550_at_rcpt(gateway_factory: Factory) -> None:
    gw = gateway_factory(
        extra_users=[user(PICKY, allowed_recipients=["example.com", "*.partner.example", "boss@other.example"])]
    )
    before = refusals(PICKY, "recipient")
    with captured_logs() as logs, RawClient(gw) as client:
        client.cmd("EHLO client.test")
        assert client.login(PICKY, PASSWORD).startswith("235 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
        for ok in ("client@example.com", "ap@eu.partner.example", "Boss@Other.Example"):
            assert client.cmd(f"RCPT TO:<{ok}>").startswith("250 "), ok
        for refused in ("eve@other.example", "x@partner.example", "x@sub.example.com"):
            assert client.cmd(f"RCPT TO:<{refused}>") == (
                f"550 5.7.1 <{refused}>: Recipient address rejected: not an allowed recipient for this login"
            )
        assert client.cmd("DATA").startswith("354 ")
        client.write(message(subject="allowed only") + b".\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 ")
    assert refusals(PICKY, "recipient") == before + 3
    assert len(events(logs, "recipient_rejected")) == 3
    [request] = gw.sent
    assert request["body"]["contacto"]["email"] == "client@example.com"
    assert [c["bcc_email"] for c in request["body"]["copia_oculta"]] == ["ap@eu.partner.example", "Boss@other.example"]


# -- test mode ---------------------------------------------------------------------------------------------


def test_a_test_login_goes_through_everything_but_sends_nothing(gateway_factory: Factory) -> None:
    gw = gateway_factory(extra_users=[user(TRIAL, test_mode=True)])
    before = sample("smtp_gateway_test_messages_total", account="acme", login=TRIAL)
    with captured_logs() as logs, RawClient(gw) as client:
        client.cmd("EHLO client.test")
        assert client.login(TRIAL, PASSWORD).startswith("235 ")
        mime = "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n"
        attachment = (
            "--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\nContent-Type: application/pdf\r\n"
            'Content-Disposition: attachment; filename="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
            + base64.b64encode(b"%PDF-1.4 secret contents").decode()
            + "\r\n--b--"
        )
        reply = raw_send(client, message(subject="try me", body=attachment, extra=mime))
        # Policy still applies: a sender the login does not own is refused as for any login.
        assert client.cmd("MAIL FROM:<someone@elsewhere.example>").startswith("553 5.7.1 ")
    assert reply.startswith("250 2.0.0 Ok: queued as TEST-"), reply
    test_id = reply.rpartition(" ")[2]
    assert gw.requests == []  # nothing reached the upstream
    assert sample("smtp_gateway_test_messages_total", account="acme", login=TRIAL) == before + 1
    [line] = events(logs, "message_test_mode")
    assert line["test_id"] == test_id and line["calls"] == 1
    [request] = line["requests"]
    assert request["path"] == "/v1/envio/send_one_inline/" and request["body"]["asunto"] == "try me"
    assert request["body"]["campana_id"] == 22
    [attached] = request["body"]["adjuntos"]
    assert attached["contenido"] == "(24 bytes, not kept)"  # contents are not kept: only what was built
    # The message's text is, whatever `ledger.keep_bodies` says (false here): it is what a test login is for.
    assert not gw.settings.ledger.keep_bodies and "see attached" in request["body"]["html"]
    assert "Authorization" not in str(line) and "test-account-apikey" not in str(line)
    [accepted] = events(logs, "message_accepted")
    assert accepted["queue_id"] == test_id
    # The message ledger keeps its record: the requests that would have been sent, recipients "test".
    assert gw.app.ledger_writer is not None and gw.app.ledger is not None
    gw.loop.run(gw.app.ledger_writer.flush())
    record = gw.loop.run(gw.app.ledger.get(test_id))
    assert record is not None and record.login == TRIAL and record.reply == reply
    assert record.state == "test" and {r.state for r in record.recipients} == {"test"}
    assert record.request == line["requests"]
    assert [e.kind for e in record.events] == ["accepted", "test_mode"]


def test_an_accounts_test_mode_covers_its_smtp_api_logins(gateway_factory: Factory) -> None:
    gw = gateway_factory(accounts={"acme": {"test_mode": True}}, extra_users=[user(PRINTER, test_mode=False)])
    before = sample("smtp_gateway_test_messages_total", account="acme", login="*")
    for name, password in (("acme-23", CAMPAIGNS[23]), (PRINTER, PASSWORD)):
        with RawClient(gw) as client:
            client.cmd("EHLO client.test")
            assert client.login(name, password).startswith("235 ")
            assert raw_send(client, message(subject=name)).startswith("250 2.0.0 ")
    assert sample("smtp_gateway_test_messages_total", account="acme", login="*") == before + 1
    assert [r["body"]["asunto"] for r in gw.sent] == [PRINTER]  # the user's own false wins


# -- reload ------------------------------------------------------------------------------------------------


def test_controls_reload_with_the_configuration(printer: Running) -> None:
    config = config_of(printer)
    config["networks"] = {"vlan20": ["127.0.0.4/32"]}
    config["accounts"]["acme"]["users"].append(user(PRINTER, networks=["vlan20"], allowed_recipients=["x.example"]))
    assert login_from(printer, "127.0.0.4", PRINTER) == WRONG_PASSWORD
    assert reload_with(printer, config)
    assert login_from(printer, "127.0.0.2", PRINTER) == WRONG_PASSWORD
    with RawClient(printer, source="127.0.0.4") as client:
        client.cmd("EHLO client.test")
        assert client.login(PRINTER, PASSWORD).startswith("235 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
        assert client.cmd("RCPT TO:<a@example.com>").startswith("550 5.7.1 ")
