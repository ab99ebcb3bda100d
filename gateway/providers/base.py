"""The Provider protocol: everything the core needs from one upstream account, and nothing more.

The core (pipeline, delivery owner, queue, retry worker) never knows what a call means to a provider:
it asks `prepare` for the message's provider decisions, `plan` for the calls (opaque keys), and
`deliver` to make the calls not yet done, in the provider's own order (those two, with `account`, are
gateway.core.outcome.Deliverer: all the delivery owner sees of a provider). A third provider is one new
package beside dmds/ and dengage/, plus its settings model in the config union (gateway/config/settings.py).
"""

from __future__ import annotations

from typing import Protocol

from gateway.config.base import UserSettings
from gateway.core.model import Message, Principal, ProviderData, Submission
from gateway.core.outcome import Deliverer
from gateway.policy import SenderPolicy


class Provider(Deliverer, Protocol):
    """One upstream account. Raises only gateway.core.errors types (Rejected: 5xx, Deferred: 4xx)."""

    kind: str  # "dmds", "dengage": the `provider` key of [accounts.X]

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

    async def aclose(self) -> None: ...
