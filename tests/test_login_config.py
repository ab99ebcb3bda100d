"""Per-login controls in the configuration: what check-config refuses (an unknown or invalid network, overlapping
or contradictory rules), each error naming where it is; what it only notes (sender keys that cannot work as
written); a valid configuration passes `check-config`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_settings
from gateway.config.logins import Quota, resolve
from gateway.policy.recipients import RecipientRules
from tests.configs import gateway_config, listener, write
from tests.docs_blocks import doc_blocks
from tests.harness import PASSWORD_HASH, Running
from tests.ops_util import captured_with_context


def user(name: str = "printer", **rules: Any) -> dict[str, Any]:
    return {"username": name, "password_hash": PASSWORD_HASH, **rules}


def refused(tmp_path: Path, **overrides: Any) -> str:
    overrides.setdefault("listeners", [listener()])
    with pytest.raises(ConfigError) as info:
        load_settings(None, **gateway_config(tmp_path, **overrides))
    return str(info.value)


@pytest.mark.parametrize(
    ("rules", "error"),
    [
        (
            {"networks": ["vlan99"]},
            "accounts.acme.users[printer].networks: unknown network 'vlan99': give a network (192.168.20.0/24), an "
            "address, or a name defined under [networks] (vlan20)",
        ),
        (
            {"networks": ["192.168.20.1/24"]},
            "accounts.acme.users[printer].networks: '192.168.20.1/24' is not a valid network (192.168.20.1/24 has "
            "host bits set): did you mean 192.168.20.0/24?",
        ),
        ({"networks": ["300.1.1.1"]}, "accounts.acme.users[printer].networks: '300.1.1.1' is not a valid network"),
        (
            {"networks": ["vlan20", "192.168.20.7"]},
            "accounts.acme.users[printer].networks: networks 192.168.20.0/24 and 192.168.20.7/32 overlap (from "
            "'vlan20', '192.168.20.7'): list each network once",
        ),
        (
            {"require_tls_except": ["192.168.20.0/24"]},
            "accounts.acme.users[printer].require_tls_except: set, but the login does not require TLS "
            "(require_tls): the exception has nothing to except",
        ),
        (
            {"networks": ["vlan20"], "require_tls": True, "require_tls_except": ["10.0.0.0/8"]},
            "accounts.acme.users[printer].require_tls_except: 10.0.0.0/8 lies outside the login's networks "
            "(192.168.20.0/24): the exception could never apply",
        ),
        (
            {"allowed_recipients": ["acme.example", "bob@acme.example"]},
            "accounts.acme.users[printer].allowed_recipients: 'bob@acme.example' is already covered by "
            "'acme.example': list it once",
        ),
        (
            {"allowed_recipients": ["*.acme.example", "eu.acme.example"]},
            "'eu.acme.example' is already covered by '*.acme.example'",
        ),
        ({"allowed_recipients": ["a.example", "A.example"]}, "'A.example' is listed twice"),
        ({"allowed_recipients": ["not an address"]}, "'not an address' is not an address (a@dom), a domain"),
        (
            {"quota": {"messages_per_hour": 100, "messages_per_day": 50}},
            "accounts.acme.users[printer].quota: messages_per_hour (100) is more than messages_per_day (50): the "
            "hourly limit could never be reached",
        ),
    ],
)
def test_invalid_rules_are_refused_naming_where(tmp_path: Path, rules: dict[str, Any], error: str) -> None:
    text = refused(tmp_path, networks={"vlan20": ["192.168.20.0/24"]}, extra_users=[user(**rules)])
    assert error in text, text


# Sender keys that cannot work as written: a note, never a refusal (configurations holding them loaded and sent
# before these checks: a refusal would stop serve after an upgrade). The rest of the login's senders work.
SENDER_NOTES = [
    (
        {"force_from": True},
        "users[printer].force_from: true without default_from does nothing (there is no From to force): set "
        "default_from, or remove force_from",
    ),
    (
        {"allowed_senders": ["@acme.example", "@old-brand.example"]},
        "users[printer].allowed_senders: '@old-brand.example' is outside the account's sender_domains "
        "(acme.example): the login can never send as it (553); remove the entry or add the domain",
    ),
    (
        {"allowed_senders": ["scanner@acme.exmaple"]},
        "users[printer].allowed_senders: 'scanner@acme.exmaple' is outside the account's sender_domains",
    ),
    (
        {"default_from": "noreply@other.example"},
        "users[printer].default_from: 'noreply@other.example' is outside the account's sender_domains "
        "(acme.example): every message it gives a From to is refused (550)",
    ),
    (
        {"allowed_senders": ["scanner@acme.example"], "default_from": "noreply@acme.example"},
        "users[printer].default_from: 'noreply@acme.example' is not among the login's allowed_senders: every "
        "message it gives a From to is refused (550)",
    ),
]


@pytest.mark.parametrize(("rules", "note"), SENDER_NOTES)
def test_sender_keys_that_cannot_work_are_noted_not_refused(tmp_path: Path, rules: dict[str, Any], note: str) -> None:
    settings = load_settings(None, **gateway_config(tmp_path, listeners=[listener()], extra_users=[user(**rules)]))
    notes = settings.accounts["acme"].notes()
    assert len(notes) == 1 and note in notes[0], notes
    path = write(tmp_path / "noted.toml", gateway_config(tmp_path, listeners=[listener()], extra_users=[user(**rules)]))
    run = [sys.executable, "-m", "gateway", "check-config", "--config-only", "-c", str(path)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert f"smtp-gateway: note: accounts.acme: {notes[0]}" in result.stderr


def test_serve_starts_with_a_noted_sender_key_and_logs_it(gateway_factory: Callable[..., Running]) -> None:
    with captured_with_context() as logs:
        gateway_factory(extra_users=[user(force_from=True), user("old", allowed_senders=["@old-brand.example"])])
    notes = [(e["account"], e["note"]) for e in logs if e["event"] == "account_note"]
    assert [n[0] for n in notes] == ["acme", "acme"], notes
    assert notes[0][1].startswith("users[printer].force_from:") and notes[1][1].startswith("users[old].allowed_")


def test_sender_keys_within_the_sender_domains_are_taken(tmp_path: Path) -> None:
    # Compared as the sender policy compares them: letter case and IDN forms alike; the account's registered
    # return-path is a MAIL FROM its domain's logins may be limited to.
    users = [
        user(
            "a",
            allowed_senders=["Scanner@ACME.example", "dmds-acme@nl.acme.example"],
            default_from="scanner@acme.example",
        ),
        user("b", allowed_senders=["@acme.example"], default_from="noreply@acme.example", force_from=True),
        user("c", allowed_senders=["bücher.example"], default_from="info@xn--bcher-kva.example"),
    ]
    domains = {"acme.example": "dmds-acme@nl.acme.example", "bücher.example": "rp@nl.xn--bcher-kva.example"}
    settings = load_settings(
        None,
        **gateway_config(
            tmp_path, listeners=[listener()], accounts={"acme": {"sender_domains": domains}}, extra_users=users
        ),
    )
    assert {"a", "b", "c"} <= {u.username for u in settings.accounts["acme"].configured_users}
    assert settings.accounts["acme"].notes() == []


def test_an_accounts_defaults_are_checked_as_well(tmp_path: Path) -> None:
    text = refused(tmp_path, accounts={"acme": {"networks": ["nowhere"]}})
    assert "accounts.acme.networks: unknown network 'nowhere'" in text
    text = refused(tmp_path, accounts={"acme": {"require_tls_except": ["10.0.0.0/8"]}})
    assert "accounts.acme.require_tls_except: set, but neither the account nor any of its users" in text


def test_named_networks_must_not_overlap_or_be_misnamed(tmp_path: Path) -> None:
    assert "networks.lan: networks 10.0.0.0/8 and 10.1.0.0/16 overlap" in refused(
        tmp_path, networks={"lan": ["10.0.0.0/8", "10.1.0.0/16"]}
    )
    assert "'1lan': a network name is letters" in refused(tmp_path, networks={"1lan": ["10.0.0.0/8"]})


def test_a_trusted_network_outside_its_logins_networks_is_a_contradiction(tmp_path: Path) -> None:
    text = refused(
        tmp_path,
        listeners=[listener("lan", trusted_networks=["10.0.20.0/24"], trusted_login="printer")],
        extra_users=[user(networks=["10.0.21.0/24"])],
    )
    assert "listeners[lan]: trusted network 10.0.20.0/24 is not within the networks of its login 'printer'" in text


def test_passwords_are_password_hash_or_a_list_with_distinct_labels(tmp_path: Path) -> None:
    both = user(passwords=[{"hash": PASSWORD_HASH}])
    assert "set password_hash or passwords, not both" in refused(tmp_path, extra_users=[both])
    twice = {
        "username": "p",
        "passwords": [{"hash": PASSWORD_HASH, "label": "a"}, {"hash": PASSWORD_HASH, "label": "a"}],
    }
    assert "passwords: label a given twice" in refused(tmp_path, extra_users=[twice])
    neither = {"username": "p"}
    assert "password_hash (or passwords) is required" in refused(tmp_path, extra_users=[neither])
    not_a_hash = {"username": "p", "passwords": [{"hash": "plain-text"}]}
    assert "is not a hash made by `smtp-gateway hash-password`" in refused(tmp_path, extra_users=[not_a_hash])


def test_a_users_rules_take_the_accounts_for_what_it_leaves_unset(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        **gateway_config(
            tmp_path,
            listeners=[listener()],
            accounts={
                "acme": {
                    "networks": ["10.0.0.0/8"],
                    "require_tls": True,
                    "quota": {"messages_per_day": 1000, "bytes_per_day": 10**9},
                }
            },
            extra_users=[user(networks=[], quota={"messages_per_day": 0, "messages_per_hour": 10})],
        ),
    )
    account = settings.accounts["acme"]
    rules = resolve(account, account.configured_users[1], {}, "u")
    assert rules.networks == () and rules.require_tls  # [] is "anywhere"; require_tls from the account
    assert rules.quota == Quota(messages_per_hour=10, messages_per_day=0, bytes_per_day=10**9)  # 0: no limit
    assert [str(n) for n in resolve(account, None, {}, "a").networks] == ["10.0.0.0/8"]


def test_recipient_rules_match_addresses_domains_and_subdomains() -> None:
    rules = RecipientRules.parse(["acme.example", "@partner.example", "*.corp.example", "Boss@Other.example"])
    assert rules.allows("x@ACME.example") and rules.allows("y@partner.example")
    assert rules.allows("z@eu.corp.example") and not rules.allows("z@corp.example")
    assert rules.allows("boss@other.example") and not rules.allows("eve@other.example")
    assert not rules.allows("x@sub.acme.example")
    idn = RecipientRules.parse(["bücher.example"])
    assert idn.allows("x@xn--bcher-kva.example")  # recipients arrive with their domain in IDNA form


def test_check_config_accepts_every_control_and_names_a_broken_one(tmp_path: Path) -> None:
    good = gateway_config(
        tmp_path,
        listeners=[listener()],
        networks={"printers": ["192.168.20.0/24"]},
        extra_users=[
            {
                "username": "printer",
                "passwords": [
                    {"hash": PASSWORD_HASH, "expires": "2020-01-31", "label": "old"},
                    {"hash": PASSWORD_HASH, "label": "new"},
                ],
                "networks": ["printers"],
                "require_tls": True,
                "require_tls_except": ["192.168.20.0/25"],
                "allowed_recipients": ["acme.example"],
                "quota": {"messages_per_hour": 10, "bytes_per_day": 10**8},
                "test_mode": True,
            }
        ],
    )
    path = write(tmp_path / "good.toml", good)
    run = [sys.executable, "-m", "gateway", "check-config", "--config-only", "-c", str(path)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "scrypt$" not in result.stdout  # the hashes are masked
    good["accounts"]["acme"]["users"][1]["networks"] = ["printerz"]
    write(path, good)
    result = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "accounts.acme.users[printer].networks: unknown network 'printerz'" in result.stderr


RECIPE_BASE = """
[accounts.acme]
dmdsid = "acme"
apikey = "x"
sender_domains = { "acme.com" = "dmds-acme@nl.acme.com" }

[[accounts.acme.users]]
username = "erp"
password_hash = "scrypt$..."
campaign = 22
"""


def test_the_per_login_recipes_are_valid(tmp_path: Path) -> None:
    """Each recipe of docs/per-login.md, added to an account, is a configuration `serve` would take."""
    blocks = doc_blocks("test_the_per_login_recipes_are_valid")
    assert len(blocks) == 3
    for n, block in enumerate(blocks):
        path = tmp_path / f"recipe{n}.toml"
        # The pages show `scrypt$...` where the reader's own hash goes; a configuration needs a whole one.
        path.write_text((RECIPE_BASE + block.text).replace('"scrypt$..."', f'"{PASSWORD_HASH}"'))
        settings = load_settings(path)
        assert settings.accounts["acme"], block.where()
