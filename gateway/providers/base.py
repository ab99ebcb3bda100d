"""The Provider protocol: everything the core needs from one upstream account, and nothing more.

The core (pipeline, delivery owner, queue, retry worker) never knows what a call means to a provider:
it asks `prepare` for the message's provider decisions, `plan` for the calls (opaque keys), and
`deliver` to make the calls not yet done, in the provider's own order. A third provider is one new
package beside dmds/ and dengage/, plus its settings model in the config union (gateway/config/settings.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from gateway.config.base import UserSettings
from gateway.core.model import Call, Message, Principal, Submission
from gateway.core.outcome import Outcome
from gateway.policy import SenderPolicy

# Called by a provider right before it sends calls, with their keys: the delivery owner records that
# they may now reach the upstream (a lease that expires after this is an ambiguous call, not a safe one).
BeforeSend = Callable[[Sequence[str]], Awaitable[None]]


async def no_hook(keys: Sequence[str]) -> None:
    return None


class Provider(Protocol):
    """One upstream account. Raises only gateway.errors types (Rejected: 5xx, Deferred: 4xx)."""

    kind: str  # "dmds", "dengage": the `provider` key of [accounts.X]
    account: str

    def user_extra(self, user: UserSettings) -> dict[str, object]:
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

    def plan(self, submission: Submission) -> tuple[Call, ...]:
        """The calls this submission needs. Pure and deterministic: the retry worker plans again from
        the stored submission and skips the keys already delivered."""
        ...

    async def deliver(
        self, submission: Submission, done: Mapping[str, str], before_send: BeforeSend = no_hook
    ) -> Outcome:
        """Make every planned call whose key is not in `done` (key -> upstream id), in this provider's
        order, and report each one. Never raises for an upstream answer: it goes in the Outcome."""
        ...

    async def aclose(self) -> None: ...
