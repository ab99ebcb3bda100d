"""Valid configuration keys come from the models, for any nesting: sections, dict-keyed tables, lists and
unions of models (a discriminated union on `provider`, as accounts are becoming)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config import keys
from gateway.config.settings import (
    ENV_PREFIX,
    FOREIGN_ENV,
    ConfigError,
    config_keys,
    format_validation_error,
    load_settings,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class User(_Strict):
    username: str
    campaign: int | None = None


class Dmds(_Strict):
    provider: Literal["dmds"] = "dmds"
    dmdsid: str
    apikey: str
    users: list[User] = []


class DengageUser(_Strict):
    username: str
    tags: list[str] = []


class Dengage(_Strict):
    provider: Literal["dengage"]
    account_id: str
    token: str
    users: list[DengageUser] = []


class Log(_Strict):
    level: str = "info"


class Root(_Strict):
    hostname: str = "x"
    log: Log = Log()
    accounts: dict[str, Annotated[Dmds | Dengage, Field(discriminator="provider")]] = {}
    domains: dict[str, str] = {}
    listeners: list[Log] = []
    maybe: Log | None = None


ROOT = keys.tree(Root)
USER_HASH = "scrypt$16384$8$1$0D40zWYVDiOciVoUbojShQ==$PCjVXnlyzsOPEmaXK08RTF9PYcyyht2Kf4VfibFCnjU="


def unknown(*names: str) -> list[str]:
    return keys.unknown_env(dict.fromkeys(names, "v"), ROOT, "APP_", "__")


def test_paths_cover_nested_and_union_keys() -> None:
    assert set(keys.paths(ROOT)) == {
        ("hostname",),
        ("log", "level"),
        ("accounts", "*", "provider"),
        ("accounts", "*", "dmdsid"),
        ("accounts", "*", "apikey"),
        ("accounts", "*", "users"),
        ("accounts", "*", "account_id"),
        ("accounts", "*", "token"),
        ("domains",),
        ("listeners",),
        ("maybe", "level"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "APP_HOSTNAME",
        "APP_LOG__LEVEL",
        "APP_LOG",
        "APP_ACCOUNTS__ACME__TOKEN",
        "APP_ACCOUNTS__X__DMDSID",
        "APP_ACCOUNTS__ACME",
        "APP_DOMAINS__ACME.COM",
        "APP_LISTENERS",
        "APP_MAYBE__LEVEL",
        "app_log__level",
        "OTHER_THING",
    ],
)
def test_valid_names_pass(name: str) -> None:
    assert unknown(name) == []


@pytest.mark.parametrize(
    ("name", "why", "meant"),
    [
        ("APP_HOSTNAM", "there is no key 'hostnam'", "APP_HOSTNAME"),
        ("APP_ACCOUNT__ACME__TOKEN", "there is no key 'account'", "APP_ACCOUNTS__ACME__TOKEN"),
        ("APP_ACCOUNTS__ACME__TOKN", "accounts.acme has no key 'tokn'", "APP_ACCOUNTS__ACME__TOKEN"),
        ("APP_ACCOUNTS__ACME__ACOUNT_ID", "accounts.acme has no key 'acount_id'", "APP_ACCOUNTS__ACME__ACCOUNT_ID"),
        ("APP_LOG__LEVEL__X", "log.level has no sub-keys", "APP_LOG__LEVEL"),
        ("APP_LISTENERS__0__LEVEL", "listeners has no sub-keys", "APP_LISTENERS"),
        ("APP_LOG___LEVEL", "log has no key '_level'", "APP_LOG__LEVEL"),
        ("APP_LOG____LEVEL", "empty key between delimiters", "APP_LOG__LEVEL"),
    ],
)
def test_unknown_names_get_the_nearest(name: str, why: str, meant: str) -> None:
    [line] = unknown(name)
    assert line.startswith(f"unknown environment variable {name}: {why}")
    assert line.endswith(f"; did you mean {meant}? (or unset it)")


def test_far_off_name_gets_the_pattern() -> None:
    [line] = unknown("APP_ZZZZZZZZZZZZZZ")
    assert line.endswith("see config/example.toml (APP_<SECTION>__<KEY>) (or unset it)")


def test_error_locations_skip_the_union_member() -> None:
    with pytest.raises(ValidationError) as info:
        Root.model_validate({"accounts": {"acme": {"provider": "dengage", "account_id": "a", "tokn": "t"}}})
    shown = sorted(keys.display_key(ROOT, e["loc"])[0] for e in info.value.errors())
    assert shown == ["accounts.acme.token", "accounts.acme.tokn"]
    _, parent = keys.display_key(ROOT, ("accounts", "acme", "dengage", "tokn"))
    assert keys.suggest_key(parent, "tokn") == "token"


def test_every_gateway_key_is_accepted_from_the_environment() -> None:
    """No false alarm: each settable key of the real Settings, as a variable, is valid."""
    names = [
        ENV_PREFIX + "__".join(p if p != "*" else "acme" for p in path).upper() for path in keys.paths(config_keys())
    ]
    assert "GATEWAY_ACCOUNTS__ACME__APIKEY" in names and "GATEWAY_DNS__NAMESERVERS" in names
    assert keys.unknown_env(dict.fromkeys(names, "v"), config_keys(), ENV_PREFIX, "__", FOREIGN_ENV) == []


def test_unknown_file_key_in_the_real_settings_is_named_with_a_hint() -> None:
    from gateway.config import Settings

    with pytest.raises(ValidationError) as info:
        Settings.model_validate({"dns": {"nameserver": ["127.0.0.1"]}, "hostnme": "x"})
    text = format_validation_error(info.value)
    assert re.search(r"^  dns\.nameserver: unknown key; did you mean nameservers\?$", text, re.M), text
    assert re.search(r"^  hostnme: unknown key; did you mean hostname\?$", text, re.M), text


def test_keys_of_members_lists_of_different_models_are_all_known() -> None:
    """Both members have `users`, each a list of its own user model: the keys of both are known (the last
    member's list hid the first's: a misspelled DMDS `campaign` got no hint)."""
    users = ROOT.fields["accounts"].item.fields["users"].item  # type: ignore[union-attr]
    assert users is not None and set(users.fields) == {"username", "campaign", "tags"}
    _, parent = keys.display_key(ROOT, ("accounts", "acme", "dmds", "users", 0, "campain"))
    assert keys.suggest_key(parent, "campain") == "campaign"


@pytest.mark.parametrize(
    ("line", "meant"),
    [
        ("default_form = 'a@example.com'", "default_from"),
        ("campain = 22", "campaign"),
        ("campaing = 22", "campaign"),
        ("may_chose_campaign = true", "may_choose_campaign"),
        ("campaign_from_subjet = true", "campaign_from_subject"),
    ],
)
def test_misspelled_user_key_of_a_provider_names_the_nearest(tmp_path: Path, line: str, meant: str) -> None:
    """The real settings (providers registered): a DMDS user's own keys get "did you mean" too."""
    config = tmp_path / "gw.toml"
    config.write_text(f"""
[accounts.acme]
dmdsid = "acme"
apikey = "k"

[[accounts.acme.users]]
username = "dev"
password_hash = "{USER_HASH}"
{line}
""")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    key = line.split(" ")[0]
    assert f"accounts.acme.users[0].{key}: unknown key; did you mean {meant}?" in str(info.value)


@pytest.mark.parametrize(
    ("listeners", "users", "key"),
    [
        ("[listeners]", "[[accounts.acme.users]]", "listeners"),
        ("[[listeners]]", "[accounts.acme.users]", "accounts.acme.users"),
    ],
)
def test_a_single_bracket_list_of_tables_names_the_two_brackets(
    tmp_path: Path, listeners: str, users: str, key: str
) -> None:
    """`[listeners]` for `[[listeners]]` got pydantic's bare "Input should be a valid list" (review
    firstcontact2 F4)."""
    config = tmp_path / "gw.toml"
    config.write_text(f"""
{listeners}
name = "plain"
address = "127.0.0.1"
port = 2525
tls = "none"
allow_insecure_auth = true

[accounts.acme]
dmdsid = "acme"
apikey = "k"
sender_domains = {{ "example.com" = "r@nl.example.com" }}

{users}
username = "u"
password_hash = "{USER_HASH}"
campaign = 22
""")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert f"  {key}: a list of tables: write each one under [[{key}]] (two brackets), not [{key}]" in str(
        info.value
    ), str(info.value)


@pytest.mark.parametrize("value", ['"x"', "3", '{ name = "plain" }'])
def test_a_list_of_tables_given_no_table_is_not_told_to_undo_one(tmp_path: Path, value: str) -> None:
    """`listeners = "x"` was told "not [listeners]", a single-bracket table the file never had (review today6b
    F3): that hint only for a table; an inline table is one (`listeners = { ... }` for `[listeners]`)."""
    config = tmp_path / "gw.toml"
    config.write_text(f"listeners = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    if value.startswith("{"):
        assert "listeners: a list of tables: write each one under [[listeners]] (two brackets)" in str(info.value)
    else:
        assert "  listeners: must be a list of tables, each one under [[listeners]]" in str(info.value), str(info.value)
        assert "not [listeners]" not in str(info.value)


def test_a_list_of_values_given_a_table_keeps_pydantics_words() -> None:
    from gateway.config import Settings

    with pytest.raises(ValidationError) as info:
        Settings.model_validate({"delivery": {"retry_schedule": {"a": 1}}})
    assert "delivery.retry_schedule: Input should be a valid list" in format_validation_error(info.value)
