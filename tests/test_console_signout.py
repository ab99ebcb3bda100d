"""Console sign-out ends the session everywhere: recorded in the queue's store, so a copy of the cookie taken
before sign-out is refused by every instance sharing `session_secret` and the queue, and after a restart
(docs/console.md). Over HTTP with the cookie copied, two instances on one PostgreSQL queue or one SQLite file;
the browser's own cookie is tested in tests/test_console_browser.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.core.errors import SpoolUnavailable
from tests.console_util import Client, base, console_gateway
from tests.harness import LoopThread, Running, start, stop
from tests.ops_util import captured_with_context

COOKIE = "smtp-gateway-console"


class Instances:
    """Gateways on one queue, each stopped once: by the test (a restart) or at the end."""

    def __init__(self, loop: LoopThread, tmp: Path, delivery: dict[str, Any]) -> None:
        self.loop, self.tmp, self.delivery = loop, tmp, delivery
        self.running: list[Running] = []
        self.started = 0

    def start(self) -> Running:
        self.started += 1
        gw = console_gateway(
            lambda **kw: start(self.loop, self.tmp / f"gw{self.started}", **kw), delivery=self.delivery
        )
        self.running.append(gw)
        return gw

    def stop(self, gw: Running) -> None:
        self.running.remove(gw)
        stop(gw)


@pytest.fixture(params=["sqlite", "postgresql"])
def instances(request: pytest.FixtureRequest, loop_thread: LoopThread, tmp_path: Path) -> Iterator[Instances]:
    if request.param == "postgresql":
        delivery = {"queue_url": request.getfixturevalue("pg_cluster").new_database()}
    else:
        delivery = {"spool_path": str(tmp_path / "shared.sqlite3")}
    found = Instances(loop_thread, tmp_path, delivery)
    yield found
    for gw in list(found.running):
        found.stop(gw)


def copied(browser: Client) -> str:
    return next(c.value for c in browser.http.cookie_jar if c.key == COOKIE)


async def opens(gw: Running, cookie: str) -> int:
    """The status of the console's home for a browser holding only `cookie` (200: signed in; 303: sent to sign in)."""
    async with Client(base(gw)) as replay:
        replay.http.cookie_jar.update_cookies({COOKIE: cookie})
        return (await replay.get("/console/"))[0]


async def test_a_sign_out_ends_the_session_on_every_instance_and_after_a_restart(instances: Instances) -> None:
    a, b = instances.start(), instances.start()
    async with Client(base(a)) as browser:
        await browser.signin()
        cookie = copied(browser)
        assert await opens(b, cookie) == 200  # one session, open on both instances
        assert await opens(a, cookie) == 200
        status, response, _ = await browser.form("/console/", "/console/signout", {})
        assert status == 303 and response.headers["Location"] == "/console/signin"
    assert await opens(b, cookie) == 303  # the copy, refused on the other instance at once
    assert await opens(a, cookie) == 303
    # Both instances stopped, one started: no process remembers the sign-out, the store does.
    instances.stop(a)
    instances.stop(b)
    c = instances.start()
    assert await opens(c, cookie) == 303
    async with Client(base(c)) as browser:  # another session of the same admin: not signed out
        await browser.signin()
        assert await opens(c, copied(browser)) == 200


async def test_a_store_that_cannot_be_reached_signs_out_this_browser_says_so_and_closes_the_console(
    gateway_factory: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At sign-out the store fails: the cookie is still expired, this process refuses the session, the failure
    is logged once and the page says a copy may still be usable elsewhere. At a request's check it fails: the
    console refuses every page (503, fail closed), logged once for the episode; back, it serves again."""
    gw = console_gateway(gateway_factory)
    store = gw.app.store
    assert store is not None

    async def unreachable(*args: Any) -> Any:
        raise SpoolUnavailable("the queue's database is down (a test)")

    async with Client(base(gw)) as browser:
        await browser.signin()
        cookie = copied(browser)
        monkeypatch.setattr(store, "session_revoke", unreachable)
        with captured_with_context() as logs:
            status, response, page = await browser.form("/console/", "/console/signout", {})
        assert status == 200 and "could not be recorded" in page and "still opens the console" in page
        assert response.cookies[COOKIE].value == "" and response.cookies[COOKIE]["max-age"] == "0"
        [line] = [e for e in logs if e["event"] == "console_signout_not_shared"]
        assert line["admin"] == "alice" and "down" in line["error"] and line["usable_until"]
        assert [e["action"] for e in logs if e["event"] == "console_action"] == ["sign_out"]
    assert await opens(gw, cookie) == 303  # this process remembers it
    monkeypatch.undo()

    async with Client(base(gw)) as browser:
        await browser.signin()
        monkeypatch.setattr(store, "session_revoked", unreachable)
        with captured_with_context() as logs:
            first, _, page = await browser.get("/console/")
            second, response, _ = await browser.get("/console/queue")
        assert (first, second) == (503, 503) and "cannot check its sessions" in page
        assert response.headers["Retry-After"] and response.headers["Cache-Control"] == "no-store"
        assert [e["event"] for e in logs if e["event"].startswith("console_sessions")] == ["console_sessions_unchecked"]
        monkeypatch.undo()
        with captured_with_context() as logs:
            assert (await browser.get("/console/"))[0] == 200
        assert [e["event"] for e in logs if e["event"].startswith("console_sessions")] == ["console_sessions_checked"]
