"""The console as a person uses it: headless Chromium (Debian's `chromium`) driven by Playwright signs in, finds
a message sent by swaks, opens its page, requeues a dead letter, sends a test message and is refused a form
without its CSRF token; a screenshot of each page goes under the test's tmp dir (and, with
CONSOLE_SCREENSHOTS=DIR, the message page's to DIR: docs/console-message.png is made so).

Under CI=true a missing chromium, Playwright or swaks fails the test; elsewhere it skips saying what is
missing. Never `playwright install`: the browser is the system's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.smtp.tls import write_self_signed
from tests.console_util import ADMIN, ADMIN_PASSWORD, base, console_gateway
from tests.harness import PASSWORD, USER, Running
from tests.spool_helpers import wait_for
from tests.test_console import FAST, dead_letter, flushed

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI installs it: see .ci/run)")
    pytest.skip(what)


def chromium_context(**options: Any) -> Iterator[Any]:
    """A browser context of Debian's chromium (skips or fails as `missing` says when it or Playwright is not there)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright for Python is not installed (./install.sh --test)")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"no {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(**options)
        try:
            yield context
        finally:
            context.close()
            browser.close()


@pytest.fixture
def page() -> Iterator[Any]:
    for context in chromium_context(viewport={"width": 1280, "height": 900}):
        yield context.new_page()


@pytest.fixture
def tls_context() -> Iterator[Any]:
    """For the console over HTTPS (a self-signed certificate): the `__Host-` cookies' rules apply there."""
    yield from chromium_context(ignore_https_errors=True)


def shot(page: Any, tmp: Path, name: str) -> Path:
    path = tmp / "screenshots" / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    return path


def swaks(gw: Running, subject: str, to: str) -> str:
    if shutil.which("swaks") is None:
        missing("swaks is not installed (apt-get install swaks)")
    out = subprocess.run(
        [
            "swaks", "--server", "127.0.0.1", "--port", str(gw.port()), "--auth", "PLAIN",
            "--auth-user", USER, "--auth-password", PASSWORD, "--from", "billing@acme.example", "--to", to,
            "--header", f"Subject: {subject}", "--body", "Scanned document attached.",
        ],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    [reply] = [line for line in out.splitlines() if "250 2.0.0 Ok: queued as" in line]
    return reply.rsplit(" ", 1)[1]


def test_an_operator_uses_the_console(page: Any, gateway_factory: Callable[..., Running], tmp_path: Path) -> None:
    gw = console_gateway(gateway_factory, delivery=FAST)
    url = base(gw)
    dead = dead_letter(gw, "Invoice 4711", to=("bounces@acme-clients.example",))
    reply_id = swaks(gw, "Scan from the 3rd floor", "ops@example.net")
    flushed(gw)

    # Signing in: the console sends a visitor to its sign-in page, and back to the page asked for, every
    # filter of it (a bookmarked search).
    asked = "/console/messages?sender=billing%40acme.example&state=sent"
    page.goto(f"{url}{asked}")
    assert page.url.startswith(f"{url}/console/signin")
    shot(page, tmp_path, "signin")
    page.fill("input[name=name]", ADMIN)
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    assert page.url == f"{url}{asked}"
    page.goto(f"{url}/console/")
    assert page.locator("h1").inner_text() == "Overview"
    shot(page, tmp_path, "overview")

    # The swaks message, found by the id its 250 named, and its page.
    page.goto(f"{url}/console/messages")
    page.fill("input[name=q]", reply_id)
    page.click("form.filters button[type=submit]")
    row = page.locator("table.records tbody tr", has_text="Scan from the 3rd floor")
    assert row.count() == 1
    shot(page, tmp_path, "messages")
    row.locator("a").first.click()
    assert page.locator("h1").inner_text().startswith(f"Message {reply_id}")
    timeline = page.locator("table.timeline").inner_text()
    assert "accepted (250)" in timeline and "upstream call" in timeline and "delivered" in timeline
    request = page.locator("pre.request").inner_text()
    assert "ops@example.net" in request and re.search(r'"html": "\(\d+ bytes, not kept\)"', request), request
    message_png = shot(page, tmp_path, "message")
    if os.environ.get("CONSOLE_SCREENSHOTS"):
        page.set_viewport_size({"width": 1100, "height": 700})
        page.screenshot(path=str(Path(os.environ["CONSOLE_SCREENSHOTS"]) / "console-message.png"))
    assert message_png.exists()

    # The dead letter, requeued from the queue page after a confirmation naming the count.
    page.goto(f"{url}/console/queue?state=dead")
    shot(page, tmp_path, "dead-letters")
    page.check(f"input[name=id][value='{dead}']")
    page.click("button[name=action][value=requeue]")
    assert page.locator("h1").inner_text() == "Requeue 1 message?"
    shot(page, tmp_path, "confirm")
    gw.fault(mode="err", reason="still invalid", count=1)  # its retry will be refused again, recorded
    page.click("form[action='/console/queue/act'] button[type=submit]")
    assert page.locator("h1").inner_text() == "Requeue: 1 done"
    flushed(gw)
    page.goto(f"{url}/console/messages/{dead}")
    assert "requeued (operator)" in page.locator("table.timeline").inner_text()
    assert f"{ADMIN} (console)" in page.locator("table.timeline").inner_text()

    # A test message through the real pipeline, then its page.
    page.goto(f"{url}/console/test-send")
    page.select_option("select[name=login]", "acme/scanner")
    page.fill("input[name=recipient]", "frontdesk@example.net")
    # A long unbroken subject (legal: it is folded as encoded-words) wraps instead of widening the page.
    page.fill("input[name=subject]", "Console test " + "x" * 3000)
    page.click("form.stacked button[type=submit]")
    assert page.locator("h2#outcome").inner_text().startswith("Accepted")
    shot(page, tmp_path, "test-send")
    page.click("a.button")
    assert "Console test xxx" in page.locator("dl.facts").inner_text()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "the page is wider"
    page.goto(f"{url}/console/messages")
    assert page.locator("table.records", has_text="Console test xxx").count() == 1
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "the list is wider"

    for path, name in (
        ("/console/queue", "queue"),
        ("/console/logins", "logins"),
        ("/console/suppressions", "suppressions"),
        ("/console/configuration", "configuration"),
    ):
        page.goto(f"{url}{path}")
        shot(page, tmp_path, name)
    assert "**********" in page.locator("pre.config").inner_text()

    # A form without its CSRF token (as a forged cross-site form would be): refused with 403.
    page.goto(f"{url}/console/queue?state=dead")
    page.evaluate("document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())")
    with page.expect_response(re.compile(r".*/console/queue/confirm$")) as answer:
        page.click("button[name=action][value=delete]")
    assert answer.value.status == 403
    assert "security token" in page.locator("p.problem").inner_text()
    shot(page, tmp_path, "csrf-refused")

    # Signing out ends the session.
    page.goto(f"{url}/console/")
    page.click("form.signout button")
    page.goto(f"{url}/console/")
    assert page.url.startswith(f"{url}/console/signin")
    assert sorted(p.name for p in (tmp_path / "screenshots").iterdir()) == sorted(
        f"{n}.png"
        for n in (
            "signin", "overview", "messages", "message", "dead-letters", "confirm", "test-send", "queue",
            "logins", "suppressions", "configuration", "csrf-refused",
        )
    )  # fmt: skip
    wait_for(lambda: gw.sent, what="the test message delivered")


def _tls_console(gateway_factory: Callable[..., Running], tmp_path: Path, **overrides: Any) -> Running:
    cert, key = write_self_signed(tmp_path / "http-tls")
    return console_gateway(gateway_factory, http={"tls_cert_file": str(cert), "tls_key_file": str(key)}, **overrides)


def _sign_in(page: Any, url: str) -> None:
    page.goto(f"{url}/console/signin")
    page.fill("input[name=name]", ADMIN)
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    assert page.locator("h1").inner_text() == "Overview"


def test_sign_out_over_tls_removes_the_cookies_from_the_browser(
    tls_context: Any, gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    """Over TLS the cookies are `__Host-` ones (Secure); a browser ignores a Set-Cookie for such a name without
    Secure, the expiring one too: sign-out (and sign-in, for the sign-in form's nonce) must expire them with
    the attributes they were set with, or the browser keeps sending the signed-out cookie."""
    url = base(_tls_console(gateway_factory, tmp_path), "https")
    page = tls_context.new_page()
    _sign_in(page, url)
    assert sorted(c["name"] for c in tls_context.cookies()) == ["__Host-smtp-gateway-console"]
    page.click("form.signout button[type=submit]")
    assert page.url.startswith(f"{url}/console/signin")
    # Only the sign-in form's new nonce is left.
    assert sorted(c["name"] for c in tls_context.cookies()) == ["__Host-smtp-gateway-signin"]


def test_signed_out_a_browser_is_not_signed_in_on_a_sibling_instance(
    tls_context: Any, gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    """Two instances behind one host name sharing `session_secret` (as docs/console.md sets up): signed out on
    one, the browser is not signed in on the other (cookies are per host, not per port)."""
    one = _tls_console(gateway_factory, tmp_path / "one")
    other = _tls_console(gateway_factory, tmp_path / "other")
    page = tls_context.new_page()
    _sign_in(page, base(one, "https"))
    page.goto(f"{base(other, 'https')}/console/")
    assert page.locator("h1").inner_text() == "Overview"  # the shared key: signed in on both
    page.goto(f"{base(one, 'https')}/console/")
    page.click("form.signout button[type=submit]")
    page.goto(f"{base(other, 'https')}/console/")
    assert "/console/signin" in page.url, (
        f"signed out, yet the other instance shows {page.locator('h1').inner_text()!r}"
    )
