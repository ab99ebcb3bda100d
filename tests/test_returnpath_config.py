"""The return path's settings, refused with their location when wrong: notify values (per login and account),
webhook URLs, event types, accounts and secrets (masked like every secret), event polling bounds and zones;
and the sandbox's fates by local part and by request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_settings, masked_dump
from gateway.providers import registry  # noqa: F401 - the account models
from gateway.providers.fates import FateError, Fates, fate_by_local_part
from tests.configs import PASSWORD_HASH, gateway_config

HOOK = {"name": "app", "url": "https://hooks.example.com/smtp", "secret": "s3cret-value"}


def load(tmp_path: Path, **overrides: Any) -> Any:
    return load_settings(None, **gateway_config(tmp_path, listeners=[], **overrides))


def test_notify_is_sender_off_or_an_address_per_account_and_login(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        accounts={"acme": {"dsn": {"notify": "Off"}}},
        extra_users=[{"username": "erp", "password_hash": PASSWORD_HASH, "notify": "ops@acme.example"}],
    )
    acme = settings.accounts["acme"]
    assert acme.dsn.notify == "off" and [u.notify for u in acme.users] == [None, "ops@acme.example"]
    with pytest.raises(ConfigError, match=r"accounts\.acme\.dsn\.notify"):
        load(tmp_path, accounts={"acme": {"dsn": {"notify": "the boss"}}})
    with pytest.raises(ConfigError, match=r"users.*notify"):
        load(tmp_path, extra_users=[{"username": "x", "password_hash": PASSWORD_HASH, "notify": "nobody"}])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"url": "http://hooks.example.com/x"}, "in clear"),
        ({"url": "http://127.attacker.example/hook"}, "in clear"),
        ({"url": "http://127.0.0.1.nip.io/hook"}, "in clear"),
        ({"url": "https://hooks.example.com:99999/x"}, "port"),
        ({"url": "https://hooks.example.com:0/x"}, "port"),
        ({"url": "https://user:pw@hooks.example.com/x"}, "credentials"),
        ({"url": "ftp://hooks.example.com/x"}, "http"),
        ({"events": ["bounced", "exploded"]}, "unknown event type exploded"),
        ({"accounts": ["nope"]}, "no account nope"),
        ({"secret": None}, "secret"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_a_wrong_webhook_is_refused_by_name(tmp_path: Path, change: dict[str, Any], words: str) -> None:
    hook = {k: v for k, v in {**HOOK, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=words):
        load(tmp_path, webhooks=[hook])


def test_webhooks_are_named_once_and_their_secrets_masked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="used twice"):
        load(tmp_path, webhooks=[HOOK, HOOK])
    secret = tmp_path / "hook.secret"
    secret.write_text("from-a-file\n")
    settings = load(tmp_path, webhooks=[HOOK, {**HOOK, "name": "b", "secret": None, "secret_file": str(secret)}])
    assert [w.key for w in settings.webhooks] == [b"s3cret-value", b"from-a-file"]
    dumped = str(masked_dump(settings))
    assert "s3cret-value" not in dumped and "from-a-file" not in dumped
    local = load(tmp_path, webhooks=[{**HOOK, "url": "http://127.0.0.1:9000/x"}])
    assert local.webhooks[0].events[-1] == "dead"  # every type by default


def test_event_polling_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"events\.overlap"):
        load(tmp_path, accounts={"acme": {"events": {"overlap": 100_000}}})
    with pytest.raises(ConfigError, match="unknown time zone"):
        load(tmp_path, accounts={"acme": {"events": {"timezone": "Mars/Olympus"}}})
    with pytest.raises(ConfigError, match=r"events\.page_size"):
        load(tmp_path, accounts={"acme": {"events": {"page_size": 5}}})
    zoned = load(tmp_path, accounts={"acme": {"events": {"timezone": "America/Argentina/Buenos_Aires"}}})
    assert zoned.accounts["acme"].events.timezone == "America/Argentina/Buenos_Aires"
    assert zoned.accounts["acme"].events.enabled is False  # off unless asked for


def test_the_sandbox_fates_by_local_part_and_by_request() -> None:
    assert fate_by_local_part("Bounce-Hard+invoice-7@example.com") == "bounce-hard"
    assert fate_by_local_part("bounce-soft@example.com") == "bounce-soft"
    assert fate_by_local_part("not-sent+x@example.com") == "not-sent"
    assert fate_by_local_part("deliver@example.com") == fate_by_local_part("anyone@example.com") == "deliver"
    fates = Fates(clock=lambda: 1000.0)
    fates.choose({"address": "Boss@Example.com", "fate": "bounce-hard"})
    assert fates.fate("boss@example.com") == "bounce-hard"
    fates.choose({"address": "boss@example.com", "fate": "deliver"})
    assert fates.fate("boss@example.com") == "deliver"
    for wrong in ({"address": "x", "fate": "deliver"}, {"address": "a@b.c", "fate": "explode"}, {"delay": "soon"}, {}):
        with pytest.raises(FateError):
            fates.choose(wrong)
    # A DMDS hard bounce invalidates the contact (unless whitelisted); mail to an invalid contact is not sent.
    fates.whitelist.add("bounce-hard+vip@example.com")
    assert (
        fates.sent("dmds", "E1", ["bounce-hard@example.com", "bounce-hard@x.com", "bounce-hard+vip@example.com"])
        == set()
    )
    assert sorted(fates.invalid) == ["bounce-hard@example.com", "bounce-hard@x.com"]
    assert fates.sent("dmds", "E2", ["bounce-hard@example.com", "ok@example.com"]) == {"bounce-hard@example.com"}
    assert [e.name for e in fates.of_batch("E2")] == ["Not-Sent", "envio"]
    # Not-Sent is DMDS' answer for an invalid contact: a `not-sent` address is on the list (dEngage has none).
    assert fates.sent("dmds", "E3", ["not-sent+a@example.com"]) == {"not-sent+a@example.com"}
    assert "not-sent+a@example.com" in fates.invalid
    fates.choose({"delay": 5})
    fates.sent("dengage", "T1", ["not-sent@example.com"], ["smtp-gateway"])
    assert fates.window("dengage", 0, 2000, "smtp-gateway") == []  # not visible for 5 s
    fates.clock = lambda: 1006.0
    [late] = fates.window("dengage", 0, 2000, "smtp-gateway")
    assert (late.name, late.tags) == ("NotSent", ("smtp-gateway",))
    assert fates.window("dengage", 0, 2000, "other-tag") == []


def test_the_sandbox_command_delays_events_and_checks_webhook_signatures(tmp_path: Path) -> None:
    import hashlib
    import hmac

    import httpx

    from tests.procs import kill, start_sandbox

    proc, url = start_sandbox(tmp_path / "record.jsonl", "--event-delay", "2.5", "--webhook-secret", "s3")
    try:
        assert httpx.get(f"{url}/_sandbox/fate").json()["delay"] == 2.5
        body = b'{"id": "u1", "type": "bounced"}'
        mac = hmac.new(b"s3", b"1700000000." + body, hashlib.sha256).hexdigest()
        for signature, verified in ((f"t=1700000000,v1={mac}", True), (f"t=1700000001,v1={mac}", False)):
            httpx.post(f"{url}/_sandbox/webhook", content=body, headers={"X-Gateway-Signature": signature})
            assert httpx.get(f"{url}/_sandbox/requests").json()[-1]["verified"] is verified
    finally:
        kill(proc)
