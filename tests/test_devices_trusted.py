"""Trusted LAN devices over loopback aliases (Linux routes all of 127/8 to lo): each network sends as its
own login without AUTH, under that login's sender policy; other addresses must AUTH; AUTH still wins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings
from tests.configs import gateway_config, listener
from tests.devices_util import captured_logs, events, raw_send
from tests.harness import PASSWORD, PASSWORD_HASH, USER, Running
from tests.smtputil import RECIPIENT, SENDER, RawClient, message

ERP = "erp"
ERP_SENDER = "erp@acme.example"
# The ERP may only send as itself: the trusted identity carries its sender policy.
ERP_USER = {"username": ERP, "password_hash": PASSWORD_HASH, "campaign": 23, "allowed_senders": [ERP_SENDER]}


@pytest.fixture
def lan(gateway_factory: Callable[..., Running]) -> Running:
    trusted = [
        {"network": "127.0.0.2/31", "login": USER},  # 127.0.0.2 and 127.0.0.3 ...
        {"network": "127.0.0.3/32", "login": ERP},  # ... but the more specific network wins for .3
    ]
    return gateway_factory(
        extra_users=[ERP_USER], listeners=[listener("lan", allow_insecure_auth=False, trusted=trusted)]
    )


def test_each_network_sends_as_its_login(lan: Running) -> None:
    with captured_logs() as logs:
        with RawClient(lan, "lan", source="127.0.0.2") as scanner:
            scanner.cmd("EHLO scanner.lan")
            assert raw_send(scanner, message(subject="scan")).startswith("250 2.0.0 Ok: queued as ")
        with RawClient(lan, "lan", source="127.0.0.3") as erp:
            erp.cmd("HELO erp.lan")
            content = message(subject="invoice", sender=ERP_SENDER)
            assert raw_send(erp, content, mail_from=ERP_SENDER).startswith("250 2.0.0 Ok: queued as ")
    scan, invoice = (r["body"] for r in lan.sent)
    assert (scan["asunto"], scan["campana_id"], scan["remitente"]) == ("scan", 22, SENDER)
    assert (invoice["asunto"], invoice["campana_id"], invoice["remitente"]) == ("invoice", 23, ERP_SENDER)
    trusted = [(e["peer"].split(":")[0], e["network"], e["login"]) for e in events(logs, "trusted_client")]
    assert trusted == [("127.0.0.2", "127.0.0.2/31", USER), ("127.0.0.3", "127.0.0.3/32", ERP)]


def test_other_addresses_must_auth(lan: Running) -> None:
    with RawClient(lan, "lan", source="127.0.0.1") as client:
        client.cmd("EHLO outsider.lan")
        assert client.cmd(f"MAIL FROM:<{SENDER}>") == "530 5.7.0 Authentication required"
    with RawClient(lan, "lan", source="127.0.0.4") as client:
        client.cmd("EHLO outsider.lan")
        assert client.cmd(f"MAIL FROM:<{SENDER}>") == "530 5.7.0 Authentication required"
    assert lan.sent == []


def test_trusted_login_keeps_its_sender_policy(lan: Running) -> None:
    with RawClient(lan, "lan", source="127.0.0.3") as erp:
        erp.cmd("EHLO erp.lan")
        reply = erp.cmd(f"MAIL FROM:<{SENDER}>")
        assert reply == f"553 5.7.1 <{SENDER}>: Sender address rejected: not owned by {ERP}"
        assert erp.cmd("MAIL FROM:<someone@elsewhere.example>").startswith("553 5.7.1 ")
        # The header From is checked as for an authenticated login.
        assert erp.cmd(f"MAIL FROM:<{ERP_SENDER}>").startswith("250 ")
        assert erp.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
        assert erp.cmd("DATA").startswith("354 ")
        erp.write(message(sender=SENDER) + b".\r\n")
        assert erp.reply()[-1].startswith("550 5.7.1 ")
    assert lan.sent == []


def test_auth_from_a_trusted_network_replaces_the_trusted_identity(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory(
        extra_users=[ERP_USER],
        listeners=[listener("lan", trusted=[{"network": "127.0.0.2/32", "login": ERP}])],
    )
    with RawClient(running, "lan", source="127.0.0.2") as client:
        client.cmd("EHLO erp.lan")
        # As the trusted login (the ERP), the scanner's sender is refused ...
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("553 5.7.1 ")
        # ... after AUTH as the scanner it is the scanner's, campaign included.
        assert client.login(USER, PASSWORD).startswith("235 2.7.0 ")
        assert raw_send(client, message(subject="authenticated")).startswith("250 2.0.0 ")
    [sent] = running.sent
    assert sent["body"]["campana_id"] == 22


def test_auth_during_a_mail_transaction_is_503(gateway_factory: Callable[..., Running]) -> None:
    """RFC 4954 §4: no AUTH during a mail transaction. From a trusted network MAIL comes before any AUTH, and
    was checked as the trusted login: a login taking over then would send a message its checks never saw."""
    running = gateway_factory(
        extra_users=[ERP_USER],
        listeners=[listener("lan", trusted=[{"network": "127.0.0.2/32", "login": ERP}])],
    )
    with RawClient(running, "lan", source="127.0.0.2") as client:
        client.cmd("EHLO erp.lan")
        assert client.cmd(f"MAIL FROM:<{ERP_SENDER}>").startswith("250 ")
        assert client.login(USER, PASSWORD) == "503 5.5.1 MAIL transaction in progress"
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.write(message(subject="as the erp", sender=ERP_SENDER) + b".\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 ")
        # Once the transaction is over (the message sent, or RSET), AUTH is accepted.
        assert client.cmd(f"MAIL FROM:<{ERP_SENDER}>").startswith("250 ")
        assert client.cmd("RSET").startswith("250 ")
        assert client.login(USER, PASSWORD).startswith("235 2.7.0 ")
    assert [s["body"]["campana_id"] for s in running.sent] == [23]


def test_shorthand_trusted_networks_still_work(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory(
        listeners=[listener("lan", trusted_networks=["127.0.0.2/32", "127.0.0.5/32"], trusted_login=USER)]
    )
    for source in ("127.0.0.2", "127.0.0.5"):
        with RawClient(running, "lan", source=source) as client:
            client.cmd("EHLO device.lan")
            assert raw_send(client, message(subject=source)).startswith("250 2.0.0 ")
    with RawClient(running, "lan", source="127.0.0.3") as client:
        client.cmd("EHLO device.lan")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("530 ")
    assert [r["body"]["asunto"] for r in running.sent] == ["127.0.0.2", "127.0.0.5"]


# -- configuration ---------------------------------------------------------------------------------------


def _settings(tmp: Path, *trusted: dict[str, str], **listener_keys: object) -> object:
    return load_settings(
        None, **gateway_config(tmp, listeners=[listener("lan", trusted=list(trusted), **listener_keys)])
    )


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "10.0.0.0/7", "2000::/3", "fc00::/15"])
def test_world_wide_networks_are_refused(tmp_path: Path, network: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, {"network": network, "login": USER})
    assert f"trusted network {network} is wider than" in str(info.value)
    assert "allow_wide_trusted_network" in str(info.value)


def test_shorthand_networks_are_checked_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="wider than /8"):
        _settings(tmp_path, trusted_networks=["0.0.0.0/0"], trusted_login=USER)


@pytest.mark.parametrize("network", ["10.0.0.0/8", "192.168.10.0/24", "fd12:3456:789a::/48", "2001::/16"])
def test_lan_sized_networks_are_accepted(tmp_path: Path, network: str) -> None:
    _settings(tmp_path, {"network": network, "login": USER})


def test_wide_network_when_forced_starts_with_a_warning(gateway_factory: Callable[..., Running]) -> None:
    with captured_logs() as logs:
        running = gateway_factory(
            listeners=[
                listener("lan", trusted=[{"network": "0.0.0.0/0", "login": USER}], allow_wide_trusted_network=True)
            ]
        )
    [warning] = events(logs, "trusted_network_wide_allowed")
    assert warning["log_level"] == "warning" and warning["networks"] == ["0.0.0.0/0"]
    with RawClient(running, "lan", source="127.0.0.9") as client:
        client.cmd("EHLO anyone")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")


def test_trusted_login_must_be_a_configured_user(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trusted login 'nobody' is not a user"):
        _settings(tmp_path, {"network": "192.168.10.0/24", "login": "nobody"})
