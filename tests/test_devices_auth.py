"""AUTH as devices do it, over raw sockets: mechanism names in any case, AUTH after HELO, long credentials,
usernames in email form, and what the leftover lines of a refused AUTH get back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.configs import hash_for_tests, listener
from tests.devices_util import b64, captured_logs, events, plain_blob, raw_send
from tests.harness import CAMPAIGNS, PASSWORD, USER, Running
from tests.smtputil import RawClient, message, send, session

USERNAME_PROMPT = "334 " + b64("Username:")
PASSWORD_PROMPT = "334 " + b64("Password:")

# 500+ characters of base64 each: longer than aiosmtpd's 512-octet command limit and
# its 1001-octet line limit once encoded (RFC 4954 §4 allows 12288).
LONG_USER = "multifunction-device-" + "x" * 400
LONG_PASSWORD = "Long-pass-" + "p" * 600 + "!#%"
LONG_HASH = hash_for_tests(LONG_PASSWORD)


@pytest.mark.parametrize("command", ["auth login", "AUTH Login", "Auth LOGIN", "aUtH lOgIn"])
def test_login_mechanism_in_any_case(gateway: Running, command: str) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd(command) == USERNAME_PROMPT
        assert client.cmd(b64(USER)) == PASSWORD_PROMPT
        assert client.cmd(b64(PASSWORD)) == "235 2.7.0 Authentication successful"
        assert raw_send(client, message(subject=command)).startswith("250 2.0.0 Ok: queued as ")
    assert gateway.sent[0]["body"]["asunto"] == command


@pytest.mark.parametrize("command", ["auth plain", "AUTH Plain", "auth PLAIN"])
def test_plain_mechanism_in_any_case(gateway: Running, command: str) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        # With the initial response on the AUTH line ...
        assert client.cmd(f"{command} {plain_blob(USER, PASSWORD)}").startswith("235 2.7.0 ")
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        # ... and without it (an empty 334 challenge first).
        assert client.cmd(command) == "334 "
        assert client.cmd(plain_blob(USER, PASSWORD)).startswith("235 2.7.0 ")


def test_lowercase_login_with_initial_response(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd(f"auth login {b64(USER)}") == PASSWORD_PROMPT
        assert client.cmd(b64(PASSWORD)).startswith("235 2.7.0 ")


def test_plain_with_empty_initial_response_marker(gateway: Running) -> None:
    """RFC 4954: "=" is an empty initial response; PLAIN cannot be empty, so it is refused, not crashed on."""
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd("AUTH PLAIN =").startswith("501 5.5.2 ")
        assert client.login().startswith("235 ")


def test_lines_after_a_refused_auth_are_not_echoed(gateway: Running) -> None:
    """Before: "auth login" got 504, and the username/password lines the device sent next came back
    upper-cased inside 500 replies (aiosmtpd quotes an unknown command). A refused AUTH still leaves such
    lines behind; the reply no longer repeats them."""
    user_line, password_line = b64(USER), b64(PASSWORD)
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd("AUTH CRAM-MD5") == "504 5.5.4 Unrecognized authentication type"
        for line in (user_line, password_line):
            reply = client.cmd(line)
            assert reply == "500 5.5.2 Command not recognized"
            assert line.upper() not in reply.upper()
        # The session is still usable.
        assert client.login().startswith("235 2.7.0 ")


def test_auth_after_helo(gateway: Running) -> None:
    """Devices that never send EHLO: HELO advertises nothing (one 250 line), AUTH works all the same."""
    with RawClient(gateway) as client:
        client.write(b"HELO printer.lan\r\n")
        assert client.reply() == ["250 gw.test"]
        assert client.cmd(f"AUTH LOGIN {b64(USER)}") == PASSWORD_PROMPT
        assert client.cmd(b64(PASSWORD)).startswith("235 2.7.0 ")
        assert raw_send(client, message(subject="after HELO")).startswith("250 2.0.0 ")
    assert gateway.sent[0]["body"]["asunto"] == "after HELO"


def test_auth_after_helo_follows_the_listener_tls_rule(gateway: Running) -> None:
    """On a STARTTLS listener AUTH needs TLS, after HELO as after EHLO."""
    with RawClient(gateway, "starttls") as client:
        client.cmd("HELO printer.lan")
        assert client.cmd("AUTH LOGIN").startswith("538 5.7.11 ")
        client.starttls()
        client.cmd("HELO printer.lan")
        assert client.login().startswith("235 2.7.0 ")


def test_auth_before_any_helo_is_503(gateway: Running) -> None:
    with RawClient(gateway) as client:
        assert client.cmd(f"AUTH PLAIN {plain_blob(USER, PASSWORD)}").startswith("503 5.5.1 ")


@pytest.fixture
def long_login(gateway_factory: Callable[..., Running]) -> Running:
    return gateway_factory(extra_users=[{"username": LONG_USER, "password_hash": LONG_HASH, "campaign": 23}])


@pytest.mark.parametrize("greeting", ["EHLO client.test", "HELO client.test"])
def test_long_credentials_as_initial_response(long_login: Running, greeting: str) -> None:
    blob = plain_blob(LONG_USER, LONG_PASSWORD)
    assert len(blob) > 1001
    with RawClient(long_login) as client:
        client.cmd(greeting)
        assert client.cmd(f"AUTH PLAIN {blob}").startswith("235 2.7.0 ")
        assert raw_send(client, message(subject="long login")).startswith("250 2.0.0 ")
    assert long_login.sent[0]["body"]["campana_id"] == 23


def test_long_credentials_through_login_prompts(long_login: Running) -> None:
    with RawClient(long_login) as client:
        client.cmd("EHLO client.test")
        assert client.cmd("auth login") == USERNAME_PROMPT
        assert len(b64(LONG_USER)) > 512
        assert client.cmd(b64(LONG_USER)) == PASSWORD_PROMPT
        assert client.cmd(b64(LONG_PASSWORD)).startswith("235 2.7.0 ")


def test_long_credentials_with_smtplib(long_login: Running) -> None:
    with session(long_login, "implicit", user=LONG_USER, password=LONG_PASSWORD) as client:
        code, text = send(client, message(subject="smtplib long login"))
    assert code == 250, text


def test_overlong_auth_lines_are_refused_and_the_session_goes_on(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd("AUTH LOGIN") == USERNAME_PROMPT
        # Longer than RFC 4954's 12288 octets.
        assert client.cmd("A" * 13000) == "500 5.5.6 Authentication exchange line is too long"
        assert client.cmd("AUTH PLAIN " + "A" * 13000) == "500 5.5.6 Authentication exchange line is too long"
        assert client.login().startswith("235 2.7.0 ")


@pytest.mark.parametrize("greeting", ["EHLO client.test", "HELO client.test"])
@pytest.mark.parametrize("length", [12289, 13000, 20000])
def test_overlong_auth_command_line_is_5_5_6(gateway: Running, greeting: str, length: int) -> None:
    # RFC 4954 §4: the AUTH command with its initial response past 12288 octets. 12289 passes the reader
    # (its limit holds the CRLF) and is refused by the command's limit; longer lines overrun the reader.
    with RawClient(gateway) as client:
        client.cmd(greeting)
        line = "auth PLAIN " + "A" * (length - len("auth PLAIN "))
        assert client.cmd(line) == "500 5.5.6 Authentication exchange line is too long"
        # Any other over-long line keeps the generic reply; the session goes on.
        assert client.cmd("NOOP " + "A" * length) == "500 5.5.2 Command line too long"
        # 12288 octets: within the limit, read and decoded (and refused: not base64).
        assert client.cmd("AUTH PLAIN " + "A" * 12277) == "501 5.5.2 Cannot decode base64"
        assert client.login().startswith("235 2.7.0 ")


def test_bad_base64_gets_one_text_whether_initial_response_or_challenge_answer(gateway: Running) -> None:
    """The same 501 5.5.2 for a bad initial response and a bad answer to a 334 challenge (aiosmtpd's own
    challenge said "Can't decode base64"); "*" aborts; the session goes on and nothing is counted."""
    with captured_logs() as logs, RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd("AUTH PLAIN not*base64") == "501 5.5.2 Cannot decode base64"
        assert client.cmd("AUTH PLAIN") == "334 "
        assert client.cmd("not*base64") == "501 5.5.2 Cannot decode base64"
        assert client.cmd("AUTH LOGIN") == USERNAME_PROMPT
        assert client.cmd("%%%") == "501 5.5.2 Cannot decode base64"
        assert client.cmd("AUTH LOGIN") == USERNAME_PROMPT
        assert client.cmd(b64(USER)) == PASSWORD_PROMPT
        assert client.cmd("=") == "501 5.5.2 Cannot decode base64"  # "=" only as an initial response
        assert client.cmd("AUTH PLAIN") == "334 "
        assert client.cmd("*") == "501 5.7.0 Auth aborted"
        assert client.login().startswith("235 2.7.0 ")
    assert not events(logs, "auth_failed")


# -- usernames in email form ----------------------------------------------------------------------------


def test_email_form_username_is_not_guessed(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.login(f"{USER}@acme.example", PASSWORD).startswith("535 5.7.8 ")


def test_strip_login_domain(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory(listeners=[listener("plain", strip_login_domain=True)])
    with captured_logs() as logs, RawClient(running) as client:
        client.cmd("EHLO client.test")
        assert client.login(f"{USER}@printer.lan", PASSWORD).startswith("235 2.7.0 ")
        assert raw_send(client, message(subject="stripped")).startswith("250 2.0.0 ")
    with RawClient(running) as client:
        client.cmd("EHLO client.test")
        # The DMDS SMTP-API login in email form, as some devices insist on.
        assert client.login("acme-23@anything.example", CAMPAIGNS[23]).startswith("235 2.7.0 ")
        assert raw_send(client, message(subject="api login")).startswith("250 2.0.0 ")
    first, second = (r["body"] for r in running.sent)
    assert (first["asunto"], first["campana_id"]) == ("stripped", 22)
    assert (second["asunto"], second["campana_id"]) == ("api login", 23)
    [ok, *_] = events(logs, "auth_ok")
    assert ok["login"] == USER and ok["mapped_by"] == "strip_login_domain"


def test_login_aliases(gateway_factory: Callable[..., Running]) -> None:
    aliases = {"Scan.Dept@Acme.Example": USER, "printer@acme.example": "acme-22"}
    running = gateway_factory(listeners=[listener("plain", login_aliases=aliases, strip_login_domain=True)])
    with captured_logs() as logs:
        with RawClient(running) as client:
            client.cmd("EHLO client.test")
            # Whole addresses, matched without regard to case; an alias wins over stripping the domain.
            assert client.login("scan.dept@ACME.example", PASSWORD).startswith("235 2.7.0 ")
        with RawClient(running) as client:
            client.cmd("EHLO client.test")
            assert client.login("printer@acme.example", CAMPAIGNS[22]).startswith("235 2.7.0 ")
        with RawClient(running) as client:
            client.cmd("EHLO client.test")
            assert client.login("printer@acme.example", PASSWORD).startswith("535 5.7.8 ")
    checked = [(e["event"], e["login"], e["mapped_by"]) for e in logs if e["event"].startswith("auth_")]
    assert checked == [
        ("auth_ok", USER, "login_aliases"),
        ("auth_ok", "acme-22", "login_aliases"),
        ("auth_failed", "acme-22", "login_aliases"),
    ]


def test_aliases_only_without_strip(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory(listeners=[listener("plain", login_aliases={"scanner@acme.example": USER})])
    with RawClient(running) as client:
        client.cmd("EHLO client.test")
        assert client.login("scanner@elsewhere.example", PASSWORD).startswith("535 5.7.8 ")
        assert client.login("scanner@acme.example", PASSWORD).startswith("235 2.7.0 ")


def test_a_password_typed_as_username_stays_out_of_the_log(gateway: Running) -> None:
    with captured_logs() as logs, RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.login(PASSWORD, PASSWORD).startswith("535 5.7.8 ")
        assert client.login(USER, "wrong").startswith("535 5.7.8 ")
    first, second = events(logs, "auth_failed")
    assert PASSWORD not in repr(logs)
    assert "login" not in first and len(first["login_unknown"]) == 12
    assert second["login"] == USER
