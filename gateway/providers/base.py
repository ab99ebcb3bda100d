"""The Provider protocol: everything the core needs from one upstream account, and nothing more; and
ProviderBase, the defaults a provider class starts from.

The core (pipeline, delivery owner, queue, retry worker) never knows what a call means to a provider:
it asks `prepare` for the message's provider decisions, `plan` for the calls (opaque keys), and
`deliver` to make the calls not yet done, in the provider's own order (those two, with `account`, are
gateway.core.outcome.Deliverer: all the delivery owner sees of a provider). A provider is one package
beside dmds/ and dengage/ and its entry in gateway/providers/registry.py (see spec.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from gateway.config.base import AccountBase, UserSettings
from gateway.core.events import Contacts, EventSource
from gateway.core.model import Message, Principal, ProviderData, StoredData, Submission
from gateway.core.outcome import Deliverer, NoHealth, UpstreamHealth
from gateway.policy import SenderPolicy

if TYPE_CHECKING:
    from gateway.providers.checks import AccountCheck
    from gateway.upstream.client import HttpClient
    from gateway.upstream.ratelimit import RateLimiter

A = TypeVar("A", bound=AccountBase)


class Provider(Deliverer, Protocol):
    """One upstream account. Raises only gateway.core.errors types (Rejected: 5xx, Deferred: 4xx)."""

    kind: str  # "dmds", "dengage": the `provider` key of [accounts.X]
    # Told what the upstream says outside delivery calls (lookups at MAIL FROM); set by the registry.
    health: UpstreamHealth

    def user_extra(self, user: UserSettings) -> ProviderData:
        """What a configured user's login means to this provider (Principal.extra)."""
        ...

    async def verify_login(self, username: str, password: str) -> Principal | None:
        """A provider-specific login (DMDS SMTP-API logins, dEngage API users), or None when the
        username is not one of this provider's login styles or the password is wrong. Configured users
        (scrypt hashes) are checked by the core before this. Raises Deferred when it cannot check now."""
        ...

    def owns_login(self, username: str) -> bool:
        """Whether `username` has this provider's login shape (for the refusal cache's lifetime)."""
        ...

    def login_label(self, username: str) -> str:
        """How `username` may appear in logs: itself, unless it is a secret of this provider (the
        dEngage API user's userkey), which is replaced by a name for it."""
        ...

    async def sender_policy(self) -> SenderPolicy:
        """The permitted sender domains now (may ask the upstream, cached). Raises Deferred."""
        ...

    async def prepare(
        self, principal: Principal, message: Message, mail_from: str, rcpt_tos: tuple[str, ...]
    ) -> Submission:
        """The provider's per-message decisions (DMDS: campaign, archive, batch), checked now while the
        client waits. Raises Rejected for what the upstream would refuse or silently drop."""
        ...

    def event_source(self) -> EventSource | None:
        """The account's event API, when its events are read back ([accounts.X.events] enabled)."""
        ...

    def contacts(self) -> Contacts | None:
        """The vendor's own invalid contacts and whitelist, when it has them and events are read back."""
        ...

    def notice_params(self, original: ProviderData) -> ProviderData:
        """A delivery status notice's Submission.params, from those of the message it is about (DMDS: the
        same campaign, not its batch)."""

    def requests(self, submission: Submission, *, bodies: bool = True) -> list[dict[str, Any]]:
        """The calls `plan` gives, as requests without secrets or attachment contents (method, path, body):
        what a test-mode login's message would have sent, for the log and the message ledger (`bodies`
        false: the message's text as its size too)."""
        ...

    async def check_upstream(self) -> AccountCheck:
        """Harmless read-only calls against the real API and what they showed (`smtp-gateway check-upstream`):
        never a send, never a change. Raises nothing for an upstream's answer: it goes in the report."""
        ...

    async def aclose(self) -> None: ...


class ProviderBase(Generic[A]):
    """A provider's account, settings, HTTP client and rate limiter, and the defaults of a provider with no
    login style of its own (only configured users log in, their logins carry nothing for it) and no
    per-message decisions. A provider class adds `kind`, `sender_policy`, `plan` and `deliver`."""

    kind: str

    def __init__(self, account: str, settings: A, http: HttpClient, limiter: RateLimiter) -> None:
        self.account = account
        self.settings = settings
        self.http = http
        self.limiter = limiter
        self.health: UpstreamHealth = NoHealth()

    def user_extra(self, user: UserSettings) -> ProviderData:
        return StoredData()

    async def verify_login(self, username: str, password: str) -> Principal | None:
        return None

    def owns_login(self, username: str) -> bool:
        return False

    def login_label(self, username: str) -> str:
        return username

    async def prepare(
        self, principal: Principal, message: Message, mail_from: str, rcpt_tos: tuple[str, ...]
    ) -> Submission:
        return Submission(principal=principal, mail_from=mail_from, rcpt_tos=rcpt_tos, message=message)

    def event_source(self) -> EventSource | None:
        return None

    def contacts(self) -> Contacts | None:
        return None

    def notice_params(self, original: ProviderData) -> ProviderData:
        return original

    def requests(self, submission: Submission, *, bodies: bool = True) -> list[dict[str, Any]]:
        """The planned calls' keys and recipients (a provider that knows its wire gives their bodies)."""
        return [{"call": c.key, "recipients": list(c.recipients)} for c in cast(Deliverer, self).plan(submission)]

    async def check_upstream(self) -> AccountCheck:
        """No read-only calls known for this provider: an empty report."""
        from gateway.providers.checks import AccountCheck  # check-upstream's: a serving process never needs it

        return AccountCheck(self.account, self.kind, self.http.base_url)

    async def aclose(self) -> None:
        await self.http.aclose()
