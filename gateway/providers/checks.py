"""What `smtp-gateway check-upstream` learns of one account: each harmless read-only call made against the
real API (reached, authenticated, the answer's shape recognised and how), what the configuration names that
the API does not have, and what to fix. Providers fill it (Provider.check_upstream); the CLI prints it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from gateway.config.urls import shown_url
from gateway.core.errors import Deferred, UpstreamAuthFailed
from gateway.upstream.response import HttpResponse
from gateway.upstream.shape import Reading

T = TypeVar("T")


@dataclass
class CallCheck:
    """One read-only call. `authenticated` and `recognised` are None when no answer could say."""

    call: str  # "GET /v1/version/"
    reached: bool = False
    authenticated: bool | None = None
    recognised: bool | None = None
    status: int | None = None
    read: str = ""  # which candidate name matched, per field
    unexpected: list[str] = field(default_factory=list)  # keys of the answer no table names
    problem: str | None = None  # what went wrong, in a sentence

    def answered(self, response: HttpResponse) -> None:
        self.reached, self.status = True, response.status
        self.authenticated = response.status not in (401, 403)

    def noted(self, reading: Reading) -> None:
        self.read = ", ".join(f"{name}={key}" for name, key in reading.matched.items())
        self.unexpected = list(reading.unexpected)

    def failed(self, exc: Deferred) -> None:
        """A typed failure of the call: not reached (no answer), or an answer refusing the credentials."""
        if isinstance(exc, UpstreamAuthFailed):
            self.reached, self.authenticated = True, False
        elif self.authenticated is False:
            # A 401/403 that is no refusal of the account's credentials (a proxy's or WAF's page): it says
            # nothing of them either way.
            self.authenticated = None
        self.problem = exc.reason

    @property
    def ok(self) -> bool:
        return self.reached and self.authenticated is not False and self.recognised is not False and not self.problem


@dataclass
class AccountCheck:
    """One account's report: its calls, the campaigns or identities found against those configured, and
    what to fix (empty: nothing the checks could see)."""

    account: str
    provider: str  # the provider's label ("DMDS")
    base_url: str
    calls: list[CallCheck] = field(default_factory=list)
    things: str = ""  # what is compared: "campaigns", "identities"
    found: list[str] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Printed (and dumped as JSON) by check-upstream: a key an api_base carries in its query is masked.
        self.base_url = shown_url(self.base_url)

    @property
    def ok(self) -> bool:
        return not self.fixes and all(call.ok for call in self.calls)


async def probe(
    call: CallCheck, send: Callable[[], Awaitable[HttpResponse]], parse: Callable[[HttpResponse, Reading], T]
) -> tuple[bool, T | None]:
    """Make one call and read its answer into `call`: (whether it was answered and read, what was read).
    A typed failure (not sent, refused credentials, a temporary error) is noted in `call`, not raised."""
    try:
        response = await send()
    except Deferred as exc:
        call.failed(exc)
        return False, None
    call.answered(response)
    reading = Reading()
    try:
        return True, parse(response, reading)
    except Deferred as exc:
        call.failed(exc)
        return False, None
    finally:
        call.noted(reading)


async def probe_return_path(
    report: AccountCheck,
    call: CallCheck,
    send: Callable[[], Awaitable[HttpResponse]],
    parse: Callable[[HttpResponse, Reading], object],
    names: str,
    wire_file: str,
) -> None:
    """One call of the return path (events.enabled reads it), as the poller makes it: recognised, or a fix
    naming the wire constants to correct in `wire_file` when the API answered but not in the guessed shape,
    or the call's own problem when it was not reached or refused the credentials."""
    report.calls.append(call)
    answered, _ = await probe(call, send, parse)
    if answered:
        call.recognised = True
    elif call.reached and call.authenticated is not False:
        call.recognised = False
        report.fixes.append(
            f"the return path's {call.call} cannot be read ({call.problem}): events.enabled reads it; "
            f"correct {names} in {wire_file}"
        )
    else:
        report.fixes.append(f"{call.call}: {call.problem}")


def not_reached(report: AccountCheck, label: str, fix_credentials: str) -> bool:
    """Whether the first call showed that nothing else can be checked (the API unreachable, or refusing the
    account's credentials); the fix is added to `report` then."""
    first = report.calls[0]
    if not first.reached:
        report.fixes.append(
            f"{label} cannot be reached at {report.base_url} ({first.problem}): check api_base and this "
            "machine's network (proxy, firewall, DNS)"
        )
        return True
    if first.authenticated is False:
        report.fixes.append(f"{first.problem}: {fix_credentials}")
        return True
    return False
