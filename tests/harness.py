"""Test harness: the real gateway and the sandbox upstream on one event loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from gateway.app import App
from gateway.config import Settings, load_settings
from gateway.providers import registry
from gateway.providers.dengage.sandbox import DengageSandbox
from gateway.providers.dengage.sandbox import install as install_dengage
from gateway.providers.dmds.sandbox import DmdsSandbox
from gateway.providers.dmds.sandbox import install as install_dmds
from gateway.providers.sandbox import Sandbox, SandboxState
from tests.configs import APIKEY, PASSWORD, PASSWORD_HASH, USER, gateway_config

__all__ = ["APIKEY", "PASSWORD", "PASSWORD_HASH", "USER"]  # the test account's, re-exported

T = TypeVar("T")

CAMPAIGNS = {22: "campaign-22-apikey", 23: "campaign-23-apikey"}
# The dEngage account `start(..., dengage={...})` adds: its API user, its configured login (same password
# as USER) and its From identities in the sandbox.
DENGAGE_ACCOUNT = "crm"
DENGAGE_USERKEY, DENGAGE_API_PASSWORD = "test-dengage-userkey", "test-dengage-api-password"
DENGAGE_USER = "erp"
DENGAGE_SENDER = "billing@crm.example"
DENGAGE_FROMS = ["CRM Billing <billing@crm.example>", "CRM News <news@mail.crm.example>"]


class LoopThread:
    """An asyncio loop in a daemon thread; tests submit coroutines and block on their results."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.new_event_loop()  # e.g. uvloop.new_event_loop(), as `serve` runs
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        async def cancel_leftovers() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Running:
    """A started gateway + sandbox; `port(name)` gives a listener's port."""

    loop: LoopThread
    app: App
    sandbox: Sandbox
    settings: Settings
    tmp: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def port(self, listener: str = "plain") -> int:
        return self.app.ports[listener]

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox.port}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every send request the sandbox upstream received (accepted ones have status 200)."""
        return [r for r in self.sandbox.state.requests if r["kind"] == "send"]

    @property
    def lookups(self) -> list[int | str]:
        """The campania_apikey lookups the sandbox answered (the numid of each)."""
        return list(self.sandbox.state.lookups)

    @property
    def sent(self) -> list[dict[str, Any]]:
        return [r for r in self.sandbox.state.requests if r["kind"] == "send" and r["status"] == 200]

    def calls(self, kind: str = "send", provider: str = "dengage", status: int | None = None) -> list[dict[str, Any]]:
        """The requests of one kind (send, login, froms, lookup) one provider's routes received."""
        return [
            r
            for r in list(self.sandbox.state.requests)
            if r["kind"] == kind and r.get("provider") == provider and (status is None or r["status"] == status)
        ]

    def dengage_control(self, **spec: Any) -> dict[str, Any]:
        """Change the sandbox's dEngage behaviour (POST /_sandbox/dengage)."""
        response = httpx.post(f"{self.sandbox_url}/_sandbox/dengage", json=spec)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def fault(self, **spec: Any) -> None:
        httpx.post(f"{self.sandbox_url}/_sandbox/faults", json=spec).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.sandbox_url}/_sandbox/faults").raise_for_status()


def dengage_sandbox(**settings: Any) -> DengageSandbox:
    """The sandbox's dEngage side for the tests' dEngage account."""
    return DengageSandbox(userkey=DENGAGE_USERKEY, password=DENGAGE_API_PASSWORD, froms=list(DENGAGE_FROMS), **settings)


def dengage_account(sandbox_port: int, **overrides: Any) -> dict[str, Any]:
    """The tests' dEngage account (provider = "dengage") against the sandbox's /rest paths."""
    return {
        "provider": "dengage",
        "api_base": f"http://127.0.0.1:{sandbox_port}/rest",
        "userkey": DENGAGE_USERKEY,
        "password": DENGAGE_API_PASSWORD,
        "http_timeout": 5.0,
        "users": [{"username": DENGAGE_USER, "password_hash": PASSWORD_HASH, "tags": ["erp"]}],
        "dsn": {"notify": "off"},  # as the DMDS test account (tests/configs.py)
        **overrides,
    }


def sandbox_for_tests(
    state: SandboxState | None = None, dmds: DmdsSandbox | None = None, dengage: DengageSandbox | None = None
) -> Sandbox:
    """The sandbox upstream with every registered provider's routes: the tests' DMDS account and dEngage API
    user, any other provider's defaults."""
    dmds = dmds or DmdsSandbox(apikey=APIKEY, campaigns=dict(CAMPAIGNS))
    dengage = dengage or dengage_sandbox()
    ours = {"dmds": lambda s: install_dmds(s, dmds), "dengage": lambda s: install_dengage(s, dengage)}
    routes = [ours.get(spec.kind) or spec.sandbox.default_routes() for spec in registry.specs() if spec.sandbox]
    return Sandbox(state or SandboxState(), routes)


def start(
    loop: LoopThread,
    tmp: Path,
    sandbox: Sandbox | None = None,
    extra_users: list[dict[str, Any]] | None = None,
    dengage: dict[str, Any] | None = None,
    **overrides: Any,
) -> Running:
    """`dengage`: also configure the dEngage account DENGAGE_ACCOUNT, with these keys overridden."""
    sandbox = sandbox or sandbox_for_tests()
    # A sandbox already serving (another gateway's) is shared: two instances, one upstream.
    port = sandbox.port or loop.run(sandbox.start("127.0.0.1", 0))
    if dengage is not None:
        overrides["accounts"] = {**overrides.get("accounts", {}), DENGAGE_ACCOUNT: dengage_account(port, **dengage)}
    settings = load_settings(None, **gateway_config(tmp, port, extra_users=extra_users, **overrides))
    for name, account in settings.accounts.items():
        # Tests talk to loopback only: an account without api_base would default to the real DMDS host.
        assert account.base_url.startswith(("http://127.0.0.1", "https://127.0.0.1")), f"account {name}: loopback only"
    app = App(settings)
    loop.run(app.start())
    return Running(loop=loop, app=app, sandbox=sandbox, settings=settings, tmp=tmp)


def stop(running: Running) -> None:
    running.loop.run(running.app.stop(drain_timeout=2.0))
    running.loop.run(running.sandbox.stop())
