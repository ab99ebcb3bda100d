"""dEngage end to end: real SMTP clients, the real gateway and the sandbox's dEngage routes over HTTP.

One login for many messages, renewal before expiry, a 401 mid-run, 200 messages under a real 30/s limit
without a 429, Retry-After honoured, the IP-allowlist 403, code != 0 at HTTP 200, per-recipient retries,
the From identities, attachments byte for byte, Bcc hidden, API-user logins, option headers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import smtplib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from gateway.queue.sqlite import SqliteQueue
from tests.harness import (
    DENGAGE_API_PASSWORD,
    DENGAGE_SENDER,
    DENGAGE_USER,
    DENGAGE_USERKEY,
    PASSWORD,
    Running,
    dengage_sandbox,
    sandbox_for_tests,
)
from tests.spool_helpers import spool_rows, wait_for

FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 5.0, "probe_interval": 0.5}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def message(
    subject: str,
    to: tuple[str, ...] = ("client@example.com",),
    cc: tuple[str, ...] = (),
    sender: str = DENGAGE_SENDER,
    extra: str = "",
    body: str = "hello",
) -> bytes:
    head = f"From: {sender}\r\nTo: {', '.join(to)}\r\n" + (f"Cc: {', '.join(cc)}\r\n" if cc else "")
    return (head + f"Subject: {subject}\r\n{extra}\r\n{body}\r\n").encode()


def send(
    running: Running,
    raw: bytes,
    rcpts: tuple[str, ...] = ("client@example.com",),
    mail_from: str = DENGAGE_SENDER,
    user: str = DENGAGE_USER,
    password: str = PASSWORD,
    client: smtplib.SMTP | None = None,
) -> tuple[int, str]:
    """MAIL/RCPT/DATA as the dEngage login; the reply to the first refused command, else to DATA."""
    own = client is None
    if client is None:
        client = smtplib.SMTP("127.0.0.1", running.port(), timeout=30)
        client.login(user, password)
    try:
        code, text = client.mail(mail_from)
        if code != 250:
            client.rset()
            return code, text.decode()
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code != 250:
                client.rset()
                return code, text.decode()
        code, text = client.data(raw)
        return code, text.decode()
    finally:
        if own:
            client.quit()


def queued_id(text: str) -> str:
    return text.rsplit(" ", 1)[1]


def subjects(running: Running, status: int | None = 200) -> list[str]:
    return [r["body"]["content"]["subject"] for r in running.calls("send", status=status)]


# -- the token --------------------------------------------------------------------------------------------


def test_many_messages_share_one_login(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    replies = []
    for session in range(3):
        with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
            client.login(DENGAGE_USER, PASSWORD)
            replies += [send(gw, message(f"m{session}-{i}"), client=client) for i in range(4)]
    assert [code for code, _ in replies] == [250] * 12
    sent = gw.calls("send", status=200)
    assert len(sent) == 12 and len(gw.calls("login")) == 1 and len(gw.calls("froms")) == 1
    ids = [r["upstream_id"] for r in sent]
    assert [queued_id(text) for _, text in replies] == ids  # the reply carries the transactional id
    assert all(UUID.match(i) for i in ids)
    assert all(r["body"]["tags"] == ["erp"] for r in sent)  # the login's tags


def test_token_is_renewed_before_it_expires(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(sandbox=sandbox_for_tests(dengage=dengage_sandbox(token_ttl=1.0)), dengage={})
    sent = 0
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
        client.login(DENGAGE_USER, PASSWORD)

        def renewed() -> bool:
            nonlocal sent
            code, text = send(gw, message(f"renewal {sent}"), client=client)
            assert code == 250, text
            sent += 1
            return len(gw.calls("login")) >= 3

        wait_for(renewed, 20, "two renewals of a one-second token")
    assert gw.calls("send", status=401) == [] and gw.calls("froms", status=401) == []
    assert len(gw.calls("send", status=200)) == sent


def test_token_expiring_earlier_than_announced_is_replaced_after_a_401(gateway_factory: Callable[..., Running]) -> None:
    # No expires_in in the login answer: the gateway assumes an hour, the sandbox's token lives one second.
    sandbox = sandbox_for_tests(dengage=dengage_sandbox(token_ttl=1.0, send_expires_in=False))
    gw = gateway_factory(sandbox=sandbox, dengage={})
    sent = 0
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
        client.login(DENGAGE_USER, PASSWORD)

        def relogged() -> bool:
            nonlocal sent
            code, text = send(gw, message(f"expiry {sent}"), client=client)
            assert code == 250, text
            sent += 1
            return len(gw.calls("login")) >= 2

        wait_for(relogged, 20, "a re-login after the token expired")
    assert len(gw.calls("send", status=401)) == 1  # one refused call, repeated once with the new token
    assert subjects(gw) == [f"expiry {i}" for i in range(sent)]  # every message sent, once, in order


def test_401_mid_run_logs_in_again_and_sends_once(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    assert send(gw, message("before"))[0] == 250
    gw.dengage_control(expire_tokens=True)  # dEngage forgets the token early
    code, text = send(gw, message("after"))
    assert code == 250, text
    assert [r["error"] for r in gw.calls("send", status=401)] == ["Not auhenticated. Please re-login."]
    assert len(gw.calls("login")) == 2
    assert subjects(gw) == ["before", "after"]


# -- rate limits ------------------------------------------------------------------------------------------


def test_burst_of_200_under_a_real_30_per_second_limit_gets_no_429(gateway_factory: Callable[..., Running]) -> None:
    # The sandbox enforces 30 requests/s per IP (sliding window); the account keeps its defaults
    # (rate_limit 25, rate_burst 2: at most 26 calls leave in any second; the sandbox saw 26-27 arrive in one).
    gw = gateway_factory(dengage={}, delivery={"inline_budget": 30.0})
    assert gw.sandbox.state is not None
    codes: list[int] = []
    lock = threading.Lock()

    def session(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", gw.port(), timeout=60) as client:
            client.login(DENGAGE_USER, PASSWORD)
            for i in range(20):
                code, _ = send(gw, message(f"burst {n}-{i}"), client=client)
                with lock:
                    codes.append(code)

    threads = [threading.Thread(target=session, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert codes == [250] * 200
    wait_for(lambda: len(gw.calls("send", status=200)) >= 200, 60, "200 sends accepted")
    assert [r for r in gw.sandbox.state.requests if r.get("status") == 429] == []
    assert sorted(subjects(gw)) == sorted(f"burst {n}-{i}" for n in range(10) for i in range(20))


def test_429_retry_after_is_honoured(gateway_factory: Callable[..., Running]) -> None:
    # 3 requests/s at the sandbox, a fast limiter at the gateway: 429s happen, and the queued calls
    # come back after Retry-After (1 s), not after the retry schedule (30 s).
    gw = gateway_factory(
        sandbox=sandbox_for_tests(dengage=dengage_sandbox(rate_limit=3)),
        dengage={"rate_limit": 100.0},
        delivery={**FAST, "retry_schedule": [30.0]},
    )
    rcpts = tuple(f"r{i}@example.com" for i in range(6))
    code, text = send(gw, message("six", to=rcpts), rcpts)
    assert code == 250, text
    wait_for(lambda: len(gw.calls("send", status=200)) == 6, 20, "every recipient delivered")
    limited = gw.calls("send", status=429)
    assert limited, "the sandbox's limit must have been hit"
    for refused in limited:
        later = [r for r in gw.calls("send", status=200) if r["to"] == refused["to"] and r["at"] > refused["at"]]
        assert later and later[0]["at"] - refused["at"] >= 0.9, "retried before Retry-After"
    assert sorted(r["to"] for r in gw.calls("send", status=200)) == sorted(rcpts)  # each exactly once
    wait_for(lambda: spool_rows(gw.settings.delivery.spool_path) == [] or None, what="queue empty")


# -- operator errors and refusals -------------------------------------------------------------------------


def _readyz(gw: Running) -> httpx.Response:
    assert gw.app.operator is not None
    return httpx.get(f"http://127.0.0.1:{gw.app.operator.port}/readyz", timeout=5)


def _refused_metric(gw: Running) -> float:
    assert gw.app.operator is not None
    text = httpx.get(f"http://127.0.0.1:{gw.app.operator.port}/metrics", timeout=5).text
    m = re.search(r'^smtp_gateway_upstream_auth_refused_total\{account="crm"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_ip_allowlist_403_queues_logs_once_and_is_degraded(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={}, delivery=FAST, http={"port": 0})
    assert send(gw, message("while allowed"))[0] == 250
    before = _refused_metric(gw)
    gw.dengage_control(refuse_all=True)
    with capture_logs() as logs:
        replies = [send(gw, message(f"refused {i}")) for i in range(3)]
        assert [code for code, _ in replies] == [250] * 3
        ids = [queued_id(text) for _, text in replies]
        assert all(len(i) == 16 for i in ids)  # local queue ids: spooled, not sent
        ready = wait_for(lambda: "degraded" in (r := _readyz(gw)).json() and r, 10, "readyz degraded")
        assert ready.status_code == 200  # the fleet shares the key: degraded, still ready (health.md)
        wait_for(
            lambda: all(r["attempts"] >= 2 for r in spool_rows(gw.settings.delivery.spool_path)),
            what="retries while refused",
        )
    refusals = [e for e in logs if e["event"] == "upstream_refused_credentials"]
    assert len(refusals) == 1 and refusals[0]["log_level"] == "error"
    assert "127.0.0.1" in refusals[0]["reason"] and "allowlist" in refusals[0]["reason"]
    assert "127.0.0.1" in json.dumps(ready.json())
    assert _refused_metric(gw) >= before + 3
    gw.dengage_control(refuse_all=False)
    wait_for(lambda: spool_rows(gw.settings.delivery.spool_path) == [] or None, 20, "backlog delivered")
    assert sorted(subjects(gw)) == ["refused 0", "refused 1", "refused 2", "while allowed"]
    assert _readyz(gw).status_code == 200


UNREAD_TOKEN = "eyJhbGciOi.SessionTokenSecret.42"


@contextmanager
def login_answering_with_an_unread_key() -> Iterator[int]:
    """A dEngage whose login answers 200 with the token under a name the gateway does not read (`jwt`):
    every request gets that answer. Yields its port."""
    body = json.dumps({"jwt": UNREAD_TOKEN, "expires": 3600}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    sock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                conn.recv(65536)
                conn.sendall(head % len(body) + body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        thread.join(10)


def test_a_login_answers_token_is_in_no_log_line_and_not_in_readyz(gateway_factory: Callable[..., Running]) -> None:
    """The token under a name the gateway does not read: the login's failure names the answer's keys, never
    its body, in the log (dengage_login_failed, upstream_refused_credentials, ...) and in /readyz, which
    needs no authentication."""
    with login_answering_with_an_unread_key() as port:
        gw = gateway_factory(dengage={"api_base": f"http://127.0.0.1:{port}/rest"}, http={"port": 0})
        with capture_logs() as logs:
            with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
                client.login(DENGAGE_USER, PASSWORD)
                assert client.mail(DENGAGE_SENDER)[0] == 451  # no token: the identities cannot be fetched
            # The refusal is shared by every instance: named under "degraded", the instance still ready (200).
            ready = wait_for(lambda: (r := _readyz(gw)).json().get("degraded") and r, 10, "readyz degraded")
    problems = json.dumps(ready.json())
    assert "keys: expires, jwt" in problems and UNREAD_TOKEN not in problems, problems
    assert [e for e in logs if "keys: expires, jwt" in repr(e)]
    assert not [e for e in logs if UNREAD_TOKEN in repr(e)], [e for e in logs if UNREAD_TOKEN in repr(e)]


def test_ip_allowlist_403_at_the_identities_lookup_is_a_refusal_too(gateway_factory: Callable[..., Running]) -> None:
    """Refused by the allowlist from the start: the identities were never fetched, so MAIL FROM gets 451 as
    before, and the refusal is what it is at the send endpoint: counted, logged once, /readyz degraded (200)."""
    sandbox = sandbox_for_tests(dengage=dengage_sandbox(refuse_all=True))
    gw = gateway_factory(dengage={}, delivery=FAST, http={"port": 0}, sandbox=sandbox)
    before = _refused_metric(gw)
    with capture_logs() as logs:
        replies = set()
        # A failed lookup is held for 2 s; MAIL FROMs after that ask dEngage again: three refusals.
        while len(gw.calls("login")) < 3:
            replies.add(send(gw, message("refused")))
        ready = _readyz(gw)
    assert replies == {(451, "4.7.0 Upstream rejected the gateway's credentials; try again later")}
    assert ready.status_code == 200
    [problem] = ready.json()["degraded"]
    assert problem.startswith("crm: upstream refuses the gateway's credentials") and "127.0.0.1" in problem
    assert _refused_metric(gw) >= before + 3
    refusals = [e for e in logs if e["event"] == "upstream_refused_credentials"]
    assert len(refusals) == 1 and refusals[0]["log_level"] == "error" and "127.0.0.1" in refusals[0]["reason"]
    gw.dengage_control(refuse_all=False)
    wait_for(lambda: send(gw, message("allowed again"))[0] == 250, 10, "the identities fetched")
    assert _readyz(gw).json() == {"ready": True}
    assert subjects(gw) == ["allowed again"]


def test_ip_allowlist_403_is_451_in_passthrough(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={}, delivery={"mode": "passthrough"})
    assert send(gw, message("warm"))[0] == 250
    gw.dengage_control(refuse_all=True)
    code, text = send(gw, message("refused"))
    assert (code, text[:5]) == (451, "4.7.0")
    assert "127.0.0.1" not in text  # the reason is for the operator's log, not the client


def test_code_not_zero_at_http_200_is_refused_inline_with_dengage_text(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    gw.fault(mode="err", reason="Content is not flagged as transactional", kind="send", provider="dengage")
    code, text = send(gw, message("refused"))
    assert (code, text) == (554, "5.6.0 Content is not flagged as transactional")
    [refused] = gw.calls("send")
    assert (refused["status"], refused["fault"]) == (200, "err")  # HTTP 200, {"code": 99, "message": ...}
    assert spool_rows(gw.settings.delivery.spool_path) == []


@pytest.mark.parametrize("style", ["pascal", "flag"])
def test_a_failure_spelled_in_another_letter_case_is_refused_not_sent(
    gateway_factory: Callable[..., Running], style: str
) -> None:
    # {"Code": 99, "Message": ...} (PascalCase) or {"code": 0, "data": {"hasError": true}} (camelCase) at HTTP
    # 200: a refusal with dEngage's text, never "250 queued" for a message dEngage did not take.
    gw = gateway_factory(dengage={})
    gw.dengage_control(fault_style=style)
    gw.fault(mode="err", reason="Content is not flagged as transactional", kind="send", provider="dengage")
    code, text = send(gw, message("refused"))
    assert (code, text) == (554, "5.6.0 Content is not flagged as transactional")
    assert spool_rows(gw.settings.delivery.spool_path) == []


@pytest.mark.parametrize(("style", "status"), [("bare", 200), ("html", 407), ("html", 400)])
def test_an_answer_that_says_nothing_or_a_proxy_page_is_temporary(
    gateway_factory: Callable[..., Running], style: str, status: int
) -> None:
    # {"message": ...} at 200 (neither a code nor an id) or a proxy's HTML 4xx: 451 in passthrough, never
    # 250 and never a 554 carrying the page.
    gw = gateway_factory(dengage={}, delivery={"mode": "passthrough"})
    gw.dengage_control(fault_style=style)
    gw.fault(status=status, reason="Proxy Authentication Required", kind="send", provider="dengage")
    code, text = send(gw, message("not taken"))
    assert code == 451, (code, text)
    assert "<html" not in text.lower() and "Proxy" not in text


def test_api_user_login_answered_by_an_empty_403_is_454_not_535(gateway_factory: Callable[..., Running]) -> None:
    # The allowlist's 403 "sometimes with an empty body" [C] comes before the credentials are checked.
    gw = gateway_factory(dengage={"api_user_logins": True})
    gw.dengage_control(fault_style="empty")
    gw.fault(status=403, kind="login", provider="dengage", count=None)  # smtplib tries each mechanism
    with (
        smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client,
        pytest.raises(smtplib.SMTPAuthenticationError) as info,
    ):
        client.login(DENGAGE_USERKEY, DENGAGE_API_PASSWORD)
    assert info.value.smtp_code == 454


def test_code_not_zero_in_a_retry_dead_letters_with_the_reason(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={}, delivery=FAST)
    gw.fault(status=503, kind="send", provider="dengage")
    gw.fault(mode="err", reason="Daily transactional quota exceeded", kind="send", provider="dengage")
    code, text = send(gw, message("later refused"))
    assert code == 250 and len(queued_id(text)) == 16
    [dead] = wait_for(lambda: spool_rows(gw.settings.delivery.spool_path, "dead"), what="dead letter")
    assert dead["id"] == queued_id(text)
    assert "Daily transactional quota exceeded" in dead["dead_reason"]
    assert "client@example.com" in dead["dead_reason"]


def test_one_recipient_failing_temporarily_is_retried_alone(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={}, delivery=FAST)
    gw.dengage_control(fail_to={"b@example.com": 1})
    rcpts = ("a@example.com", "b@example.com", "c@example.com")
    code, text = send(gw, message("three", to=rcpts), rcpts)
    assert code == 250, text
    wait_for(lambda: len(gw.calls("send", status=200)) == 3, what="b retried")
    calls = {to: [r["status"] for r in gw.calls("send") if r["to"] == to] for to in rcpts}
    assert calls == {"a@example.com": [200], "b@example.com": [503, 200], "c@example.com": [200]}
    a_id = next(r["upstream_id"] for r in gw.calls("send", status=200) if r["to"] == "a@example.com")
    assert queued_id(text) == a_id  # the first recipient's transactional id
    wait_for(lambda: spool_rows(gw.settings.delivery.spool_path) == [] or None, what="queue empty")


def test_from_outside_the_identities_is_refused_naming_them(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    permitted = "(permitted: crm.example, mail.crm.example)"
    code, text = send(gw, message("x"), mail_from="info@other.example")
    assert (code, text) == (
        553,
        f"5.7.1 <info@other.example>: Sender address rejected: domain other.example "
        f"is not a permitted sender domain {permitted}",
    )
    code, text = send(gw, message("x", sender="Other <info@sub.crm.example>"))
    assert (code, text) == (
        550,
        f"5.7.1 From: header domain sub.crm.example is not a permitted sender domain for this account {permitted}",
    )
    # Only the local part and the display name may differ from the identities.
    code, text = send(gw, message("ok", sender="Accounts Team <accounts@crm.example>"), mail_from="x@mail.crm.example")
    assert code == 250, text
    assert subjects(gw) == ["ok"]


def test_identities_unreachable_before_the_first_fetch_is_temporary(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    gw.fault(status=503, kind="froms", provider="dengage", count=None)
    code, text = send(gw, message("x"))
    assert code == 451 and text.startswith("4."), text
    gw.clear_faults()
    assert send(gw, message("x"))[0] in (250, 451)  # a refusal is held for a moment, then fetched again
    wait_for(lambda: send(gw, message("y"))[0] == 250, 10, "identities fetched")


# -- the message --------------------------------------------------------------------------------------


def test_attachment_arrives_base64_byte_identical(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    data = os.urandom(70_000)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = DENGAGE_SENDER, "client@example.com", "with attachment"
    msg.set_content("see attached")
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename="report.bin")
    code, text = send(gw, msg.as_bytes())
    assert code == 250, text
    [call] = gw.calls("send", status=200)
    [attachment] = call["body"]["attachments"]
    assert (attachment["name"], attachment["type"]) == ("report.bin", "application/octet-stream")
    assert base64.b64decode(attachment["content"]) == data


def test_bcc_and_cc_get_their_own_copy_and_stay_hidden(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    to, cc, bcc = "to@example.com", "cc@example.com", "hidden@example.com"
    with capture_logs() as logs:
        code, text = send(gw, message("private", to=(to,), cc=(cc,)), (to, cc, bcc))
    assert code == 250, text
    calls = gw.calls("send", status=200)
    assert sorted(r["to"] for r in calls) == sorted((to, cc, bcc))
    for call in calls:
        seen = {a for a in (to, cc, bcc) if a in json.dumps(call["body"])}
        assert seen == {call["to"]}, call["body"]  # nobody sees another recipient, nobody sees the Bcc
        assert set(call["body"]["send"]) == {"to"}
    [sent] = [e for e in logs if e["event"] == "message_sent"]
    assert sorted(sent["upstream_ids"]) == sorted(r["upstream_id"] for r in calls)


def test_option_headers_are_consumed_and_x_headers_forwarded(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={"tags": ["crm"], "forward_x_headers": ["x-order-*"]})
    extra = (
        "X-Gateway-Tags: invoices, erp\r\nX-Gateway-Template: 2206f32b-8d1a-4058-929c-de600493862a\r\n"
        "X-Order-Id: 42\r\nX-Originating-IP: [192.0.2.7]\r\n"
    )
    code, text = send(gw, message("templated", extra=extra))
    assert code == 250, text
    [call] = gw.calls("send", status=200)
    body = call["body"]
    assert body["tags"] == ["crm", "erp", "invoices"]
    assert body["content"]["templateId"] == "2206f32b-8d1a-4058-929c-de600493862a"
    assert body["xHeaders"] == {"X-Order-Id": "42"}
    assert "X-Gateway" not in json.dumps(body)
    code, text = send(gw, message("bad", extra="X-Gateway-Template: latest\r\n"))
    assert (code, text[:5]) == (554, "5.6.0") and "UUID" in text


def test_missing_subject_is_refused_before_any_call(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    raw = f"From: {DENGAGE_SENDER}\r\nTo: client@example.com\r\n\r\nno subject\r\n".encode()
    code, text = send(gw, raw)
    assert (code, text[:5]) == (554, "5.6.0") and "Subject cannot be empty" in text
    assert gw.calls("send") == []


# -- logins -------------------------------------------------------------------------------------------------


def test_api_user_credentials_as_smtp_login(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={"api_user_logins": True})
    with capture_logs() as logs:
        code, text = send(gw, message("as api user"), user=DENGAGE_USERKEY, password=DENGAGE_API_PASSWORD)
        assert code == 250, text
        with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client, pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(DENGAGE_USERKEY, "wrong-password")
    assert subjects(gw) == ["as api user"]
    logins = gw.calls("login")
    assert len(logins) == 3  # the verification of each pair, and the account's token
    assert all(r["body"] == {"userkey": "<redacted>", "password": "<redacted>"} for r in logins)
    text = json.dumps(logs, default=str)
    assert DENGAGE_USERKEY not in text and DENGAGE_API_PASSWORD not in text
    assert any(e["event"] == "auth_ok" and e["login"] == "crm:api-user" for e in logs)
    assert any(e["event"] == "auth_failed" and e["login"] == "crm:api-user" for e in logs)


def test_api_user_login_is_off_by_default(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client, pytest.raises(smtplib.SMTPAuthenticationError):
        client.login(DENGAGE_USERKEY, DENGAGE_API_PASSWORD)
    assert gw.calls("login") == []


def test_sandbox_records_hold_no_secret(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={})
    assert send(gw, message("secret check"))[0] == 250
    recorded = httpx.get(f"{gw.sandbox_url}/_sandbox/requests", timeout=5).text
    assert DENGAGE_API_PASSWORD not in recorded and DENGAGE_USERKEY not in recorded
    assert "sbx-" not in recorded  # no token
    any_login: Any = gw.calls("login")[0]
    assert "<redacted>" in json.dumps(any_login["response"])  # the token's place, in either answer shape


def test_queue_shows_each_recipient_with_its_id(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(dengage={}, delivery={**FAST, "retry_schedule": [600.0]})
    gw.dengage_control(fail_to={"b@example.com": 1})
    rcpts = ("a@example.com", "b@example.com")
    code, text = send(gw, message("queued half", to=rcpts), rcpts)
    assert code == 250, text
    [row] = spool_rows(gw.settings.delivery.spool_path, "queued")

    async def show() -> dict[str, Any] | None:
        store = SqliteQueue(gw.settings.delivery.spool_path)
        try:
            return await store.show(str(row["id"]))
        finally:
            await store.close()

    info = asyncio.run(show())
    assert info is not None
    calls = {c["key"]: (c["state"], c["upstream_id"]) for c in info["calls"]}
    a_id = gw.calls("send", status=200)[0]["upstream_id"]
    assert calls == {"a@example.com": ("done", a_id), "b@example.com": ("pending", None)}
    assert queued_id(text) == a_id
