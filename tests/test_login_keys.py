"""Key rotation: several passwords per login at once, each with an expiry and a label, and which of them devices
still use (metrics, log); a DMDS campaign apikey changed upstream is picked up without a restart and the
previous one honoured for `apikey_grace`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.credentials import Authenticator, AuthFailed
from gateway.config import load_settings
from gateway.providers import registry
from gateway.providers.base import Provider
from gateway.providers.dmds.keys import CampaignKeys
from gateway.providers.dmds.sandbox import DmdsSandbox
from tests.configs import TEST_SCRYPT_N, gateway_config, hash_for_tests, listener
from tests.devices_util import captured_logs, events, raw_send
from tests.harness import APIKEY, CAMPAIGNS, PASSWORD, Running, sandbox_for_tests
from tests.ops_util import sample
from tests.smtputil import RawClient, message

Factory = Callable[..., Running]
ROTATING = "rotating"
OLD, NEW = "old-password", "new-password"
OLD_HASH, NEW_HASH = hash_for_tests(OLD), hash_for_tests(NEW)


def rotating(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"username": ROTATING, "passwords": list(entries), "campaign": 22}


def login(gw: Running, name: str, password: str) -> str:
    with RawClient(gw) as client:
        client.cmd("EHLO client.test")
        return client.login(name, password)


def used(credential: str, login_: str = ROTATING) -> float:
    return sample("smtp_gateway_login_credential_used_total", account="acme", login=login_, credential=credential)


def test_two_passwords_at_once_and_which_one_devices_use(gateway_factory: Factory) -> None:
    gw = gateway_factory(
        extra_users=[rotating({"hash": OLD_HASH, "expires": "2999-01-01", "label": "2026"}, {"hash": NEW_HASH})]
    )
    before = {label: used(label) for label in ("2026", "2")}
    with captured_logs() as logs:
        assert login(gw, ROTATING, OLD).startswith("235 ")
        assert login(gw, ROTATING, OLD).startswith("235 ")  # a cached login is counted too
        with RawClient(gw) as client:
            client.cmd("EHLO client.test")
            assert client.login(ROTATING, NEW).startswith("235 ")
            assert raw_send(client, message(subject="with the new one")).startswith("250 2.0.0 ")
        assert login(gw, ROTATING, "neither") == "535 5.7.8 Authentication credentials invalid"
    assert used("2026") == before["2026"] + 2 and used("2") == before["2"] + 1
    last = sample(
        "smtp_gateway_login_credential_last_used_timestamp_seconds", account="acme", login=ROTATING, credential="2"
    )
    assert last > 0
    assert [e["credential"] for e in events(logs, "auth_ok")] == ["2026", "2026", "2"]
    assert OLD_HASH not in str(logs) and NEW_HASH not in str(logs)
    # password_hash keeps working, as credential 1.
    before_one = used("1", "scanner")
    assert login(gw, "scanner", PASSWORD).startswith("235 ")
    assert used("1", "scanner") == before_one + 1


def test_an_expired_password_is_refused_and_said_so_in_the_log(gateway_factory: Factory) -> None:
    gw = gateway_factory(
        extra_users=[
            rotating({"hash": OLD_HASH, "expires": "2020-01-31", "label": "2019"}, {"hash": NEW_HASH, "label": "2020"})
        ]
    )
    before = sample("smtp_gateway_login_refusals_total", account="acme", login=ROTATING, reason="expired_password")
    with captured_logs() as logs:
        assert login(gw, ROTATING, OLD) == "535 5.7.8 Authentication credentials invalid"
        assert login(gw, ROTATING, NEW).startswith("235 ")
    [failed] = events(logs, "auth_failed")
    assert failed["reason"] == "expired password 2019" and failed["login"] == ROTATING
    after = sample("smtp_gateway_login_refusals_total", account="acme", login=ROTATING, reason="expired_password")
    assert after == before + 1


async def test_a_cached_login_ends_when_its_password_expires(tmp_path: Path) -> None:
    """A verified login is cached for credential_cache_ttl, but never past its password's expiry."""
    now = {"mono": 1000.0, "wall": 1_800_000_000.0}
    settings = load_settings(
        None,
        **gateway_config(
            tmp_path,
            listeners=[listener()],
            extra_users=[rotating({"hash": OLD_HASH, "expires": "2027-01-15T08:00:10Z", "label": "old"})],
        ),
    )
    built: dict[str, Provider] = {name: registry.build(name, account) for name, account in settings.accounts.items()}
    expires = 1_800_000_010.0  # 2027-01-15T08:00:10Z
    auth = Authenticator(settings.accounts, built, clock=lambda: now["mono"], wall=lambda: now["wall"])
    try:
        principal = await auth.authenticate(ROTATING, OLD)
        assert (principal.credential, principal.credential_expires) == ("old", expires)
        now["mono"] += 9
        now["wall"] += 9
        assert (await auth.authenticate(ROTATING, OLD)).credential == "old"  # cached, 1 s left
        now["mono"] += 2
        now["wall"] += 2
        with pytest.raises(AuthFailed) as info:
            await auth.authenticate(ROTATING, OLD)
        assert info.value.reason == "expired password old"
    finally:
        for provider in built.values():
            await provider.aclose()


async def test_a_login_that_does_not_exist_costs_what_a_wrong_password_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timing tells which logins exist: a name that is no login is refused after the same scrypt work (one
    hash, the configured hashes' cost) as a configured login with one password and a wrong guess."""
    settings = load_settings(
        None, **gateway_config(tmp_path, listeners=[listener()], extra_users=[rotating({"hash": OLD_HASH})])
    )
    built: dict[str, Provider] = {name: registry.build(name, account) for name, account in settings.accounts.items()}
    auth = Authenticator(settings.accounts, built)
    work: list[tuple[int, int, int]] = []
    scrypt = hashlib.scrypt

    def counted(password: bytes, *, salt: bytes, n: int, r: int, p: int, **rest: Any) -> bytes:
        work.append((n, r, p))
        return scrypt(password, salt=salt, n=n, r=r, p=p, **rest)

    monkeypatch.setattr(hashlib, "scrypt", counted)
    try:
        for name in (ROTATING, "no-such-login"):
            with pytest.raises(AuthFailed):
                await auth.authenticate(name, "a guess")
    finally:
        for provider in built.values():
            await provider.aclose()
    assert len(work) == 2 and work[0] == work[1] == (TEST_SCRYPT_N, 8, 1)


# -- DMDS campaign apikeys changed upstream ---------------------------------------------------------------


@pytest.fixture
def dmds() -> DmdsSandbox:
    return DmdsSandbox(apikey=APIKEY, campaigns=dict(CAMPAIGNS))


def test_a_changed_campaign_key_works_at_once_and_the_old_one_for_the_grace_period(
    gateway_factory: Factory, dmds: DmdsSandbox
) -> None:
    # No login cache: every AUTH asks DMDS, as a cached login does once its credential_cache_ttl is over.
    gw = gateway_factory(
        sandbox=sandbox_for_tests(dmds=dmds),
        accounts={"acme": {"apikey_grace": 3600.0, "credential_cache_ttl": 0.0, "negative_cache_ttl": 0.0}},
    )
    old = CAMPAIGNS[23]
    before = {which: used(which, "*") for which in ("current", "previous")}
    assert login(gw, "acme-23", old).startswith("235 ")
    dmds.campaigns[23] = "campaign-23-rotated"  # rotated on DMDS's side; the gateway is not told
    with captured_logs() as logs:
        assert login(gw, "acme-23", "campaign-23-rotated").startswith("235 ")
        assert login(gw, "acme-23", old).startswith("235 ")  # within the grace period
    assert [e["credential"] for e in events(logs, "auth_ok")] == ["current", "previous"]
    assert used("current", "*") == before["current"] + 2 and used("previous", "*") == before["previous"] + 1
    assert login(gw, "acme-23", "anything else") == "535 5.7.8 Authentication credentials invalid"


def test_without_a_grace_period_the_old_campaign_key_stops_at_once(gateway_factory: Factory, dmds: DmdsSandbox) -> None:
    gw = gateway_factory(
        sandbox=sandbox_for_tests(dmds=dmds),
        accounts={"acme": {"credential_cache_ttl": 0.0, "negative_cache_ttl": 0.0}},
    )
    assert login(gw, "acme-23", CAMPAIGNS[23]).startswith("235 ")
    dmds.campaigns[23] = "campaign-23-rotated"
    assert login(gw, "acme-23", CAMPAIGNS[23]) == "535 5.7.8 Authentication credentials invalid"
    assert login(gw, "acme-23", "campaign-23-rotated").startswith("235 ")


def test_the_previous_key_ends_with_its_grace_period() -> None:
    now = {"mono": 0.0}
    keys = CampaignKeys(60.0, 100, clock=lambda: now["mono"], wall=lambda: 1_000_000.0 + now["mono"])
    assert keys.match(23, "k1", "k1") is not None
    now["mono"] = 10.0
    assert keys.match(23, "k2", "k2") is not None  # DMDS answers a new key: the grace period starts
    previous = keys.match(23, "k2", "k1")
    assert previous is not None and previous.which == "previous" and previous.expires == 1_000_070.0
    now["mono"] = 69.0
    assert keys.match(23, "k2", "k1") is not None
    now["mono"] = 70.0
    assert keys.match(23, "k2", "k1") is None
    assert keys.match(23, "k2", "k2") is not None
