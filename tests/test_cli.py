"""The command line as an operator runs it: check-config (secrets masked, errors naming the key, env
overrides), hash-password, and the repository's own config/example.toml."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gateway.auth.passwords import verify_password
from gateway.cli.common import queue_named
from gateway.config import (
    DeliverySettings,
    DnsSettings,
    DsnSettings,
    EventSettings,
    HttpSettings,
    LedgerSettings,
    LimitsSettings,
    ListenerSettings,
    LogSettings,
    ReturnPathSettings,
    Settings,
    TlsSettings,
    WebhookSettings,
    load_settings,
    masked_dump,
)
from gateway.config.settings import ApiToken
from gateway.providers import registry
from tests.configs import gateway_config, listener, write
from tests.harness import PASSWORD, PASSWORD_HASH

CLI = [sys.executable, "-m", "gateway"]
EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "example.toml"
MASK = "**********"
FILE_APIKEY = "file-apikey-s3cr3t-0001"
ENV_APIKEY = "env-apikey-s3cr3t-0002"
SECOND_HASH_USER = "printer"


def _env(**extra: str) -> dict[str, str]:
    """The parent's environment without any GATEWAY_* variable (hermetic), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


def run_cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False, env=_env(**env)
    )


def write_config(tmp_path: Path, **overrides: Any) -> Path:
    """The test account with the key FILE_APIKEY and two users (any valid scrypt hash: two users make
    "every user" meaningful)."""
    second = {"username": SECOND_HASH_USER, "password_hash": PASSWORD_HASH, "campaign": 23}
    config = gateway_config(
        tmp_path, listeners=[listener("plain")], extra_users=[second], accounts={"acme": {"apikey": FILE_APIKEY}}
    )
    return write(tmp_path / "gateway.toml", {**config, **overrides})


def _secrets_absent(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout, f"secret {secret[:12]}... printed on stdout"
        assert secret not in result.stderr, f"secret {secret[:12]}... printed on stderr"
    # The hash is also recognisable by its parts (salt, digest): none of them may leak either.
    for part in PASSWORD_HASH.split("$")[4:]:
        assert part not in result.stdout + result.stderr


# ---- check-config ---------------------------------------------------------------------------------


def test_check_config_prints_json_with_every_secret_masked(tmp_path: Path) -> None:
    result = run_cli("check-config", "-c", str(write_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    dumped: dict[str, Any] = json.loads(result.stdout)
    account = dumped["accounts"]["acme"]
    assert account["apikey"] == MASK
    assert [u["username"] for u in account["users"]] == ["scanner", SECOND_HASH_USER]
    assert [u["password_hash"] for u in account["users"]] == [MASK, MASK]
    # The rest is shown as configured (masking did not blank the whole account).
    assert account["dmdsid"] == "acme"
    assert account["sender_domains"] == {"acme.example": "dmds-acme@nl.acme.example"}
    assert dumped["listeners"][0]["port"] == 0
    _secrets_absent(result, FILE_APIKEY, PASSWORD_HASH, PASSWORD)


def test_check_config_masks_a_webhooks_path_and_query(tmp_path: Path) -> None:
    """Chat and automation services put the hook's token in its URL: only scheme and host are printed."""
    token = "T0KEN-9f3a1c77e2b84d0b"
    hooks = [
        {"name": "chat", "url": f"https://hooks.example.net/services/{token}?sig={token}", "secret": "s" * 32},
        {"name": "app", "url": "https://app.example.net:8443", "secret": "s" * 32},
    ]
    result = run_cli("check-config", "--config-only", "-c", str(write_config(tmp_path, webhooks=hooks)))
    assert result.returncode == 0, result.stderr
    urls = [hook["url"] for hook in json.loads(result.stdout)["webhooks"]]
    assert urls == ["https://hooks.example.net/**********", "https://app.example.net:8443"]
    _secrets_absent(result, token, "s" * 32)


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("postgresql://gw:pw@db.example/gw", "holds a password"),
        ("postgresql://gw@db.example/gw?sslmode=require&password=pw", "holds a password"),
        ("postgresql://gw@db.example/gw?sslmode=require&%70assword=pw", "holds a password"),
        ("postgresql://gw@db.example/gw?sslkey=/k.pem&sslpassword=pw", "holds the client key's passphrase"),
    ],
)
def test_a_queue_url_holding_a_password_is_refused_without_echoing_it(tmp_path: Path, url: str, refusal: str) -> None:
    result = run_cli("check-config", "--config-only", "-c", str(write_config(tmp_path, delivery={"queue_url": url})))
    assert result.returncode == 2
    assert f"delivery.queue_url: {refusal}" in result.stderr
    assert "pw@" not in result.stderr and "password=pw" not in result.stderr


SLASHED = "Zq9SecretMark"  # in a password written into queue_url: never printed


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        # A base64 password holds '/' (about 40 % of `openssl rand -base64` ones): libpq ends the authority
        # there and reads `user:pass` as host:port, so the password check that cut the URL there let it by,
        # to be quoted as a port that is no number or a percent-encoded token libpq cannot read...
        (f"postgresql://gateway:{SLASHED}/xY+2@db.example/gateway", "holds a password"),
        (f"postgresql://gateway:{SLASHED}%zz/x@db.example/gateway", "holds a password"),
        # ... or accepted (the port empty or a number, the rest a database name) and printed whole.
        (f"postgresql://gateway:/{SLASHED}+x@db.example/gateway", "holds a password"),
        (f"postgresql://gateway:4242/{SLASHED}@db.example/gateway", "holds a password"),
        # A '?' in the password: libpq reads it as the password all the same (its '@' comes before any '/').
        (f"postgresql://gateway:{SLASHED}?a=b@db.example/gateway", "holds a password"),
        # libpq decodes the user part after cutting it at ':': `gateway%3A...` is one user name, a password in it.
        (f"postgresql://gateway%3A{SLASHED}@db.example/gateway", "holds a percent-encoded ':' (%3A) in its user"),
        # libpq's own refusals name the problem, not the text it could not read.
        (f"postgresql://gateway@db.example:{SLASHED}/gateway", "has a port that is not a port number (1-65535)"),
        (f"postgresql://gateway@db.example/{SLASHED}%zz", "is not a URL libpq can read: invalid percent-encoded"),
        (f"postgresql://gateway@db.example/gateway?{SLASHED}=1", "is not a URL libpq can read: invalid URI query"),
        (f"postgresql://gateway@db.example/gateway?{SLASHED}", "is not a URL libpq can read: missing key/value"),
        (f"postgresql://gateway@db.example/gateway?sslmode={SLASHED}", "sslmode is not one of disable, allow,"),
    ],
    ids=[
        "slash-in-password",
        "slash-and-percent",
        "slash-first",
        "digits-then-slash",
        "question-mark",
        "encoded-colon",
        "port",
        "percent-token",
        "query-name",
        "query-no-value",
        "sslmode",
    ],
)
def test_a_queue_url_is_refused_without_quoting_any_of_it(tmp_path: Path, url: str, refusal: str) -> None:
    result = run_cli("check-config", "--config", str(write_config(tmp_path, delivery={"queue_url": url})))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr
    assert f"delivery.queue_url: {refusal}" in result.stderr, result.stderr
    _secrets_absent(result, SLASHED)


_SHOWN_QUEUE_URLS = [
    (f"postgresql://gw:{SLASHED}/x@db.example/gw", "postgresql://gw@db.example/gw"),
    (f"postgresql://gw%3A{SLASHED}@db.example/gw", "postgresql://gw@db.example/gw"),
    (
        "postgresql://gw@db.example:5432/gw?application_name=a@b",
        "postgresql://gw@db.example:5432/gw?application_name=a@b",
    ),
    ("postgresql:///gw?host=/run/postgresql", "postgresql:///gw?host=/run/postgresql"),
]


def test_a_queue_url_is_printed_without_a_user_parts_password() -> None:
    """Belt and braces: a password the validator missed is not printed by check-config and the console's
    Configuration page (masked_dump); the rest of the URL is, '@' in its query too."""
    settings = load_settings(None, listeners=[{"name": "a", "port": 2525}])
    for url, shown in _SHOWN_QUEUE_URLS:
        delivery = settings.delivery.model_copy(update={"queue_url": url})  # unvalidated, as if it got through
        dumped = masked_dump(settings.model_copy(update={"delivery": delivery}))
        assert dumped["delivery"]["queue_url"] == shown


@pytest.mark.parametrize(("url", "shown"), _SHOWN_QUEUE_URLS)
def test_the_queue_and_the_cli_lines_show_a_queue_url_as_check_config_does(url: str, shown: str) -> None:
    """The queue's and the ledger's `self.url` and the CLI's lines (redacted()) took the last '@' of the whole
    URL: `?application_name=a@b` gave `postgresql://gw@b`, and a %3A password tail was kept. One helper now."""
    from gateway.queue.postgres import redacted

    assert redacted(url) == shown
    settings = load_settings(None, listeners=[{"name": "a", "port": 2525}])
    delivery = settings.delivery.model_copy(update={"queue_url": url})
    assert queue_named(settings.model_copy(update={"delivery": delivery})) == f"delivery.queue_url {shown}"


def test_check_config_masks_the_query_of_a_jwks_url(tmp_path: Path) -> None:
    """Keys and tokens are put in a URL's query: an issuer's jwks_url is printed with it masked, its host and
    path kept (they say which service it is). (An api_base with a query is refused: test_config_refusals.)"""
    token = "QSECRET-4e1d0c9a"
    issuer = {
        "name": "corp",
        "issuer": "https://idp.example",
        "jwks_url": f"https://idp.example/keys?code={token}",
        "audience": ["gw"],
    }
    path = write_config(tmp_path, oauth={"issuers": [issuer]})
    result = run_cli("check-config", "--config-only", "-c", str(path))
    assert result.returncode == 0, result.stderr
    dumped = json.loads(result.stdout)
    assert dumped["oauth"]["issuers"][0]["jwks_url"] == f"https://idp.example/keys?{MASK}"
    _secrets_absent(result, token)


def test_unknown_key_is_refused_and_named(tmp_path: Path) -> None:
    config = write_config(tmp_path, limits={"max_recipeints": 5})
    result = run_cli("check-config", "-c", str(config))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "limits.max_recipeints" in result.stderr
    _secrets_absent(result, FILE_APIKEY, PASSWORD_HASH)


def test_invalid_env_value_is_refused_and_named(tmp_path: Path) -> None:
    result = run_cli("check-config", "-c", str(write_config(tmp_path)), GATEWAY_LIMITS__MAX_RECIPIENTS="0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert re.search(r"^\s*limits\.max_recipients: .*greater than or equal to 1", result.stderr, re.M), result.stderr
    _secrets_absent(result, FILE_APIKEY, PASSWORD_HASH)


def test_a_list_set_in_the_environment_without_json_names_the_variable(tmp_path: Path) -> None:
    """pydantic-settings names only the section ('field "accounts"'): the variable is named, its value not
    repeated (it may be a secret)."""
    value = "campaign-s3cr3t-0003"
    result = run_cli("check-config", "-c", str(write_config(tmp_path)), GATEWAY_ACCOUNTS__ACME__CAMPAIGNS=value)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "smtp-gateway: GATEWAY_ACCOUNTS__ACME__CAMPAIGNS is not JSON: a list or table set in the environment "
        "must be JSON"
    ), result.stderr
    _secrets_absent(result, value)


def test_invalid_secret_value_is_named_but_not_echoed(tmp_path: Path) -> None:
    """A clear password pasted where the hash belongs: refused, and the error does not repeat it."""
    config = write_config(tmp_path).read_text().replace(PASSWORD_HASH, PASSWORD, 1)
    path = tmp_path / "pasted.toml"
    path.write_text(config)
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 2
    assert "accounts.acme.users[0].password_hash" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("check-config", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr


def test_env_overrides_nested_keys(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_cli(
        "check-config",
        "-c",
        str(config),
        GATEWAY_ACCOUNTS__ACME__APIKEY=ENV_APIKEY,
        GATEWAY_LOG__LEVEL="debug",
        GATEWAY_LIMITS__MAX_RECIPIENTS="7",
    )
    assert result.returncode == 0, result.stderr
    dumped = json.loads(result.stdout)
    assert dumped["log"]["level"] == "debug"
    assert dumped["limits"]["max_recipients"] == 7
    # The env merges into the file's account: its other keys survive, the key stays masked.
    account = dumped["accounts"]["acme"]
    assert (account["dmdsid"], account["apikey"], len(account["users"])) == ("acme", MASK, 2)
    _secrets_absent(result, FILE_APIKEY, ENV_APIKEY, PASSWORD_HASH)
    # And without the env the file's values are back.
    plain = json.loads(run_cli("check-config", "-c", str(config)).stdout)
    assert (plain["log"]["level"], plain["limits"]["max_recipients"]) == ("info", 50)


def test_env_apikey_replaces_the_file_apikey(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path)
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    assert load_settings(config).accounts["acme"].apikey.get_secret_value() == FILE_APIKEY
    monkeypatch.setenv("GATEWAY_ACCOUNTS__ACME__APIKEY", ENV_APIKEY)
    settings = load_settings(config)
    account = settings.accounts["acme"]
    assert account.apikey.get_secret_value() == ENV_APIKEY
    assert account.dmdsid == "acme" and account.sender_domains == {"acme.example": "dmds-acme@nl.acme.example"}
    assert [u.username for u in account.users] == ["scanner", SECOND_HASH_USER]
    # $GATEWAY_CONFIG names the file when no path is given.
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    assert load_settings().accounts["acme"].apikey.get_secret_value() == ENV_APIKEY


# ---- hash-password --------------------------------------------------------------------------------


def test_hash_password_from_stdin_verifies() -> None:
    password = "correct horse battery staple ñ"
    result = run_cli("hash-password", "--stdin", stdin=password + "\n")
    assert result.returncode == 0, result.stderr
    stored = result.stdout.strip()
    assert stored.startswith("scrypt$") and "\n" not in stored
    assert password not in result.stdout + result.stderr
    assert verify_password(password, stored)
    assert not verify_password(password + "x", stored)
    assert not verify_password("", stored)
    # Salted: the same password hashes differently each time, and each verifies.
    again = run_cli("hash-password", "--stdin", stdin=password + "\n").stdout.strip()
    assert again != stored and verify_password(password, again)


def test_hash_password_refuses_empty_input() -> None:
    result = run_cli("hash-password", "--stdin", stdin="\n")
    assert result.returncode == 2
    assert result.stdout == ""


# ---- config/example.toml --------------------------------------------------------------------------


def test_example_config_is_valid() -> None:
    # --config-only: its certificate paths are examples, not files on this machine (tests/test_first_contact.py)
    result = run_cli("check-config", "--config-only", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    dumped = json.loads(result.stdout)
    assert dumped["accounts"]["acme"]["apikey"] == MASK
    assert "change-me" not in result.stdout


@pytest.mark.parametrize(
    ("model", "section"),
    [
        (Settings, ""),
        (ListenerSettings, "listeners"),
        (TlsSettings, "tls"),
        (LimitsSettings, "limits"),
        # Every provider's account and user models, as the registry lists them.
        *((spec.account_model, f"accounts.<{spec.kind} account>") for spec in registry.specs()),
        *((spec.user_model, f"accounts.<{spec.kind} account>.users") for spec in registry.specs()),
        (DeliverySettings, "delivery"),
        (DnsSettings, "dns"),
        (LogSettings, "log"),
        (HttpSettings, "http"),
        (ApiToken, "http.api_tokens"),
        (LedgerSettings, "ledger"),
        (EventSettings, "accounts.<account>.events"),
        (DsnSettings, "accounts.<account>.dsn"),
        (WebhookSettings, "webhooks"),
        (ReturnPathSettings, "return_path"),
    ],
)
def test_example_config_lists_every_key(model: type[BaseModel], section: str) -> None:
    """config/example.toml lists every key (set, or commented out when it has no useful default)."""
    text = EXAMPLE.read_text()
    missing = [
        name
        for name in model.model_fields
        if not re.search(rf"^\s*#?\s*{re.escape(name)}\s*=", text, re.M)  # a key ...
        and not re.search(rf"^\[\[?([\w.]+\.)?{re.escape(name)}[].]", text, re.M)  # ... or a table
    ]
    assert missing == [], f"[{section}] keys missing from config/example.toml: {missing}"
