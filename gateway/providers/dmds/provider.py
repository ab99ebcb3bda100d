"""Planisys DMDS provider: logins (SMTP-API, SMTP-DMDS sandbox style), campaigns, legs in one batch."""

from __future__ import annotations

import functools
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from gateway.config.base import UserSettings
from gateway.core import replies
from gateway.core.cache import AsyncCache, Fresh
from gateway.core.errors import ContentRejected, Deferred
from gateway.core.events import Contacts, EventSource
from gateway.core.model import Call, Message, Principal, ProviderData, Submission
from gateway.core.outcome import BeforeSend, Outcome, no_hook
from gateway.mime import jsonbody
from gateway.ops.metrics import DMDS_SENT_SHORT, FIELDS_NOT_SENT
from gateway.policy import SenderPolicy, ascii_address, ascii_domain
from gateway.providers.base import ProviderBase
from gateway.providers.dmds import campaigns, wire
from gateway.providers.dmds.config import DmdsAccount, DmdsUser
from gateway.providers.dmds.data import DmdsLogin, DmdsParams
from gateway.providers.dmds.events import DmdsEvents
from gateway.providers.dmds.keys import CampaignKeys
from gateway.providers.dmds.legs import Leg, plan_legs
from gateway.upstream.client import HttpClient
from gateway.upstream.ratelimit import RateLimiter, Unlimited
from gateway.upstream.response import HttpResponse
from gateway.upstream.shape import Reading

if TYPE_CHECKING:
    from gateway.providers.checks import AccountCheck

log = structlog.get_logger("gateway.dmds")

# An SMTP-API login is written one way only: ASCII digits without a leading zero, nothing after them (\Z, not $,
# which matches before a final newline). Every per-login key (quota, rate, ledger, logs) is the login's name, so
# a second spelling of one campaign (`acme-023`, `acme-\u0662\u0663` in Arabic-Indic digits, which \d and int()
# accept, `acme-23\n`) would be a login of its own, with a fresh quota and rate, under the same campaign key.
_SMTP_API_LOGIN = re.compile(r"\A(?P<dmdsid>[A-Za-z0-9_.]+)-(?P<numid>0|[1-9][0-9]{0,11})\Z")
# Campaign numids whose existence is remembered (each of known and unknown ones): a client choosing
# campaigns by Subject can name any number.
CAMPAIGNS_CACHED = 10_000


def sender_policy(settings: DmdsAccount) -> SenderPolicy:
    """DMDS' own rule: the registered sender domains, each with its registered return-path."""
    return SenderPolicy(
        domains=frozenset(ascii_domain(d) for d in settings.sender_domains),
        return_paths={ascii_address(rp): ascii_domain(d) for d, rp in settings.sender_domains.items()},
    )


# A message's legs are asked for by its plan, its delivery and its ledger record: the plan of a message with
# few addresses is remembered by them (Leg and Address are frozen), within a bounded map.
_REMEMBERED_ADDRESSES = 16
_remembered_legs = functools.lru_cache(maxsize=1024)(plan_legs)


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
        # Each campaign's apikey as last answered, and the one before it during settings.apikey_grace.
        self._keys = CampaignKeys(settings.apikey_grace, CAMPAIGNS_CACHED, clock)
        # Whether the campaign listing answers in a way the gateway recognises (else campania_apikey does).
        self._listing_usable = True

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
            matched = self._keys.match(numid, key, password) if key is not None else None
            if matched is None:
                return None
            return Principal(
                account=self.account,
                login=f"{settings.dmdsid}-{numid}",  # the one spelling the pattern admits
                extra=DmdsLogin(campaign=numid),
                credential=matched.which,
                credential_expires=matched.expires,
            )
        # <dmdsid> + the account APIKEY, campaign from "[NN]" (upstream-apis.md §1.8, [V]).
        if (
            username == settings.dmdsid
            and settings.sandbox_logins
            and hmac.compare_digest(settings.key.encode(), password.encode())
        ):
            return Principal(account=self.account, login=username, extra=DmdsLogin(campaign_from_subject=True))
        return None

    async def get(self, endpoint: str, path: str, content: bytes | None = None, method: str = "GET") -> HttpResponse:
        """A read-only call with the account APIKEY (`endpoint`: its name in the metrics; `method`: another
        verb where a read-only call's is a guess, as ver_eventos')."""
        return await self.http.request(endpoint, method, path, headers=self._headers, content=content)

    async def campaign_apikey(self, numid: int, reading: Reading | None = None) -> str | None:
        """The campaign's apikey (campania_apikey), or None when DMDS has no such API campaign."""
        reading = reading if reading is not None else Reading()
        response = await self.get("campaign_apikey", wire.WIRE["campaign_apikey"].format(numid=numid))
        key = wire.campaign_apikey(response, reading)
        log.debug(
            "dmds_campaign_apikey", account=self.account, campaign=numid, found=key is not None, read=reading.describe()
        )
        return key

    async def campaigns_listed(self, numid: int | None = None, reading: Reading | None = None) -> frozenset[int]:
        """The API campaigns the campaign listing names (one, or all); wire.ListingUnusable when it cannot say."""
        return wire.campaign_listing(await self.get("campaigns", *wire.listing_request(numid)), reading)

    async def campaign_known(self, numid: int) -> bool:
        """Whether DMDS has this API campaign (cached like credentials; concurrent checks share one lookup)."""
        return await self._known.get(numid, lambda: self._look_up_campaign(numid))

    async def _look_up_campaign(self, numid: int) -> Fresh[bool]:
        """The campaign listing says whether the campaign exists; when it cannot (no such path, an answer
        not recognised), campania_apikey answers instead, from then on (said once, at warning level)."""
        via = "campania_apikey"
        reading = Reading()
        known: bool | None = None
        if self._listing_usable:
            try:
                known = numid in await self.campaigns_listed(numid, reading)
                via = "listing"
            except wire.ListingUnusable as exc:
                if self._listing_usable:  # said once, whichever concurrent lookup learnt it first
                    self._listing_usable = False
                    log.warning("dmds_campaign_listing_unusable", account=self.account, reason=str(exc), instead=via)
        if known is None:
            known = await self.campaign_apikey(numid, reading) is not None
        log.debug(
            "dmds_campaign_checked", account=self.account, campaign=numid, known=known, via=via, read=reading.describe()
        )
        return Fresh(known, self.settings.credential_cache_ttl if known else self.settings.negative_cache_ttl)

    async def check_upstream(self) -> AccountCheck:
        """Harmless read-only calls against DMDS (smtp-gateway check-upstream)."""
        from gateway.providers.dmds.check import check_account

        return await check_account(self)

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
            batch=campaigns.batch_option(message.options),
            one_contact_per_call=message.reply_to is not None,
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
        one_each = DmdsParams.read(submission.params).one_contact_per_call
        rcpt_tos, to, cc = tuple(submission.rcpt_tos), submission.message.to, submission.message.cc
        if len(rcpt_tos) + len(to) + len(cc) <= _REMEMBERED_ADDRESSES:
            return _remembered_legs(rcpt_tos, to, cc, one_each)
        return plan_legs(rcpt_tos, to, cc, one_each)

    def plan(self, submission: Submission) -> tuple[Call, ...]:
        return tuple(Call(leg.key, leg.recipients) for leg in self.legs(submission))

    def requests(self, submission: Submission, *, bodies: bool = True) -> list[dict[str, Any]]:
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
                    "body": wire.build_payload(submission, leg, joins, jsonbody.attachment_omitted, bodies=bodies),
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
            # Recorded as any call is (a bug in it goes in outcome.failed, never raised past the outcome).
            await outcome.record_all({first.key: self.send_leg(submission, first, None, before_send)})
            if first.key not in outcome.delivered:
                outcome.skipped.update(leg.key for leg in rest)
                return outcome
            batch = outcome.delivered[first.key]
        await outcome.record_all({leg.key: self.send_leg(submission, leg, batch, before_send) for leg in rest})
        return outcome

    async def send_leg(
        self, submission: Submission, leg: Leg, batch: str | None, before_send: BeforeSend = no_hook
    ) -> wire.SendResult:
        """One call: send_one_inline for one contact, send_many_inline for several; `batch` joins it to an eeid.
        DMDS' `sent` (mails the call sent, copies included) is returned with the eeid; fewer than the call's
        recipients is logged and counted (DMDS sends nothing to an address it holds invalid [V])."""
        one = len(leg.contacts) == 1
        if not one and submission.message.reply_to is not None:
            # Queued before such messages got one call per contact: reply-to is for send_one calls only [S].
            FIELDS_NOT_SENT.labels(account=self.account, field="reply_to").inc()

        def content() -> bytes | jsonbody.Body:
            # Built once this call holds a connection (gateway/upstream/client.py), after the limiter and the
            # connection wait, not when deliver starts the legs after the first: each body is a copy of the
            # HTML, and a message with a Reply-To makes one call per To contact (docs/messages.md). The same
            # submission, leg and batch give the same bytes at each try (a repeat after a crash or a lost lease).
            return jsonbody.encode(wire.build_payload(submission, leg, batch))

        async def sending() -> None:  # once a connection is free too: right before the request goes
            await before_send((leg.key,))

        response = await self.http.request(
            "send_one" if one else "send_many",
            "POST",
            wire.WIRE["send_one"] if one else wire.WIRE["send_many"],
            headers=self._headers,
            content=content,
            before_send=sending,
            limiter=self.limiter,  # its slot once a connection is free (gateway/upstream/client.py)
        )
        try:
            result = wire.classify(response)
        except Deferred as exc:
            if response.status == 429:
                await self.limiter.penalize(getattr(exc, "retry_after", None))
            raise
        recipients = len(leg.recipients)
        if result.sent is not None and result.sent < recipients:
            DMDS_SENT_SHORT.labels(account=self.account).inc()
            log.warning(
                "dmds_sent_fewer_than_recipients",
                account=self.account,
                call=leg.key,
                eeid=result.upstream_id,
                sent=result.sent,
                recipients=recipients,
            )
        return result
