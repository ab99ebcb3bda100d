"""Helpers for the console's tests: a gateway with the console on, and an HTTP client that signs in and fills
forms as a browser would (cookies kept, the CSRF token read from the page)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.configs import hash_for_tests
from tests.harness import Running

ADMIN, ADMIN_PASSWORD = "alice", "alice-console-password"
ADMIN_HASH = hash_for_tests(ADMIN_PASSWORD)
SESSION_SECRET = "console-session-secret-of-the-tests-0123456789"
_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def console_settings(**overrides: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "admins": [{"name": ADMIN, "password_hash": ADMIN_HASH}],
        "session_secret": SESSION_SECRET,
        **overrides,
    }


def console_gateway(
    factory: Callable[..., Running], console: dict[str, Any] | None = None, **overrides: Any
) -> Running:
    http = {"port": 0, **overrides.pop("http", {})}
    return factory(http=http, console=console_settings(**(console or {})), **overrides)


def base(gw: Running, scheme: str = "http") -> str:
    assert gw.app.operator is not None
    return f"{scheme}://127.0.0.1:{gw.app.operator.port}"


def csrf(page: str) -> str:
    found = _CSRF.search(page)
    assert found is not None, "no form with a CSRF token on the page"
    return found[1]


class Client:
    """One browser: its own cookies, from its own address (127.0.0.x for per-IP tests)."""

    def __init__(self, base_url: str, address: str = "127.0.0.1", **session: Any) -> None:
        self.base = base_url
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies of an IP address host
            connector=aiohttp.TCPConnector(local_addr=(address, 0), ssl=False),
            **session,
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def get(self, path: str, **kw: Any) -> tuple[int, aiohttp.ClientResponse, str]:
        kw.setdefault("allow_redirects", False)
        async with self.http.get(self.base + path, **kw) as r:
            return r.status, r, await r.text()

    async def post(self, path: str, data: Any, **kw: Any) -> tuple[int, aiohttp.ClientResponse, str]:
        kw.setdefault("allow_redirects", False)
        async with self.http.post(self.base + path, data=data, **kw) as r:
            return r.status, r, await r.text()

    async def signin(
        self, name: str = ADMIN, password: str = ADMIN_PASSWORD
    ) -> tuple[int, aiohttp.ClientResponse, str]:
        _, _, page = await self.get("/console/signin")
        return await self.post(
            "/console/signin", {"name": name, "password": password, "csrf": csrf(page), "next": "/console/"}
        )

    async def form(self, page_path: str, action: str, fields: Any) -> tuple[int, aiohttp.ClientResponse, str]:
        """POST `fields` to `action` with the CSRF token of the page at `page_path`, as its form would."""
        _, _, page = await self.get(page_path)
        data = list(fields.items()) if isinstance(fields, dict) else list(fields)
        return await self.post(action, [("csrf", csrf(page)), *data])
