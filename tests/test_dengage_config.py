"""A dEngage account as an operator configures it: check-config masks the API user's secrets (also read
from a file), names wrong or missing keys, and `rate_limit = 0` turns the limiter off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import configs
from tests.configs import gateway_config, listener
from tests.harness import PASSWORD_HASH
from tests.test_cli import MASK, _secrets_absent, run_cli

USERKEY = "dengage-userkey-s3cr3t-0003"
API_PASSWORD = "dengage-password-s3cr3t-0004"


def write(tmp_path: Path, **account: Any) -> Path:
    """A configuration whose one account is the dEngage account `crm` with these keys."""
    (tmp_path / "userkey").write_text(USERKEY + "\n")
    crm = {
        "provider": "dengage",
        "api_base": "https://tr-api.dengage.com/rest",
        **account,
        "users": [{"username": "erp", "password_hash": PASSWORD_HASH, "tags": ["erp"]}],
    }
    return configs.write(
        tmp_path / "gateway.toml", gateway_config(tmp_path, listeners=[listener()], accounts={"crm": crm})
    )


def test_check_config_masks_the_api_user(tmp_path: Path) -> None:
    path = write(tmp_path, userkey_file=str(tmp_path / "userkey"), password=API_PASSWORD, rate_limit=0)
    result = run_cli("check-config", "--config-only", "-c", str(path))
    assert result.returncode == 0, result.stderr
    crm = json.loads(result.stdout)["accounts"]["crm"]
    assert (crm["provider"], crm["userkey"], crm["password"]) == ("dengage", MASK, MASK)
    assert crm["users"][0]["password_hash"] == MASK and crm["users"][0]["tags"] == ["erp"]
    assert crm["rate_limit"] is None  # 0: no limit
    assert (crm["api_base"], crm["rate_burst"], crm["api_user_logins"]) == ("https://tr-api.dengage.com/rest", 2, False)
    _secrets_absent(result, USERKEY, API_PASSWORD, PASSWORD_HASH)


def test_missing_secret_and_unknown_key_are_named(tmp_path: Path) -> None:
    config = write(tmp_path, userkey=USERKEY, froms_tll=60)
    result = run_cli("check-config", "--config-only", "-c", str(config))
    assert result.returncode == 2
    assert "accounts.crm.froms_tll" in result.stderr
    result = run_cli("check-config", "--config-only", "-c", str(write(tmp_path, userkey=USERKEY)))
    assert result.returncode == 2
    assert "accounts.crm" in result.stderr and "password (or password_file) is required" in result.stderr
    _secrets_absent(result, USERKEY)


def test_quickstart_config_has_a_dengage_account(tmp_path: Path) -> None:
    from gateway.cli.quickstart import quickstart_settings
    from gateway.config import load_settings
    from gateway.providers.dengage.config import DengageAccount
    from gateway.providers.dengage.spec import DEMO_USER as DENGAGE_DEMO_USER

    settings = load_settings(None, **quickstart_settings(tmp_path, 8025, 2525, 2587))
    crm = settings.accounts["crm"]
    assert isinstance(crm, DengageAccount) and crm.base_url == "http://127.0.0.1:8025/rest"
    assert [u.username for u in crm.users] == [DENGAGE_DEMO_USER]


def test_check_config_notes_that_the_from_is_not_sent_until_a_field_is_set(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config-only", "-c", str(write(tmp_path, userkey=USERKEY, password="p")))
    assert result.returncode == 0, result.stderr
    assert "note: accounts.crm: dEngage mail goes out under the account's default sender" in result.stderr
    fields = {"from_address_field": "content.fromAddress", "from_name_field": "content.fromName"}
    result = run_cli(
        "check-config", "--config-only", "-c", str(write(tmp_path, userkey=USERKEY, password="p", **fields))
    )
    assert result.returncode == 0 and "default sender" not in result.stderr


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        ({"from_address_field": "content from"}, "is not a request field"),
        ({"from_name_field": "content.subject"}, "a field the gateway fills itself"),
        ({"from_identity_field": "send.to.id"}, "a field the gateway fills itself"),
        ({"default_subject": "Scan from {user}"}, "unknown placeholder {user}: use {login}, {account}"),
        ({"default_subject": "Scan from {login.__class__}"}, "unknown placeholder {login.__class__}"),
        ({"default_subject": "Scan {"}, "Single '{' encountered"),
        ({"default_subject": "  "}, "must not be empty"),
        ({"forward_x_headers": ["Received"]}, "is not an X- header name or pattern"),
        ({"forward_x_headers": ["X-Gateway-*"]}, "X-Gateway-* options are never forwarded"),
    ],
)
def test_message_settings_are_checked(tmp_path: Path, keys: dict[str, Any], error: str) -> None:
    result = run_cli("check-config", "--config-only", "-c", str(write(tmp_path, userkey=USERKEY, password="p", **keys)))
    assert result.returncode == 2
    assert f"accounts.crm.{next(iter(keys))}" in result.stderr and error in result.stderr
