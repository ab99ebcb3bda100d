"""Planisys DMDS provider: logins (SMTP-API, SMTP-DMDS sandbox style), campaigns, legs in one batch."""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from gateway.config.base import UserSettings
from gateway.core import replies
from gateway.core.cache import AsyncCache, Fresh
from gateway.core.errors import ContentRejected, Deferred, Rejected
from gateway.core.events import Contacts, EventSource
from gateway.core.model import Call, Message, Principal, ProviderData, Submission
from gateway.core.outcome import BeforeSend, Outcome, no_hook
from gateway.mime import jsonbody
from gateway.policy import SenderPolicy, ascii_address, ascii_domain
from gateway.providers.base import ProviderBase
from gateway.providers.dmds import campaigns, wire
from gateway.providers.dmds.config import DmdsAccount, DmdsUser
from gateway.providers.dmds.data import DmdsLogin, DmdsParams
from gateway.providers.dmds.events import DmdsEvents
from gateway.providers.dmds.legs import Leg, plan_legs
from gateway.upstream.client import HttpClient
from gateway.upstream.ratelimit import RateLimiter, Unlimited

_SMTP_API_LOGIN = re.compile(r"^(?P<dmdsid>[A-Za-z0-9_.]+)-(?P<numid>\d{1,12})$")
# Campaign numids whose existence is remembered (each of known and unknown ones): a client choosing
# campaigns by Subject can name any number.
CAMPAIGNS_CACHED = 10_000


def sender_policy(settings: DmdsAccount) -> SenderPolicy:
    """DMDS' own rule: the registered sender domains, each with its registered return-path."""
    return SenderPolicy(
        domains=frozenset(ascii_domain(d) for d in settings.sender_domains),
        return_paths={ascii_address(rp): ascii_domain(d) for d, rp in settings.sender_domains.items()},
    )


class DmdsProvider(ProviderBase[DmdsAccount]):
    kind = "dmds"

    def __init__(
        self,
        account: str,
        settings: DmdsAccount,
        http: HttpClient,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(account, settings, http, limiter or Unlimited())
        # The raw key goes in Authorization with no scheme (upstream-apis.md §1.1, [V]).
        self._headers = {
            "Authorization": settings.key,
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self._known: AsyncCache[int, bool] = AsyncCache(
            CAMPAIGNS_CACHED, negative=lambda known: not known, clock=clock
        )  # campaign numid -> whether DMDS has it
        self._policy = sender_policy(settings)
        self._events: DmdsEvents | None = None

    # -- logins ------------------------------------------------------------------------------------

    def user_extra(self, user: UserSettings) -> ProviderData:
        assert isinstance(user, DmdsUser)
        return DmdsLogin(user.campaign, user.campaign_from_subject, user.may_choose_campaign)

    def owns_login(self, username: str) -> bool:
        m = _SMTP_API_LOGIN.match(username)
        return (m.group("dmdsid") if m else username) == self.settings.dmdsid

    async def verify_login(self, username: str, password: str) -> Principal | None:
        settings = self.settings
        m = _SMTP_API_LOGIN.match(username)
        if m and m.group("dmdsid") == settings.dmdsid:
            # <dmdsid>-<numid> + that campaign's apikey (the seed's SMTP-API logins).
            numid = int(m.group("numid"))
            if not settings.smtp_api_logins or (settings.campaigns and numid not in settings.campaigns):
                return None
            key = await self.campaign_apikey(numid)
            if key is None or not hmac.compare_digest(key.encode(), password.encode()):
                return None
            return Principal(account=self.account, login=username, extra=DmdsLogin(campaign=numid))
        # <dmdsid> + the account APIKEY, campaign from "[NN]" (upstream-apis.md §1.8, [V]).
        if (
            username == settings.dmdsid
            and settings.sandbox_logins
            and hmac.compare_digest(settings.key.encode(), password.encode())
        ):
            return Principal(account=self.account, login=username, extra=DmdsLogin(campaign_from_subject=True))
        return None

    async def campaign_apikey(self, numid: int) -> str | None:
        response = await self.http.request(
            "campaign_apikey", "GET", wire.WIRE["campaign_apikey"].format(numid=numid), headers=self._headers
        )
        return wire.campaign_apikey(response)

    async def campaign_known(self, numid: int) -> bool:
        """Whether DMDS has this API campaign (cached like credentials; concurrent checks share one lookup)."""
        return await self._known.get(numid, lambda: self._look_up_campaign(numid))

    async def _look_up_campaign(self, numid: int) -> Fresh[bool]:
        known = await self.campaign_apikey(numid) is not None
        return Fresh(known, self.settings.credential_cache_ttl if known else self.settings.negative_cache_ttl)

    # -- acceptance --------------------------------------------------------------------------------

    async def sender_policy(self) -> SenderPolicy:
        return self._policy

    async def prepare(
        self, principal: Principal, message: Message, mail_from: str, rcpt_tos: tuple[str, ...]
    ) -> Submission:
        campaign, subject = campaigns.resolve_campaign(principal, message.subject, message.options)
        unknown = ContentRejected(reply=replies.UNKNOWN_CAMPAIGN.with_text(f"Unknown campaign {campaign}"))
        if self.settings.campaigns and campaign not in self.settings.campaigns:
            raise unknown
        chosen = DmdsLogin.read(principal.extra).campaign_from_subject or campaigns.CAMPAIGN_OPTION in message.options
        if chosen and not await self.campaign_known(campaign):
            # DMDS silently discards mail for an unknown campaign (upstream-apis.md §1.8): refuse it now.
            raise unknown
        if subject != message.subject:
            message = replace(message, subject=subject)
        params = DmdsParams(
            campaign=campaign,
            archive=campaigns.option_flag(message.options, "archive", self.settings.archive),
            batch=(message.options.get("batch") or "").strip() or None,
        )
        return Submission(principal=principal, mail_from=mail_from, rcpt_tos=rcpt_tos, message=message, params=params)

    def notice_params(self, original: ProviderData) -> ProviderData:
        """A notice goes under the message's campaign, in a batch of its own, not archived."""
        return DmdsParams(campaign=DmdsParams.read(original).campaign)

    # -- the return path ---------------------------------------------------------------------------

    def event_source(self) -> EventSource | None:
        return self._event_api()

    def contacts(self) -> Contacts | None:
        return self._event_api()

    def _event_api(self) -> DmdsEvents | None:
        if not self.settings.events.enabled:
            return None
        if self._events is None:
            self._events = DmdsEvents(self.account, self.settings, self.http, self.limiter, self._headers)
        return self._events

    def legs(self, submission: Submission) -> tuple[Leg, ...]:
        return plan_legs(submission.rcpt_tos, submission.message.to, submission.message.cc)

    def plan(self, submission: Submission) -> tuple[Call, ...]:
        return tuple(Call(leg.key, leg.recipients) for leg in self.legs(submission))

    def requests(self, submission: Submission) -> list[dict[str, Any]]:
        """The legs' calls as planned; legs after the first join the first's batch, whose eeid is not known
        before it answers (the key goes in the Authorization header, never in a body)."""
        batch = DmdsParams.read(submission.params).batch
        out = []
        for n, leg in enumerate(self.legs(submission)):
            joins = batch or (None if n == 0 else "(the eeid of the first call)")
            one = len(leg.contacts) == 1
            out.append(
                {
                    "call": leg.key,
                    "method": "POST",
                    "path": wire.WIRE["send_one"] if one else wire.WIRE["send_many"],
                    "body": wire.build_payload(submission, leg, joins, jsonbody.attachment_omitted),
                }
            )
        return out

    # -- delivery ----------------------------------------------------------------------------------

    async def deliver(
        self, submission: Submission, done: Mapping[str, str], before_send: BeforeSend = no_hook
    ) -> Outcome:
        """Legs not in `done`; legs after the first join the first leg's batch (reuse_eeid), so the
        first call must answer before the others can go."""
        outcome = Outcome()
        pending = [leg for leg in self.legs(submission) if leg.key not in done]
        if not pending:
            return outcome
        batch = DmdsParams.read(submission.params).batch or done.get("0") or next(iter(done.values()), None)
        rest = pending
        if batch is None:
            first, rest = pending[0], pending[1:]
            try:
                result = await self.send_leg(submission, first, None, before_send)
            except Deferred as exc:
                outcome.deferred[first.key] = exc
                outcome.skipped.update(leg.key for leg in rest)
                return outcome
            except Rejected as exc:
                outcome.rejected[first.key] = exc
                outcome.skipped.update(leg.key for leg in rest)
                return outcome
            outcome.delivered[first.key] = batch = result.upstream_id
            if result.sent is not None:
                outcome.sent[first.key] = result.sent
        await outcome.record_all({leg.key: self.send_leg(submission, leg, batch, before_send) for leg in rest})
        return outcome

    async def send_leg(
        self, submission: Submission, leg: Leg, batch: str | None, before_send: BeforeSend = no_hook
    ) -> wire.SendResult:
        """One call: send_one_inline for one contact, send_many_inline for several; `batch` joins it to an eeid."""
        path = wire.WIRE["send_one"] if len(leg.contacts) == 1 else wire.WIRE["send_many"]
        content = jsonbody.encode(wire.build_payload(submission, leg, batch))
        await self.limiter.acquire()
        await before_send((leg.key,))
        response = await self.http.request(
            "send_one" if len(leg.contacts) == 1 else "send_many",
            "POST",
            path,
            headers=self._headers,
            content=content,
        )
        try:
            return wire.classify(response)
        except Deferred as exc:
            if response.status == 429:
                await self.limiter.penalize(getattr(exc, "retry_after", None))
            raise
