"""A provider is one package plus one registry entry: a third provider, written here and registered from this
test alone (its config model, its provider, its sandbox routes), takes a message over SMTP to its sandbox,
and after a failed call through the queue and the retry worker, with nothing else of the gateway changed;
its configuration is checked and masked, and `smtp-gateway sandbox` serves it, as the built-in providers'."""

from __future__ import annotations

import smtplib
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import httpx
import orjson
import pytest
from aiohttp import web
from pydantic import Field, SecretStr

from gateway.cli import build_parser
from gateway.cli import sandbox as sandbox_command
from gateway.config import ConfigError, load_settings, masked_dump
from gateway.config.base import AccountBase, UserSettings
from gateway.core.errors import UpstreamAuthFailed, UpstreamRejected, UpstreamUnavailable
from gateway.core.model import Call, Message, Principal, StoredData, Submission, TypedData
from gateway.core.outcome import BeforeSend, Outcome, no_hook
from gateway.policy import SenderPolicy, ascii_domain
from gateway.providers import registry
from gateway.providers.base import ProviderBase
from gateway.providers.sandbox import Sandbox, json_response
from gateway.providers.spec import ProviderSpec, SandboxEntry
from gateway.upstream.client import HttpClient
from gateway.upstream.ratelimit import Unlimited
from gateway.upstream.response import HttpResponse
from tests.configs import gateway_config
from tests.harness import PASSWORD, PASSWORD_HASH, LoopThread, Running, sandbox_for_tests
from tests.spool_helpers import spool_rows, wait_for

# ---- the provider: "TinyMail", a JSON API with one call per message --------------------------------------

TOKEN = "tiny-api-token"
LOGIN = "tiny-user"
SENDER = "news@tiny.example"


class TinyAccount(AccountBase):
    provider: Literal["tinymail"]
    api_base: str
    token: SecretStr
    sender_domains: list[str] = Field(default_factory=list)
    users: list[UserSettings] = Field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.api_base.rstrip("/")


@dataclass(frozen=True, slots=True)
class TinyParams(TypedData):
    """Chosen at acceptance and kept with a queued message: the idempotency key of its one call."""

    ref: str

    def to_json(self) -> Mapping[str, Any]:
        return {"ref": self.ref}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(ref=str(data["ref"]))


@dataclass(frozen=True, slots=True)
class Sent:
    upstream_id: str


def classify(response: HttpResponse) -> Sent:
    if response.status in (401, 403):
        raise UpstreamAuthFailed(f"TinyMail answered {response.status}")
    if response.status >= 500:
        raise UpstreamUnavailable(f"TinyMail answered {response.status}")
    if response.status >= 400:
        raise UpstreamRejected(str(response.json().get("error")))
    return Sent(str(response.json()["id"]))


class TinyProvider(ProviderBase[TinyAccount]):
    """Only what the base does not: the sender domains, the per-message key, one call, its delivery."""

    kind = "tinymail"

    async def sender_policy(self) -> SenderPolicy:
        return SenderPolicy(domains=frozenset(ascii_domain(d) for d in self.settings.sender_domains))

    async def prepare(
        self, principal: Principal, message: Message, mail_from: str, rcpt_tos: tuple[str, ...]
    ) -> Submission:
        return Submission(principal, mail_from, rcpt_tos, message, TinyParams(ref=uuid.uuid4().hex))

    def plan(self, submission: Submission) -> tuple[Call, ...]:
        return (Call("all", submission.rcpt_tos),)

    async def deliver(
        self, submission: Submission, done: Mapping[str, str], before_send: BeforeSend = no_hook
    ) -> Outcome:
        outcome = Outcome()
        if "all" not in done:
            await outcome.record_all({"all": self._send(submission, before_send)})
        return outcome

    async def _send(self, submission: Submission, before_send: BeforeSend) -> Sent:
        message = submission.message
        body = {"from": submission.mail_from, "to": list(submission.rcpt_tos), "subject": message.subject}
        headers = {
            "Authorization": f"Bearer {self.settings.token.get_secret_value()}",
            "Content-Type": "application/json",
            "Idempotency-Key": TinyParams.read(submission.params).ref,
        }
        # The limiter's slot is taken once a connection is free, and before_send runs right before the request.
        response = await self.http.request(
            "send",
            "POST",
            "/tiny/v1/send",
            headers=headers,
            content=orjson.dumps(body),
            before_send=lambda: before_send(("all",)),
            limiter=self.limiter,
        )
        return classify(response)


def install(sandbox: Sandbox) -> None:
    """TinyMail's sandbox route: checks the token, answers a message id, fails on demand (faults)."""

    async def send(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        key = request.headers.get("Idempotency-Key")
        entry: dict[str, Any] = {"kind": "send", "provider": "tinymail", "path": request.path, "body": body, "key": key}
        faulted = await sandbox.apply_fault(
            request, entry, lambda reason, status: json_response({"error": reason}, status)
        )
        if faulted is not None:
            return faulted
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return sandbox.answer(entry, json_response({"error": "bad token"}, 401), error="bad token")
        return sandbox.answer(entry, json_response({"id": f"tiny-{uuid.uuid4().hex[:12]}"}))

    sandbox.app.router.add_post("/tiny/v1/send", send)


SPEC = ProviderSpec(
    kind="tinymail",
    label="TinyMail",
    account_model=TinyAccount,
    create=TinyProvider,
    sandbox=SandboxEntry(routes=lambda args: install, prefix="/tiny"),
)

# ---- the test -----------------------------------------------------------------------------------------------

FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 5.0}


@pytest.fixture
def tinymail() -> Iterator[ProviderSpec[TinyAccount]]:
    registry.register(SPEC)
    try:
        yield SPEC
    finally:
        registry.unregister(SPEC.kind)


def account(sandbox_port: int, **overrides: Any) -> dict[str, Any]:
    return {
        "provider": "tinymail",
        "api_base": f"http://127.0.0.1:{sandbox_port}",
        "token": TOKEN,
        "sender_domains": ["tiny.example"],
        "users": [{"username": LOGIN, "password_hash": PASSWORD_HASH}],
        **overrides,
    }


def send(gw: Running, subject: str) -> tuple[int, str]:
    raw = f"From: {SENDER}\r\nTo: ann@example.com\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
        client.login(LOGIN, PASSWORD)
        client.mail(SENDER)
        for rcpt in ("ann@example.com", "bob@example.com"):
            client.rcpt(rcpt)
        code, text = client.data(raw)
    return code, text.decode()


def test_a_registered_provider_delivers_inline_and_through_the_queue(
    tinymail: ProviderSpec[TinyAccount],
    gateway_factory: Callable[..., Running],
    loop_thread: LoopThread,
) -> None:
    sandbox = sandbox_for_tests()  # every registered provider's routes: TinyMail's too
    port = loop_thread.run(sandbox.start("127.0.0.1", 0))
    gw = gateway_factory(sandbox=sandbox, accounts={"tiny": account(port)}, delivery=FAST)

    # SMTP -> pipeline -> TinyMail's sandbox, while the client waits.
    code, text = send(gw, "inline")
    [inline] = gw.calls("send", "tinymail")
    assert (code, inline["status"]) == (250, 200), text
    assert text.endswith(inline["response"]["id"])  # the client is told the upstream's id
    assert inline["body"] == {"from": SENDER, "to": ["ann@example.com", "bob@example.com"], "subject": "inline"}

    # The sandbox fails the call: the message is queued, and the retry worker delivers it with the same key.
    gw.fault(status=503, count=1, provider="tinymail")
    code, text = send(gw, "queued")
    assert code == 250 and len(text.rsplit(" ", 1)[1]) == 16, text  # a local queue id
    path = gw.settings.delivery.spool_path
    wait_for(lambda: spool_rows(path) == [] or None, what="the retry worker's delivery")
    failed, retried = [r for r in gw.calls("send", "tinymail") if r["body"]["subject"] == "queued"]
    assert (failed["status"], retried["status"]) == (503, 200)
    assert failed["key"] == retried["key"] and failed["key"] != inline["key"]  # TinyParams through the queue


def test_a_registered_provider_account_is_checked_and_masked(
    tinymail: ProviderSpec[TinyAccount], tmp_path: Path
) -> None:
    settings = load_settings(None, **gateway_config(tmp_path, accounts={"tiny": account(9)}))
    assert masked_dump(settings)["accounts"]["tiny"]["token"] == "**********"
    with pytest.raises(ConfigError, match=r"accounts\.tiny\.tokn: unknown key; did you mean token\?"):
        load_settings(None, **gateway_config(tmp_path, accounts={"tiny": account(9, tokn="x")}))


def test_an_unregistered_provider_is_refused_with_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(None, **gateway_config(tmp_path, accounts={"tiny": account(9)}))
    assert "accounts.tiny: Input tag 'tinymail'" in str(refused.value)
    assert "expected tags: 'dmds', 'dengage'" in str(refused.value)


def test_the_sandbox_command_serves_and_takes_the_options_of_every_registered_provider(
    tinymail: ProviderSpec[TinyAccount],
) -> None:
    served = sandbox_command._served()
    assert [spec.kind for spec, _ in served] == ["dmds", "dengage", "tinymail"]
    assert sandbox_command.describe(served, "http://h:1") == (
        "DMDS-, dEngage- and TinyMail-compatible upstream on http://h:1 (dEngage api_base: http://h:1/rest)"
    )
    args = build_parser().parse_args(["sandbox", "--apikey", "k", "--dengage-rate-limit", "0"])
    assert (args.apikey, args.dengage_rate_limit) == ("k", 0)
    assert "(DMDS, dEngage and TinyMail paths)" in " ".join(build_parser().format_help().split())


class _Transport(httpx.AsyncBaseTransport):
    """Answers nothing (the defaults make no call) and notes that it was closed."""

    closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request expected, got {request.url}")

    async def aclose(self) -> None:
        self.closed = True


async def test_provider_base_defaults_are_those_of_a_provider_with_configured_users_only() -> None:
    settings = TinyAccount.model_validate(account(9))
    transport = _Transport()
    http = HttpClient(settings.base_url, upstream="TinyMail", account="tiny", timeout=1.0, transport=transport)
    provider = TinyProvider("tiny", settings, http, Unlimited())
    assert not provider.owns_login("tiny-api-token") and provider.login_label("anyone") == "anyone"
    assert await provider.verify_login(LOGIN, PASSWORD) is None  # configured users are checked by the core
    assert provider.user_extra(settings.users[0]) == StoredData()
    await provider.aclose()
    assert transport.closed  # the account's HTTP client is closed with it
