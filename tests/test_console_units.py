"""The console's pure parts and the pieces it added below it: session cookies and CSRF tokens, one-time
passwords of the test send, lockouts listed and lifted, queue selections."""

from __future__ import annotations

import asyncio

import pytest

from gateway.auth.onetime import OneTimeLogins
from gateway.auth.passwords import hash_password
from gateway.config import LimitsSettings
from gateway.config.console import ConsoleAdmin
from gateway.console.sessions import Session, SessionKeys, ended, new_session
from gateway.core.scrypt import parse_hash
from gateway.delivery.admin import BadSelection, QueueItem, Selection, parse_age
from gateway.limits.clients import AuthGuard
from gateway.limits.lockouts import LocalLockouts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_sealed_session_opens_only_with_its_key_and_unchanged() -> None:
    keys = SessionKeys(b"k" * 32)
    session = new_session("alice", keys.fingerprint("scrypt$hash"), 5000.0)
    cookie = keys.seal(session)
    assert keys.open(cookie) == session
    assert SessionKeys(b"j" * 32).open(cookie) is None
    payload, mac = cookie.split(".")
    assert keys.open(payload[:-2] + "AA." + mac) is None
    # Not ASCII (compare_digest refuses such a str with TypeError, which was a 500): simply no session.
    for junk in (
        None,
        "",
        "no-dot",
        "a.b.c",
        "%%%." + mac,
        "a.\u00e9",
        payload + "." + mac[:-1] + "\u00e9",
        "a.\udcc3",
    ):
        assert keys.open(junk) is None
    assert "scrypt" not in cookie and "hash" not in cookie


def test_csrf_tokens_are_bound_to_their_session_and_purpose() -> None:
    keys = SessionKeys(b"k" * 32)
    one, two = (new_session("alice", "fp", 0.0) for _ in range(2))
    assert keys.csrf_valid(one, keys.csrf(one))
    assert not keys.csrf_valid(one, keys.csrf(two)) and not keys.csrf_valid(one, None)
    assert not keys.csrf_valid(one, "")
    assert keys.signin_valid("nonce", keys.signin_token("nonce"))
    assert not keys.signin_valid("other", keys.signin_token("nonce")) and not keys.signin_valid(None, "x")
    assert keys.signin_token(one.sid) != keys.csrf(one)  # a token of one kind is never valid as the other


def test_sessions_end_when_idle_or_old() -> None:
    s = Session("alice", 0.0, 100.0, "sid", "fp")
    assert ended(s, 150.0, idle=60, lifetime=1000) is None
    assert ended(s, 160.0, idle=60, lifetime=1000) == "idle"
    assert ended(s.touched(990.0), 1000.0, idle=60, lifetime=1000) == "lifetime"
    assert ended(Session("alice", 5000.0, 5000.0, "sid", "fp"), 100.0, idle=60, lifetime=1000) == "lifetime"


def test_a_session_signed_in_on_an_instance_minutes_ahead_holds_here() -> None:
    """Sessions' times are each instance's own clock: one signed in on an instance 2 minutes ahead was ended
    ("lifetime") by every other at each request (it allowed 60 s); now up to the 5 minutes the sign-out records
    allow for differing clocks (review console3 L1)."""
    ahead = Session("alice", 1120.0, 1120.0, "sid", "fp")
    assert ended(ahead, 1000.0, idle=60, lifetime=1000) is None
    assert ended(Session("alice", 1301.0, 1301.0, "sid", "fp"), 1000.0, idle=60, lifetime=1000) == "lifetime"


def test_a_one_time_password_works_once_for_its_login_within_its_time() -> None:
    clock = Clock()
    onetime = OneTimeLogins(clock, monotonic=clock)  # a clock that never steps: both agree
    first = onetime.issue("scanner")
    assert first.startswith("onetime$") and len(first) > 40
    assert not onetime.redeem("scanner", "onetime$guess")
    assert onetime.redeem("scanner", first)
    assert not onetime.redeem("scanner", first)  # used up
    other = onetime.issue("scanner")
    assert not onetime.redeem("printer", other) and not onetime.redeem("scanner", other)  # wrong login uses it up
    late = onetime.issue("scanner", ttl=60)
    clock.now += 61
    assert not onetime.redeem("scanner", late)
    # Issuing holds nothing (the password verifies itself); the nonces taken are kept only until they expire.
    for _ in range(5):
        assert onetime.redeem("scanner", onetime.issue("scanner"))
    assert len(onetime._taken) == 5
    clock.now += 61
    assert onetime.redeem("scanner", onetime.issue("scanner")) and len(onetime._taken) == 1


def test_a_used_one_time_password_stays_used_when_the_wall_clock_steps_forward_and_back() -> None:
    """A taken nonce was forgotten on the wall clock alone: stepped forward past the expiry (NTP makestep, a VM
    resumed), any redeem forgot it, and stepped back within the minute the used password logged in again."""
    wall, ticks = Clock(), Clock()
    onetime = OneTimeLogins(wall, monotonic=ticks)
    password = onetime.issue("scanner")
    assert onetime.redeem("scanner", password)
    wall.now += 120  # stepped forward past the expiry
    assert onetime.redeem("scanner", onetime.issue("scanner"))  # any redeem prunes
    wall.now -= 120  # and back: the password is within its minute again
    assert not onetime.redeem("scanner", password)  # still used up
    # Forgotten once both clocks say its time is over (the one taken at +120 s too).
    wall.now += 181
    ticks.now += 61
    assert onetime.redeem("scanner", onetime.issue("scanner")) and len(onetime._taken) == 1


def test_lockouts_of_every_guard_are_listed_and_lifted_per_scope() -> None:
    limits = LimitsSettings(auth_failures_per_ip=1, auth_lockout_failures=2, auth_lockout_time=600)
    clock = Clock()
    smtp, console = AuthGuard(limits, clock), AuthGuard(limits, clock)

    async def fail(guard: AuthGuard, key: str) -> None:
        ticket, _ = await guard.begin(key)
        assert ticket is not None
        await guard.end(ticket, failed=True)

    for _ in range(2):
        asyncio.run(fail(smtp, "192.0.2.7"))
    asyncio.run(fail(console, "192.0.2.8"))
    lockouts = LocalLockouts(lambda: [("smtp", smtp), ("console", console)], wall=lambda: 50_000.0)
    found = asyncio.run(lockouts.in_force())
    assert [(lo.scope, lo.client, lo.until, lo.failures) for lo in found] == [
        ("smtp", "192.0.2.7", 50_600.0, 0),
        ("console", "192.0.2.8", 0.0, 1),
    ]
    assert not asyncio.run(lockouts.lift("console", "192.0.2.7"))  # not held in that scope
    assert asyncio.run(lockouts.lift("smtp", "192.0.2.7"))
    assert smtp.before("192.0.2.7").locked_for == 0
    assert [lo.client for lo in asyncio.run(lockouts.in_force())] == ["192.0.2.8"]


def test_selections_match_every_filter_given() -> None:
    row = {"id": "A" * 16, "state": "dead", "account": "acme", "created": 1000.0, "dead_reason": "Invalid email"}
    item = QueueItem(row, "scanner", ("x@mail.acme-clients.example",))
    assert Selection(dead=True).matches(item, 1000.0)
    assert Selection(True, "acme", "scanner", "acme-clients.example", "invalid", 60).matches(item, 1100.0)
    assert not Selection(True, older_than=60).matches(item, 1030.0)
    assert not Selection(True, domain="clients.example.org").matches(item, 1000.0)
    assert not Selection(True, domain="ents.example").matches(item, 1000.0)  # a domain, not a suffix of one
    assert not Selection(True, login="printer").matches(item, 1000.0)
    assert not Selection(True, reason="quota").matches(item, 1000.0)
    assert [parse_age(t) for t in ("90", "90s", "30m", "2h", "1.5d")] == [90, 90, 1800, 7200, 129600]
    with pytest.raises(BadSelection):
        parse_age("soon")


def test_the_queue_cli_count_line_says_when_the_limit_or_the_scan_cap_cut_it() -> None:
    """`queue list|dead` with filters: the count is the number shown, so the line says when more match than
    --limit shows, and when the scan stopped at its cap (as the console's Queue page says both)."""
    from gateway.cli.queue import _matched

    assert _matched(3, {"more": False, "scanned": 40, "truncated": False}) == "3"
    assert (
        _matched(5, {"more": True, "scanned": 40, "truncated": False})
        == "5 shown, the oldest: more match (raise --limit)"
    )
    capped = _matched(0, {"more": False, "scanned": 10_000, "truncated": True})
    assert capped == "0; only the oldest 10000 were read: narrow the filters to reach younger ones"


async def test_a_sign_in_with_an_unknown_name_verifies_a_hash_at_the_admins_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The decoy verified for an unknown name was made at the default cost whatever the admins' hashes use:
    with an admin's hash at another cost, a wrong name was refused many times faster than a wrong password,
    telling which names are admins'. (Its parameters are compared, not its time.)"""
    from gateway.console import signin

    verified: list[str] = []

    def spy(password: str, stored: str) -> bool:
        verified.append(stored)
        return False

    monkeypatch.setattr(signin, "verify_password", spy)
    guard = signin.AdminSignIn(LimitsSettings(auth_failures_per_ip=100, auth_lockout_failures=100))
    for n, r in ((2**13, 8), (2**14, 4)):
        admin = ConsoleAdmin(name="alice", password_hash=hash_password("right", n=n, r=r))
        verdict = await guard.check([admin], "mallory", "right", "127.0.0.1")
        assert verdict.result == "invalid"
        decoy = parse_hash(verified[-1])
        assert (decoy.n, decoy.r, decoy.p) == (n, r, 1), "the unknown name's hash is not at the admin's cost"
        assert verified[-1] != admin.password_hash.get_secret_value()
