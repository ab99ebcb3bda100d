"""AUTH failures per client IP across connections: slowed, then locked out (421 4.7.0) without any password
check or upstream lookup, while another address logs in at once. Against a real gateway and the sandbox."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from tests.devices_util import captured_logs, events
from tests.harness import CAMPAIGNS, PASSWORD, USER, Running
from tests.ops_util import sample
from tests.smtputil import RawClient

Factory = Callable[..., Running]
LOCKED = "421 4.7.0 Too many failed logins from your address; try again later"
SMTP_API_LOGIN = "acme-22"


def attempt(gw: Running, source: str, user: str, password: str | Iterator[str]) -> list[str]:
    """AUTH PLAIN attempts on one connection until it is refused for good; every reply to AUTH."""
    passwords = itertools.repeat(password) if isinstance(password, str) else password
    replies = []
    with RawClient(gw, source=source) as client:
        client.cmd("EHLO guesser.test")
        for _ in range(5):
            reply = client.login(user, next(passwords))
            replies.append(reply)
            if not reply.startswith("535 "):
                break
    return replies


def test_brute_force_is_slowed_then_locked_out_and_others_log_in(gateway_factory: Factory) -> None:
    gw = gateway_factory(
        limits={
            "auth_failures_per_ip": 3,
            "auth_delay_max": 0.2,
            "auth_lockout_failures": 6,
            "auth_lockout_time": 600,
            "max_auth_failures": 3,
        }
    )
    lockouts = sample("smtp_gateway_auth_lockouts_total")
    with captured_logs() as logs:
        seen: list[str] = []
        # A new password each time: a repeated one would be answered from the refusal cache.
        guesses = (f"guess-{n}" for n in itertools.count())
        while LOCKED not in seen:
            assert len(seen) < 20, seen
            seen += attempt(gw, "127.0.0.1", SMTP_API_LOGIN, guesses)
        # Three per connection (then 421), six in all: the sixth locks the address out.
        assert seen == ["535 5.7.8 Authentication credentials invalid"] * 2 + [
            "421 4.7.0 Too many failed authentication attempts, closing connection"
        ] + ["535 5.7.8 Authentication credentials invalid"] * 2 + [LOCKED]
        lookups = len(gw.lookups)
        assert lookups == 6  # each guess at an SMTP-API login cost one campania_apikey lookup ...
        # ... until the lockout: now not even the right password is checked, nor looked up.
        assert attempt(gw, "127.0.0.1", SMTP_API_LOGIN, CAMPAIGNS[22]) == [LOCKED]
        assert attempt(gw, "127.0.0.1", USER, PASSWORD) == [LOCKED]
        assert len(gw.lookups) == lookups
        # Another address is not affected: it logs in at once, with a real check.
        assert attempt(gw, "127.0.0.2", SMTP_API_LOGIN, CAMPAIGNS[22]) == ["235 2.7.0 Authentication successful"]
        assert len(gw.lookups) == lookups + 1
    delayed = events(logs, "auth_delayed")
    # From the third failure on, every attempt of 127.0.0.1 waited first; 127.0.0.2 never did.
    assert [d["client_failures"] for d in delayed] == [3, 4, 5]
    assert all(d["peer"].startswith("127.0.0.1:") for d in delayed)
    [lockout] = events(logs, "auth_lockout")
    assert (lockout["client"], lockout["failures"], lockout["locked_for"]) == ("127.0.0.1", 6, 600)
    assert [e["client"] for e in events(logs, "auth_locked_out")] == ["127.0.0.1"]  # once a minute, not per try
    assert sample("smtp_gateway_auth_lockouts_total") == lockouts + 1
    # No line holds a password that was tried.
    text = repr(logs)
    assert "guess-" not in text and CAMPAIGNS[22] not in text and PASSWORD not in text


def test_lockout_is_checked_before_any_challenge(gateway_factory: Factory) -> None:
    """AUTH LOGIN from a locked-out address gets 421 instead of its Username: prompt."""
    gw = gateway_factory(limits={"auth_failures_per_ip": 1, "auth_delay_max": 0, "auth_lockout_failures": 1})
    assert attempt(gw, "127.0.0.3", USER, "wrong") == [LOCKED]
    with RawClient(gw, source="127.0.0.3") as client:
        client.cmd("EHLO again.test")
        assert client.cmd("AUTH LOGIN") == LOCKED
        assert client.closed()
    # Sending without AUTH is still refused as before (530), the lockout is only about AUTH.
    with RawClient(gw, source="127.0.0.3") as client:
        client.cmd("EHLO again.test")
        assert client.cmd("MAIL FROM:<billing@acme.example>").startswith("530 5.7.0 ")
