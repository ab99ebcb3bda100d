"""The console's sign-in lockout is shared through the queue by every process and instance, as SMTP AUTH's is
(docs/console.md, docs/security.md): it was per process, so with two instances (or `serve --workers 2`) an
address locked out on one had its passwords checked on the other and signed in there (review console3 F1).
Two instances on one SQLite queue, over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.configs import hash_for_tests
from tests.console_util import ADMIN, ADMIN_PASSWORD, Client, base, console_gateway, csrf
from tests.harness import PASSWORD, LoopThread, Running, start, stop
from tests.smtputil import RawClient

TOKEN = "api-token-for-the-tests"
TOKEN_HASH = hash_for_tests(TOKEN)
LIMITS = {"auth_failures_per_ip": 3, "auth_lockout_failures": 3, "auth_delay_max": 0.0}


async def _try(browser: Client, password: str) -> int:
    _, _, page = await browser.get("/console/signin")
    status, _, _ = await browser.post(
        "/console/signin", {"name": ADMIN, "password": password, "csrf": csrf(page), "next": "/console/"}
    )
    return status


async def test_a_sign_in_lockout_on_one_instance_holds_on_the_other_and_a_lift_on_either_lifts_it(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    delivery: dict[str, Any] = {"spool_path": str(tmp_path / "shared.sqlite3")}
    a = console_gateway(lambda **kw: start(loop_thread, tmp_path / "a", **kw), delivery=delivery, limits=LIMITS)
    b = console_gateway(lambda **kw: start(loop_thread, tmp_path / "b", **kw), delivery=delivery, limits=LIMITS)
    try:
        async with Client(base(a), address="127.0.0.9") as on_a, Client(base(b), address="127.0.0.9") as on_b:
            seen_a = [await _try(on_a, f"wrong-{n}") for n in range(4)]
            assert seen_a == [401, 401, 429, 429]  # locked out on A
            # B reads the shared record: the right password is refused there too, before any hash is checked.
            assert await _try(on_b, ADMIN_PASSWORD) == 429
            async with Client(base(b), address="127.0.0.1") as admin:
                await admin.signin()
                _, _, logins = await admin.get("/console/logins")
                assert "127.0.0.9" in logins  # B lists the lockout A made
                await admin.form("/console/logins", "/console/logins/lift", {"scope": "console", "client": "127.0.0.9"})
            # Lifted on B: A reads the shared record again and lets the address sign in.
            assert await _try(on_a, ADMIN_PASSWORD) == 303
    finally:
        stop(a)
        stop(b)


async def test_an_api_token_lockout_on_one_instance_holds_on_the_other_apart_from_smtp_auth(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """The message API's token guard was per process in the same way: it is shared too, under keys of its own
    (a client locked out of the API is not locked out of SMTP AUTH, nor listed under it)."""
    delivery: dict[str, Any] = {"spool_path": str(tmp_path / "shared.sqlite3")}
    http = {"api_tokens": [{"name": "ci", "token_hash": TOKEN_HASH}]}
    a = console_gateway(
        lambda **kw: start(loop_thread, tmp_path / "a", **kw), delivery=delivery, limits=LIMITS, http=http
    )
    b = console_gateway(
        lambda **kw: start(loop_thread, tmp_path / "b", **kw), delivery=delivery, limits=LIMITS, http=http
    )
    try:
        async with httpx.AsyncClient(timeout=30) as client:

            async def status(gw: Running, token: str) -> int:
                answer = await client.get(f"{base(gw)}/api/v1/messages", headers={"Authorization": f"Bearer {token}"})
                return answer.status_code

            assert [await status(a, f"wrong-{n}") for n in range(4)] == [401, 401, 401, 429]
            assert await status(b, TOKEN) == 429  # B reads the lockout A made, the right token included
        with RawClient(b) as smtp:  # SMTP AUTH's count is apart: the same address logs in
            smtp.cmd("EHLO client.test")
            assert smtp.login("scanner", PASSWORD).startswith("235 ")
        async with Client(base(b)) as admin:
            await admin.signin()
            _, _, logins = await admin.get("/console/logins")
        assert "api:" not in logins and "console:" not in logins  # each scope's rows under its own name
    finally:
        stop(a)
        stop(b)
