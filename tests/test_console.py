"""The console over HTTP against the real gateway (aiohttp's client, as a browser would fill the forms): off unless
configured; sign-in, sessions and their cookie; CSRF on every POST; sign-in throttling and lifting a lockout;
the audit line of every action; bulk queue actions by the `queue` CLI's rules; the test send over a real
SMTP session; security headers; no page shows a secret."""

from __future__ import annotations

import asyncio
import html
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.console import queuepage, testsend
from gateway.console.sessions import Session, SessionKeys
from gateway.ledger.model import Record
from gateway.smtp.tls import write_self_signed
from tests.console_util import (
    ADMIN,
    ADMIN_HASH,
    ADMIN_PASSWORD,
    SESSION_SECRET,
    Client,
    base,
    console_gateway,
    console_settings,
    csrf,
)
from tests.harness import APIKEY, PASSWORD, PASSWORD_HASH, Running
from tests.ops_util import captured_with_context, sample
from tests.spool_helpers import send, wait_for

# Retries within the test's time: a dead letter is made by a 503 and then a refusal at the first retry.
FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 2.0}
PAGES = (
    "/console/",
    "/console/messages",
    "/console/queue",
    "/console/queue?state=dead",
    "/console/logins",
    "/console/suppressions",
    "/console/test-send",
    "/console/configuration",
)


# The console's Test send form, as an operator fills it in.
TEST_SEND = {
    "login": "acme/scanner",
    "listener": "starttls",
    "sender": "billing@acme.example",
    "recipient": "someone@example.net",
    "subject": "console test",
    "body": "hello",
}


def flushed(gw: Running) -> None:
    assert gw.app.ledger_writer is not None
    gw.loop.run(gw.app.ledger_writer.flush())


def record(gw: Running, ident: str) -> Record:
    assert gw.app.ledger is not None
    found = gw.loop.run(gw.app.ledger.get(ident))
    assert found is not None
    return found


def dead_letter(gw: Running, subject: str, to: tuple[str, ...] = ("client@example.com",)) -> str:
    """A message answered 250, then refused for good by the upstream at its retry: its local id."""
    gw.fault(status=503, count=1)
    gw.fault(mode="err", reason="invalid email", count=1)
    code, text = send(gw.port(), subject, to=to)
    assert code == 250
    local = text.rsplit(" ", 1)[1]

    def dead() -> bool:
        flushed(gw)
        assert gw.app.ledger is not None
        found = gw.loop.run(gw.app.ledger.get(local))
        return found is not None and found.state == "dead"

    wait_for(dead, what="the dead letter")
    return local


async def test_the_console_is_off_unless_configured(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(http={"port": 0})
    async with Client(base(gw)) as browser:
        status, _, text = await browser.get("/console/")
        assert status == 404 and "[console] enabled = true" in text and "hash-password" in text
        assert (await browser.get("/console/signin"))[0] == 404
        assert (await browser.get("/healthz"))[0] == 200


async def test_sign_in_gives_a_hardened_session_cookie(gateway_factory: Callable[..., Running]) -> None:
    gw = console_gateway(gateway_factory)
    async with Client(base(gw)) as browser:
        status, response, _ = await browser.get("/console/messages?sender=a%40b")
        assert (
            status == 303 and response.headers["Location"] == "/console/signin?next=/console/messages%3Fsender%3Da%40b"
        )
        status, response, page = await browser.get("/console/signin")
        assert status == 200 and 'name="password" type="password"' in page
        assert response.headers["Cache-Control"] == "no-store"
        with captured_with_context() as logs:
            status, _, page = await browser.signin(password="wrong")
        assert status == 401 and "Wrong name or password" in page
        assert [e["admin"] for e in logs if e["event"] == "console_signin_failed"] == [ADMIN]
        before = sample("smtp_gateway_console_logins_total", result="ok")
        status, response, _ = await browser.signin()
        assert status == 303 and response.headers["Location"] == "/console/"
        assert sample("smtp_gateway_console_logins_total", result="ok") == before + 1
        cookie = response.headers["Set-Cookie"]
        assert cookie.startswith("smtp-gateway-console=")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback
        for path in PAGES:
            status, response, page = await browser.get(path)
            assert status == 200, path
            headers = response.headers
            assert headers["Cache-Control"] == "no-store"
            assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "no-referrer"
            csp = headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
            # No inline script, style or event handler (the policy would block them).
            assert re.search(r"<script(?![^>]*\bsrc=)", page) is None and "<style" not in page
            assert re.search(r"\son[a-z]+=", page) is None and "style=" not in page
            assert re.search(r'(src|href|action)="(https?:)?//', page) is None  # nothing from elsewhere
        status, response, css = await browser.get("/console/static/console.css")
        assert status == 200 and response.content_type == "text/css" and "font-family" not in css.split("body", 1)[0]
        assert (await browser.get("/console/static/../../app.py"))[0] == 404


async def test_a_typed_password_in_the_name_field_is_not_logged(gateway_factory: Callable[..., Running]) -> None:
    gw = console_gateway(gateway_factory)
    async with Client(base(gw)) as browser:
        with captured_with_context() as logs:
            status, _, _ = await browser.signin(name=ADMIN_PASSWORD, password="x")
        assert status == 401
        [failed] = [e for e in logs if e["event"] == "console_signin_failed"]
        assert failed["admin_known"] is False and ADMIN_PASSWORD not in repr(logs)


async def test_every_form_needs_its_csrf_token(gateway_factory: Callable[..., Running]) -> None:
    gw = console_gateway(gateway_factory, delivery=FAST)
    local = dead_letter(gw, "kept dead")
    async with Client(base(gw)) as browser:
        await browser.signin()
        async with Client(base(gw)) as other:  # a valid token, of another session
            await other.signin()
            theirs = csrf((await other.get("/console/queue?state=dead"))[2])
        before = sample("smtp_gateway_console_csrf_refused_total")
        with captured_with_context() as logs:
            for token in (None, "forged", theirs):
                fields = [("action", "requeue"), ("id", local)] + ([("csrf", token)] if token else [])
                status, _, page = await browser.post("/console/queue/act", fields)
                assert status == 403 and "security token" in page
            status, _, _ = await browser.post("/console/signout", {})
            assert status == 403
        refused = [e for e in logs if e["event"] == "console_csrf_refused"]
        assert len(refused) == 4 and refused[0]["admin"] == ADMIN and refused[0]["path"] == "/console/queue/act"
        assert sample("smtp_gateway_console_csrf_refused_total") == before + 4
        assert record(gw, local).state == "dead"  # nothing was done
        # The sign-in form has its own token, bound to a cookie of its own.
        async with Client(base(gw)) as other:
            status, _, _ = await other.post("/console/signin", {"name": ADMIN, "password": ADMIN_PASSWORD})
            assert status == 403
            assert (await other.get("/console/"))[0] == 303


async def test_sign_in_failures_lock_the_address_out_until_an_admin_lifts_it(
    gateway_factory: Callable[..., Running],
) -> None:
    limits = {"auth_failures_per_ip": 2, "auth_lockout_failures": 3, "auth_delay_max": 0.0}
    gw = console_gateway(gateway_factory, limits=limits)
    async with Client(base(gw), address="127.0.0.2") as attacker, Client(base(gw)) as admin:
        for _ in range(2):
            assert (await attacker.signin(password="guess"))[0] == 401
        with captured_with_context() as refusals:
            assert (await attacker.signin(password="guess"))[0] == 429  # the third failure locks the address out
            status, response, page = await attacker.signin()  # the right password, refused unchecked
            for _ in range(5):
                assert (await attacker.signin(password="guess"))[0] == 429
        assert status == 429 and int(response.headers["Retry-After"]) > 800 and "Too many" in page
        # Refused unchecked, each costs no hash: one line a minute per address, the rest counted in `suppressed`.
        locked = [e for e in refusals if e["event"] == "console_signin_locked_out"]
        assert [(e["client"], e["suppressed"]) for e in locked] == [("127.0.0.2", 0)]
        assert (await admin.signin())[0] == 303  # another address is not affected
        status, _, page = await admin.get("/console/logins")
        assert "127.0.0.2" in page and "locked out" in page
        with captured_with_context() as logs:
            status, _, _ = await admin.form(
                "/console/logins", "/console/logins/lift", {"scope": "console", "client": "127.0.0.2"}
            )
        assert status == 303
        [audit] = [e for e in logs if e["event"] == "console_action"]
        assert audit["action"] == "lift_lockout" and audit["count"] == 1 and audit["lifted_client"] == "127.0.0.2"
        assert "127.0.0.2" not in (await admin.get("/console/logins"))[2]
        assert (await attacker.signin())[0] == 303


async def test_sign_in_guesses_sent_together_are_limited_like_ones_sent_in_turn(
    gateway_factory: Callable[..., Running],
) -> None:
    """Attempts being checked count toward the lockout with the failures (as SMTP AUTH's do): a batch of
    guesses sent at once (one sign-in form's token is enough for all) gets no more passwords checked than
    the same guesses sent one after another, and the right password after them is refused."""
    limits = {"auth_failures_per_ip": 1, "auth_lockout_failures": 3, "auth_delay_max": 1.0}
    gw = console_gateway(gateway_factory, limits=limits)
    async with Client(base(gw), address="127.0.0.3") as attacker:
        assert (await attacker.signin(password="guess-0"))[0] == 401  # from now on each attempt first waits 1 s
        _, response, form = await attacker.get("/console/signin")
        token, nonce = csrf(form), response.cookies["smtp-gateway-signin"].value

        async def guess(script: aiohttp.ClientSession, password: str) -> int:
            fields = {"name": ADMIN, "password": password, "csrf": token, "next": "/console/"}
            headers = {"Cookie": f"smtp-gateway-signin={nonce}"}
            async with script.post("/console/signin", data=fields, headers=headers, allow_redirects=False) as r:
                return r.status

        # The same form cookie for every guess (each answer sets a new one, which a script need not keep).
        jar = aiohttp.DummyCookieJar()
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.3", 0), limit=0)
        async with aiohttp.ClientSession(base(gw), cookie_jar=jar, connector=connector) as script:
            with captured_with_context() as logs:
                results = await asyncio.gather(*(guess(script, f"guess-{n}") for n in range(1, 25)))
            checked = [e for e in logs if e["event"] == "console_signin_failed"]
            # Two more failures reach the lockout of 3; every other guess was refused unchecked.
            assert len(checked) <= 2 and results.count(401) <= 2, sorted(results)
            assert results.count(429) >= 22, sorted(results)
            assert (await guess(script, ADMIN_PASSWORD)) == 429


async def test_smtp_lockouts_are_listed_with_the_logins_failures(gateway_factory: Callable[..., Running]) -> None:
    import base64
    import smtplib

    gw = console_gateway(gateway_factory, limits={"auth_failures_per_ip": 1, "auth_lockout_failures": 2})
    before = sample("smtp_gateway_login_auth_failures_total", account="acme", login="scanner")
    wrong = base64.b64encode(b"\0scanner\0not-the-password").decode()
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=10) as client:
        client.ehlo()
        assert client.docmd("AUTH", f"PLAIN {wrong}")[0] == 535
        assert client.docmd("AUTH", f"PLAIN {wrong}")[0] == 421  # locked out
    assert sample("smtp_gateway_login_auth_failures_total", account="acme", login="scanner") == before + 2
    async with Client(base(gw)) as admin:
        await admin.signin()
        _, _, page = await admin.get("/console/logins")
        row = next(r for r in page.split("<tr>") if ">scanner<" in r)
        assert f'class="num bad">{int(before) + 2}<' in row, row  # its AUTH failures
        assert "smtp</td><td>127.0.0.1</td>" in page and "locked out" in page
        await admin.form("/console/logins", "/console/logins/lift", {"scope": "smtp", "client": "127.0.0.1"})
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=10) as client:
        assert client.login("scanner", PASSWORD)[0] == 235


async def test_sessions_end_at_sign_out_idle_time_lifetime_and_a_new_password(
    gateway_factory: Callable[..., Running],
) -> None:
    gw = console_gateway(gateway_factory, console={"idle_timeout": 600, "session_lifetime": 3600})
    keys = SessionKeys(SESSION_SECRET.encode())
    fingerprint = keys.fingerprint(ADMIN_HASH)
    now = time.time()

    async def opens(session: Session) -> int:
        async with Client(base(gw)) as browser:
            browser.http.cookie_jar.update_cookies({"smtp-gateway-console": keys.seal(session)})
            return (await browser.get("/console/"))[0]

    assert await opens(Session(ADMIN, now - 10, now - 10, "s1", fingerprint)) == 200
    assert await opens(Session(ADMIN, now - 700, now - 601, "s2", fingerprint)) == 303  # idle
    assert await opens(Session(ADMIN, now - 3601, now - 1, "s3", fingerprint)) == 303  # lifetime
    assert await opens(Session(ADMIN, now, now, "s4", "another-password-hash")) == 303
    assert await opens(Session("mallory", now, now, "s5", fingerprint)) == 303  # no such admin
    forged = SessionKeys(b"not-the-key-of-this-gateway-0123456789")
    async with Client(base(gw)) as browser:
        browser.http.cookie_jar.update_cookies(
            {"smtp-gateway-console": forged.seal(Session(ADMIN, now, now, "s6", fingerprint))}
        )
        assert (await browser.get("/console/"))[0] == 303
    async with Client(base(gw)) as browser:
        await browser.signin()
        cookie = next(c.value for c in browser.http.cookie_jar if c.key == "smtp-gateway-console")
        with captured_with_context() as logs:
            status, response, _ = await browser.form("/console/", "/console/signout", {})
        assert status == 303 and response.headers["Location"] == "/console/signin"
        assert [e["action"] for e in logs if e["event"] == "console_action"] == ["sign_out"]
    async with Client(base(gw)) as replay:  # the cookie of a signed-out session
        replay.http.cookie_jar.update_cookies({"smtp-gateway-console": cookie})
        assert (await replay.get("/console/"))[0] == 303


async def test_a_session_in_use_is_sealed_again_before_a_short_idle_timeout(
    gateway_factory: Callable[..., Running],
) -> None:
    """The cookie's last-seen time was sealed again only every 30 s, whatever idle_timeout: with idle_timeout
    under 30 s a session in constant use ended idle_timeout after sign-in. Now at most every idle_timeout / 2."""
    gw = console_gateway(gateway_factory, console={"idle_timeout": 20})
    keys = SessionKeys(SESSION_SECRET.encode())
    now = time.time()
    for seen, resealed in ((now - 3, False), (now - 11, True)):  # last seen 3 s / 11 s ago, idle_timeout 20 s
        async with Client(base(gw)) as browser:
            sealed = keys.seal(Session(ADMIN, now - 15, seen, "s1", keys.fingerprint(ADMIN_HASH)))
            browser.http.cookie_jar.update_cookies({"smtp-gateway-console": sealed})
            status, response, _ = await browser.get("/console/")
        assert status == 200
        cookie = response.cookies.get("smtp-gateway-console")
        assert (cookie is not None) == resealed, f"last seen {now - seen:.0f} s ago"
        if cookie is not None:
            session = keys.open(cookie.value)
            assert session is not None and session.seen >= now and session.sid == "s1"


def hidden_fields(page: str) -> list[tuple[str, str]]:
    """What the page's (confirmation) form posts when its button is pressed: its hidden fields."""
    return [
        (name, html.unescape(value))
        for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)
    ]


async def test_requeue_of_many_dead_letters_is_confirmed_audited_and_recorded(
    gateway_factory: Callable[..., Running],
) -> None:
    gw = console_gateway(gateway_factory, delivery=FAST)
    ours = [dead_letter(gw, f"to acme {n}", to=(f"r{n}@acme-clients.example",)) for n in range(2)]
    other = dead_letter(gw, "elsewhere", to=("x@elsewhere.example",))
    async with Client(base(gw)) as admin:
        await admin.signin()
        page = "/console/queue?state=dead&domain=acme-clients.example"
        _, _, listed = await admin.get(page)
        assert all(i in listed for i in ours) and other not in listed
        fields = {"action": "requeue", "scope": "all", "state": "dead", "domain": "acme-clients.example"}
        status, _, confirm = await admin.form(page, "/console/queue/confirm", fields)
        assert status == 200 and "Requeue 2 messages?" in confirm and other not in confirm
        listed_ids = re.findall(r'<li><a href="/console/messages/([0-9A-F]{16})">', confirm)
        assert sorted(listed_ids) == sorted(ours)
        before = sample("smtp_gateway_console_actions_total", action="requeue")
        with captured_with_context() as logs:
            status, _, done = await admin.post("/console/queue/act", hidden_fields(confirm))
        assert status == 200 and "Requeue: 2 done" in done
        [audit] = [e for e in logs if e["event"] == "console_action"]
        assert audit["admin"] == ADMIN and audit["action"] == "requeue" and audit["count"] == 2
        assert audit["client"] == "127.0.0.1" and sorted(audit["ids"]) == sorted(ours)
        assert sample("smtp_gateway_console_actions_total", action="requeue") == before + 1
        assert sample("smtp_gateway_console_action_messages_total", action="requeue") >= 2
        # The same rule as `queue requeue`: a message no longer dead is skipped, not requeued twice.
        status, _, again = await admin.post(
            "/console/queue/act", [("csrf", csrf(confirm)), ("action", "requeue"), ("id", ours[0]), ("id", other)]
        )
        assert "1 done, 1 skipped" in again
    flushed(gw)
    events = record(gw, ours[0]).events
    requeued = [e for e in events if e.kind == "requeued"]
    assert requeued and requeued[0].actor == f"{ADMIN} (console)"


def queue_some(gw: Running, count: int) -> None:
    """`count` messages answered 250 and left queued (the upstream answers 503)."""
    gw.fault(status=503, count=100)
    for n in range(count):
        assert send(gw.port(), f"waiting {n}")[0] == 250


async def test_every_one_matching_posts_its_filters_and_asks_again_when_they_select_others(
    gateway_factory: Callable[..., Running],
) -> None:
    """The confirmation of "every one matching" carried one field per message: past about 1000 messages
    aiohttp answered its form 413 and nothing was done. It carries the filters and names the selection; the
    action resolves the filters again and goes on only if they select the messages confirmed."""
    gw = console_gateway(gateway_factory)
    queue_some(gw, 2)
    async with Client(base(gw)) as admin:
        await admin.signin()
        fields = {"action": "delete", "scope": "all", "state": "queue"}
        status, _, confirm = await admin.form("/console/queue", "/console/queue/confirm", fields)
        assert status == 200 and "Delete 2 messages?" in confirm
        form = hidden_fields(confirm)
        assert "id" not in dict(form) and dict(form)["scope"] == "all"
        assert send(gw.port(), "arrived meanwhile")[0] == 250
        with captured_with_context() as logs:
            status, _, again = await admin.post("/console/queue/act", form)
        assert status == 200 and "nothing was done" in again and "Delete 3 messages?" in again
        assert not [e for e in logs if e["event"] == "console_action"]
        status, _, done = await admin.post("/console/queue/act", hidden_fields(again))
        assert status == 200 and "Delete: 3 done" in done


async def test_every_one_matching_says_it_takes_the_oldest_an_action_reads_and_what_becomes_of_the_rest(
    gateway_factory: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One action reads the oldest 10,000 messages of its states (2 here): with more in the queue, the page said
    "every one matching" acts on all of them and the confirmation "every one of the queued messages" while it
    took the oldest 10,000 only. Both say which it takes, of how many, and what becomes of the rest."""
    monkeypatch.setattr(queuepage, "MAX_IDS", 2)
    gw = console_gateway(gateway_factory)
    queue_some(gw, 3)
    async with Client(base(gw)) as admin:
        await admin.signin()
        _, _, listed = await admin.get("/console/queue")
        text = html.unescape(listed)
        assert "acts on all of them" not in text and "only the oldest 2 of the 3 were read" in text
        assert "every one matching (queued messages, among the oldest 2)" in text
        fields = {"action": "retry", "scope": "all", "state": "queue"}
        _, _, confirm = await admin.form("/console/queue", "/console/queue/confirm", fields)
        assert "Retry now 2 messages?" in confirm and "every one" not in confirm
        assert (
            "the queued messages among the oldest 2 of the 3 queued and in-flight messages (one action reads at"
            " most 2; the rest are tried at their own next attempt)" in html.unescape(confirm)
        )
        fields = {"action": "delete", "scope": "all", "state": "queue"}
        _, _, confirm = await admin.form("/console/queue", "/console/queue/confirm", fields)
        assert "Delete 2 messages?" in confirm and "run it again for the rest" in html.unescape(confirm)
        status, _, done = await admin.post("/console/queue/act", hidden_fields(confirm))
        assert status == 200 and "Delete: 2 done" in done
        _, _, confirm = await admin.form("/console/queue", "/console/queue/confirm", fields)
        assert "Delete 1 message?" in confirm and "every one of the queued messages" in confirm
        _, _, listed = await admin.get("/console/queue")
        assert "were read" not in listed


async def test_tick_all_shown_fits_in_one_form_and_more_ticked_is_refused(
    gateway_factory: Callable[..., Running],
) -> None:
    """A listing shows at most 500, so "tick all shown" posts fewer fields than aiohttp takes in one form (a
    listing of 1000 made a form it answered 413); a crafted form ticking more is refused, not cut short."""
    gw = console_gateway(gateway_factory)
    ids = [f"{n:016X}" for n in range(500)]
    async with Client(base(gw)) as admin:
        await admin.signin()
        fields = [("action", "delete"), ("scope", "ticked"), ("state", "queue"), *(("id", i) for i in ids)]
        status, _, confirm = await admin.form("/console/queue", "/console/queue/confirm", fields)
        assert status == 200 and "Delete 500 messages?" in confirm
        status, _, done = await admin.post("/console/queue/act", hidden_fields(confirm))
        assert status == 200 and "500 skipped" in done
        fields.append(("id", "FFFFFFFFFFFFFFFF"))
        status, _, refused = await admin.form("/console/queue", "/console/queue/confirm", fields)
        assert status == 400 and "at most 500 ticked" in refused


async def test_the_find_box_keeps_the_other_filters_and_pages(gateway_factory: Callable[..., Running]) -> None:
    """The Find box ignored every other filter (still shown filled in) and listed the newest 50 with no next
    page and no word that more matched. What it names is now one more filter of a search that pages."""
    gw = console_gateway(gateway_factory)
    for n in range(51):
        assert send(gw.port(), f"find {n}", to=("findme@example.net",))[0] == 250
    assert send(gw.port(), "another", to=("other@example.net",))[0] == 250
    flushed(gw)
    row = re.compile(r'<td><a href="/console/messages/([0-9A-F]{16})">')
    async with Client(base(gw)) as admin:
        await admin.signin()
        _, _, page = await admin.get("/console/messages?q=findme%40example.net&since=2099-01-01T00:00")
        assert not row.findall(page), "listed, though none was accepted since 2099"
        _, _, page = await admin.get("/console/messages?q=findme%40example.net&state=bounced")
        assert not row.findall(page), "listed, though none bounced"
        _, _, page = await admin.get("/console/messages?q=findme%40example.net")
        first = row.findall(page)
        assert len(first) == 50 and "found by recipient" in page
        nxt = re.search(r'<a rel="next" href="([^"]+)"', page)
        assert nxt is not None, "51 matched, 50 shown, no next page"
        _, _, page = await admin.get(html.unescape(nxt[1]))
        second = row.findall(page)
        assert len(second) == 1 and second[0] not in first
        status, _, page = await admin.get("/console/messages?q=findme%40example.net&recipient=other%40example.net")
        assert status == 200 and "clear one of them" in page and not row.findall(page)


async def test_a_bookmarked_search_keeps_its_filters_through_the_sign_in(
    gateway_factory: Callable[..., Running],
) -> None:
    """`next=` carried the page asked for with its `&` unescaped: it kept the first filter only, and the admin
    landed on another search than the one bookmarked."""
    gw = console_gateway(gateway_factory)
    wanted = "/console/messages?sender=a%40b.example&state=bounced&reason=r%26d"
    async with Client(base(gw)) as browser:
        status, response, _ = await browser.get(wanted)
        assert status == 303
        status, _, form = await browser.get(response.headers["Location"])
        nxt = re.search(r'name="next" value="([^"]*)"', form)
        assert status == 200 and nxt is not None
        fields = {"name": ADMIN, "password": ADMIN_PASSWORD, "csrf": csrf(form), "next": html.unescape(nxt[1])}
        status, response, _ = await browser.post("/console/signin", fields)
    landed = urllib.parse.urlsplit(response.headers["Location"])
    assert status == 303 and landed.path == "/console/messages"
    assert urllib.parse.parse_qs(landed.query) == {"sender": ["a@b.example"], "state": ["bounced"], "reason": ["r&d"]}


async def test_a_sign_in_next_with_a_control_character_goes_to_the_console_home(
    gateway_factory: Callable[..., Running],
) -> None:
    """A `next=` with CR/LF/NUL went into the 303's Location; aiohttp refused to send it after the console's
    handler returned: the connection dropped with no answer and no session cookie, and aiohttp logged a traceback."""
    gw = console_gateway(gateway_factory)
    for target in ("/console/\r\nX-Injected: 1", "/console/\x00", "/console/\x1b[0m", "/console/\x7f"):
        async with Client(base(gw)) as browser:
            _, _, form = await browser.get("/console/signin")
            fields = {"name": ADMIN, "password": ADMIN_PASSWORD, "csrf": csrf(form), "next": target}
            status, response, _ = await browser.post("/console/signin", fields)
            assert status == 303 and response.headers["Location"] == "/console/", repr(target)
            assert "X-Injected" not in response.headers
            # Signed in, a link to the sign-in page with such a next= is the same.
            status, response, _ = await browser.get("/console/signin?" + urllib.parse.urlencode({"next": target}))
            assert status == 303 and response.headers["Location"] == "/console/", repr(target)


async def test_a_time_filter_that_is_no_time_is_shown_as_an_error(gateway_factory: Callable[..., Running]) -> None:
    """`until=nan` was read as a time (float() takes it): the page said "no messages" with no error, where
    `until=yesterday` says what is wrong."""
    gw = console_gateway(gateway_factory)
    async with Client(base(gw)) as admin:
        await admin.signin()
        for query in ("until=nan", "since=NaN", "since=inf", "until=-1e400", "since=yesterday"):
            status, _, page = await admin.get(f"/console/messages?{query}")
            name = query.split("=")[0]
            assert status == 200 and 'class="problem"' in page and f"{name}: " in page, query


async def test_a_queue_listing_cut_at_its_limit_says_more_match(gateway_factory: Callable[..., Running]) -> None:
    """The listing showed the oldest `limit` and said "N shown." whatever more matched."""
    gw = console_gateway(gateway_factory)
    queue_some(gw, 3)
    async with Client(base(gw)) as admin:
        await admin.signin()
        _, _, page = await admin.get("/console/queue?limit=2")
        assert len(re.findall(r'name="id" value="[0-9A-F]{16}"', page)) == 2
        assert "2 shown, the oldest: more match" in page and 'href="/console/queue?state=queue&amp;limit=500"' in page
        _, _, page = await admin.get("/console/queue?limit=500")
        assert len(re.findall(r'name="id" value="[0-9A-F]{16}"', page)) == 3 and "more match" not in page


async def test_test_send_goes_through_a_real_smtp_session_and_opens_the_message(
    gateway_factory: Callable[..., Running],
) -> None:
    gw = console_gateway(gateway_factory)
    async with Client(base(gw)) as admin:
        await admin.signin()
        _, _, form = await admin.get("/console/test-send")
        assert 'value="acme/scanner"' in form
        fields = dict(TEST_SEND)
        with captured_with_context() as logs:
            status, _, page = await admin.form("/console/test-send", "/console/test-send", fields)
        assert status == 200 and "Accepted" in page and "STARTTLS" in page and "235 " in page
        link = re.search(r'href="/console/messages/([^"]+)"', page)
        assert link is not None
        [audit] = [e for e in logs if e["event"] == "console_action"]
        assert audit["action"] == "test_send" and audit["login"] == "scanner" and audit["reply"].startswith("250 ")
        ok = [e for e in logs if e["event"] == "auth_ok"]
        assert ok and ok[0]["credential"] == "console-test"
        status, _, message = await admin.get(f"/console/messages/{link[1]}")
        assert status == 200 and "console test" in message and "someone@example.net" in message
        assert gw.sent and gw.sent[-1]["body"]["asunto"] == "console test"  # DMDS' word for the subject
        # The one-time password works once: replayed over SMTP it is refused.
        fields["login"] = "acme/nobody"
        status, _, page = await admin.form("/console/test-send", "/console/test-send", fields)
        assert status == 400 and "configured logins" in page


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("sender", "billing@acme.example\r\nRCPT TO:<x@evil.example>", "The sender must be one address"),
        ("recipient", "someone@example.net\nBcc: x@evil.example", "The recipient must be one address"),
        ("recipient", "someone", "The recipient must be one address"),
        ("sender", "Billing <billing@acme.example>", "The sender must be one address"),
        ("subject", "one\r\nBcc: x@evil.example", "The subject must be one line"),
        # Line separators other than CR/LF (pasted from documents, terminals): the email package splits a header
        # value at whatever str.splitlines() splits at, and raised ValueError in compose: a 500 (review console3 F2).
        ("subject", "quarterly\u2028report", "The subject must be one line"),
        ("subject", "quarterly\u2029report", "The subject must be one line"),
        ("subject", "quarterly\x0breport", "The subject must be one line"),
        ("subject", "quarterly\x0creport", "The subject must be one line"),
        ("subject", "quarterly\x85report", "The subject must be one line"),
        ("subject", "quarterly\x1creport", "The subject must be one line"),
        # smtplib raised UnicodeEncodeError at MAIL or RCPT: a 500 with none of the console's headers.
        ("recipient", "jürgen@example.net", "The recipient must be an ASCII address"),
        ("recipient", "user@exämple.net", "The recipient must be an ASCII address"),
        ("sender", "bïlling@acme.example", "The sender must be an ASCII address"),
    ],
)
async def test_test_send_fields_that_make_no_message_are_a_form_error(
    gateway_factory: Callable[..., Running], field: str, value: str, words: str
) -> None:
    """A line break in a field made smtplib or the email package raise ValueError: a 500. Now a form error,
    and no SMTP session is opened."""
    gw = console_gateway(gateway_factory)
    fields = {**TEST_SEND, field: value}
    async with Client(base(gw)) as admin:
        await admin.signin()
        with captured_with_context() as logs:
            status, response, page = await admin.form("/console/test-send", "/console/test-send", fields)
    assert status == 400 and words in page and "Content-Security-Policy" in response.headers
    assert not [e for e in logs if e["event"] == "console_action"] and not gw.sent


async def test_a_test_send_as_a_login_whose_every_password_has_expired_is_a_form_error(
    gateway_factory: Callable[..., Running],
) -> None:
    """The one-time password logged such a login in and the page said "Accepted", where a device logging in as
    it gets 535 (expired password): now the form says why, and no session is opened (review console3 L2)."""
    retired = {
        "username": "retired",
        "passwords": [{"hash": PASSWORD_HASH, "expires": "2020-01-31", "label": "old"}],
        "campaign": 22,
    }
    gw = console_gateway(gateway_factory, extra_users=[retired])
    async with Client(base(gw)) as admin:
        await admin.signin()
        with captured_with_context() as logs:
            status, _, page = await admin.form(
                "/console/test-send", "/console/test-send", {**TEST_SEND, "login": "acme/retired"}
            )
    assert status == 400 and "Every password of acme/retired has expired (old)" in html.unescape(page)
    assert not [e for e in logs if e["event"] == "console_action"] and not gw.sent


def test_every_character_that_breaks_a_header_line_is_refused_in_the_subject() -> None:
    """Every character str.splitlines() splits at (the email package's test for a header value) is the form's
    refusal, never compose's ValueError; what the form lets through composes (review console3 F2)."""
    breaks = [chr(c) for c in range(0x110000) if len(f"a{chr(c)}b".splitlines()) > 1]
    assert {"\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028"} <= set(breaks)
    for char in breaks:
        assert testsend.form_error("a@acme.example", "b@example.net", f"quarterly{char}report") is not None, repr(char)
    for char in [chr(c) for c in range(0x3000)] + ["\ud800", "\udfff"]:
        for subject, body in ((f"x{char}y", "body"), ("subject", f"x{char}y")):
            if testsend.form_error("a@acme.example", "b@example.net", subject, body) is None:
                testsend.compose("a@acme.example", "b@example.net", subject, body, "admin", "gw.example")


async def test_an_unexpected_error_in_a_page_is_the_consoles_error_page_logged_once(
    gateway_factory: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a handler was aiohttp's plain-text 500 without the console's headers, its traceback only in
    aiohttp's own log and counted nowhere."""
    from gateway.console import configpage

    def broken(gw: Any) -> dict[str, Any]:
        raise RuntimeError("a bug in the configuration page")

    gw = console_gateway(gateway_factory)
    async with Client(base(gw)) as admin:
        await admin.signin()
        monkeypatch.setattr(configpage, "page", broken)
        before = sample("smtp_gateway_console_errors_total")
        with captured_with_context() as logs:
            status, response, page = await admin.get("/console/configuration")
    assert status == 500 and "console_error" in page and "RuntimeError" not in page
    assert "Content-Security-Policy" in response.headers and response.headers["Cache-Control"] == "no-store"
    assert "Sign out" in page  # the console's own page, the admin still signed in
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert error["event"] == "console_error" and error["path"] == "/console/configuration" and error["exc_info"]
    assert sample("smtp_gateway_console_errors_total") == before + 1


MALFORMED_BODIES = [
    ("multipart/form-data; boundary=x", b"garbage"),
    ("multipart/form-data", b"--x\r\n"),  # no boundary
    ("application/x-www-form-urlencoded; charset=bogus", b"name=a&password=b"),
    ("application/x-www-form-urlencoded; charset=utf-16", b"name=a&password=b"),
    ("application/x-www-form-urlencoded", "name=\u00e4&password=b".encode("latin-1")),  # a raw byte, not UTF-8
]


async def test_a_malformed_form_body_is_a_bad_request_not_a_counted_bug(
    gateway_factory: Callable[..., Running],
) -> None:
    """aiohttp's request.post() raises on a body that is no readable form; nothing caught it, so anyone (the
    sign-in needs no session) got the 500 page, an error-level console_error with its traceback and +1 on the
    bug counter per request, before the sign-in throttle was consulted."""
    limits = {"auth_failures_per_ip": 1, "auth_lockout_failures": 1, "auth_delay_max": 0.0}
    gw = console_gateway(gateway_factory, limits=limits)
    before = sample("smtp_gateway_console_errors_total")
    async with Client(base(gw)) as admin, Client(base(gw), address="127.0.0.2") as anyone:
        await admin.signin()
        for ctype, body in MALFORMED_BODIES:
            for client, path in ((anyone, "/console/signin"), (admin, "/console/logins/lift")):
                with captured_with_context() as logs:
                    status, response, page = await client.post(path, body, headers={"Content-Type": ctype})
                errors = [e["event"] for e in logs if e["log_level"] == "error"]
                assert status == 400 and not errors, f"{path} {ctype}: {status}, logged {errors}"
                assert "could not be read" in page and response.headers["Cache-Control"] == "no-store"
                assert "Content-Security-Policy" in response.headers
                assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["console_bad_form"]
        assert sample("smtp_gateway_console_errors_total") == before
        # A locked-out address is refused before its body is read.
        assert (await anyone.signin(password="guess"))[0] == 429
        ctype, body = MALFORMED_BODIES[0]
        status, _, _ = await anyone.post("/console/signin", body, headers={"Content-Type": ctype})
        assert status == 429


async def test_a_cookie_that_is_not_ascii_is_signed_out_not_a_500(gateway_factory: Callable[..., Running]) -> None:
    """Sent raw: a client library would not send these bytes in a cookie."""
    gw = console_gateway(gateway_factory)
    assert gw.app.operator is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.operator.port)
    try:
        writer.write(
            b"GET /console/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Cookie: smtp-gateway-console=a.\xc3\xa9\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0].decode()
    # Signed out: sent to the sign-in page, as without a cookie.
    assert head.startswith("HTTP/1.1 302 ") or head.startswith("HTTP/1.1 303 "), head
    assert "/console/signin" in head, head


async def test_no_page_shows_a_secret(gateway_factory: Callable[..., Running], tmp_path: Any) -> None:
    from tests.configs import hash_for_tests

    api_hash = hash_for_tests("api-token-of-the-test")
    gw = console_gateway(
        gateway_factory,
        http={"api_tokens": [{"name": "ci", "token_hash": api_hash}]},
        console={"admins": [{"name": ADMIN, "password_hash": ADMIN_HASH}]},
        delivery=FAST,
    )
    local = dead_letter(gw, "secret check")
    code, _ = send(gw.port(), "delivered one")
    assert code == 250
    flushed(gw)
    secrets = [
        APIKEY,
        PASSWORD,
        PASSWORD_HASH,
        ADMIN_PASSWORD,
        ADMIN_HASH,
        SESSION_SECRET,
        api_hash,
        "campaign-22-apikey",
    ]
    secrets += [s.split("$")[-1] for s in (PASSWORD_HASH, ADMIN_HASH, api_hash)]  # not even the digest alone
    async with Client(base(gw)) as admin:
        await admin.signin()
        pages = [*PAGES, f"/console/messages/{local}", "/console/messages?state=sent", "/console/signin"]
        for path in pages:
            status, _, page = await admin.get(path)
            assert status in (200, 303), path
            for secret in secrets:
                assert secret not in page, (path, secret[:6])
        _, _, config = await admin.get("/console/configuration")
        assert "**********" in config and "session_secret" in config


async def test_over_tls_the_cookie_is_secure_and_host_only(
    gateway_factory: Callable[..., Running], tmp_path: Any
) -> None:
    cert, key = write_self_signed(tmp_path / "http-tls")
    gw = console_gateway(gateway_factory, http={"tls_cert_file": str(cert), "tls_key_file": str(key)})
    async with Client(base(gw, "https")) as browser:
        _, response, _ = await browser.get("/console/signin")
        assert response.headers["Set-Cookie"].startswith("__Host-smtp-gateway-signin=")
        status, response, _ = await browser.signin()
        assert status == 303
        cookie = response.headers["Set-Cookie"]
        assert cookie.startswith("__Host-smtp-gateway-console=") and "Secure" in cookie and "Path=/" in cookie
        assert (await browser.get("/console/"))[0] == 200


def test_the_console_off_loopback_needs_tls() -> None:
    from gateway.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="in clear"):
        load_settings(None, http={"address": "0.0.0.0", "port": 8080}, console=console_settings())
    with pytest.raises(ConfigError, match=r"http\.port"):
        load_settings(None, console=console_settings())
    with pytest.raises(ConfigError, match="at least one"):
        load_settings(None, http={"port": 8080}, console={"enabled": True})
    settings = load_settings(
        None, http={"address": "0.0.0.0", "port": 8080}, console=console_settings(allow_without_tls=True)
    )
    assert settings.console.enabled


async def test_a_reload_ends_the_sessions_of_a_changed_password(gateway_factory: Callable[..., Running]) -> None:
    from gateway.config import load_settings
    from tests.configs import gateway_config, hash_for_tests

    gw = console_gateway(gateway_factory)
    async with Client(base(gw)) as browser:
        await browser.signin()
        assert (await browser.get("/console/configuration"))[0] == 200
        new_hash = hash_for_tests("a-new-password")
        config = gateway_config(
            gw.tmp,
            gw.sandbox.port,
            http={"port": gw.app.operator.port if gw.app.operator else 0},
            console=console_settings(admins=[{"name": ADMIN, "password_hash": new_hash}]),
        )
        gw.app.source = lambda: load_settings(None, **config)
        assert gw.loop.run(gw.app.reload())
        assert (await browser.get("/console/configuration"))[0] == 303
        assert (await browser.signin(password="a-new-password"))[0] == 303
        _, _, page = await browser.get("/console/configuration")
        assert "last reload" in page and ": ok" in page


def test_the_quick_start_prints_a_console_to_sign_in_to(tmp_path: Any) -> None:
    import asyncio
    import signal
    import subprocess

    from tests.test_first_contact import CLI, Lines, _env

    args = ["quickstart", "--port", "0", "--tls-port", "0", "--sandbox-port", "0", "--http-port", "0"]
    proc = subprocess.Popen(
        [*CLI, *args], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    err = Lines(proc.stderr)

    async def sign_in(url: str, name: str, password: str) -> None:
        async with Client(url) as browser:
            assert (await browser.signin(name, password))[0] == 303
            status, _, page = await browser.get("/console/")
            assert status == 200 and "sandbox" in page  # the quick start's DMDS account

    try:
        line = err.wait_for(r"The console in a browser")
        found = re.search(r"(http://127\.0\.0\.1:\d+)/console/\s+sign in as (\S+) / (\S+)$", line.strip())
        assert found is not None, line
        asyncio.run(sign_in(*found.groups()))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        err.close()
        assert proc.stdout is not None
        proc.stdout.close()


def test_the_documented_configuration_loads(tmp_path: Any) -> None:
    import tomllib

    from gateway.config import load_settings
    from tests.docs_blocks import doc_blocks

    [block] = doc_blocks("test_the_documented_configuration_loads")
    key = tmp_path / "console.key"
    key.write_text(SESSION_SECRET + "\n")
    text = block.text.replace("scrypt$16384$8$1$...", ADMIN_HASH).replace("/etc/smtp-gateway/console.key", str(key))
    settings = load_settings(None, **tomllib.loads(text))
    console = settings.console
    assert console.enabled and [a.name for a in console.admins] == [ADMIN]
    assert console.session_secret is not None and console.session_secret.get_secret_value() == SESSION_SECRET
    assert settings.http.port == 8080 and (console.idle_timeout, console.session_lifetime) == (1800, 43200)


def test_the_queue_cli_selects_and_acts_on_several_like_the_console(gateway_factory: Callable[..., Running]) -> None:
    """`queue dead` with filters and `queue requeue ID...` run the code the console's Queue page runs."""
    import json
    import subprocess

    from tests.test_first_contact import CLI, _env

    gw = console_gateway(gateway_factory, delivery=FAST)
    ours = [dead_letter(gw, f"to acme {n}", to=(f"r{n}@sub.acme-clients.example",)) for n in range(2)]
    other = dead_letter(gw, "elsewhere", to=("x@elsewhere.example",))
    spool = str(gw.settings.delivery.spool_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "queue", "--spool", spool, *args], capture_output=True, text=True, timeout=60, env=_env()
        )

    listed = cli("dead", "--domain", "acme-clients.example", "--login", "scanner", "--reason", "INVALID", "--json")
    rows = json.loads(listed.stdout)["messages"]
    assert sorted(r["id"] for r in rows) == sorted(ours) and rows[0]["login"] == "scanner"
    assert rows[0]["recipients"][0].endswith("@sub.acme-clients.example")
    assert json.loads(cli("dead", "--account", "nope", "--json").stdout)["messages"] == []
    assert json.loads(cli("dead", "--older-than", "1d", "--json").stdout)["messages"] == []
    text = cli("dead", "--domain", "elsewhere.example").stdout
    assert "matching dead letters, domain elsewhere.example: 1\n" in text and other in text
    # --limit cuts the list: the count line says so (one of two shown), as the console's page does.
    cut = cli("dead", "--domain", "acme-clients.example", "--limit", "1")
    assert "matching dead letters, domain acme-clients.example: 1 shown, the oldest: more match" in cut.stdout
    assert json.loads(cli("dead", "--domain", "acme-clients.example", "--limit", "1", "--json").stdout)["more"]
    whole = json.loads(cli("dead", "--domain", "acme-clients.example", "--limit", "2", "--json").stdout)
    assert (len(whole["messages"]), whole["more"], whole["truncated"]) == (2, False, False)
    bad = cli("dead", "--older-than", "soon")
    # An invalid value is a usage error (exit 2), as `--limit abc` is (docs/reference/exit-statuses.md).
    assert bad.returncode == 2 and "argument --older-than: age:" in bad.stderr
    acted = cli("requeue", *ours, "FFFFFFFFFFFFFFFF")
    assert acted.returncode == 1
    assert acted.stdout.splitlines() == [
        f"{ours[0]}: requeued",
        f"{ours[1]}: requeued",
        "FFFFFFFFFFFFFFFF: not a dead letter",
    ]
