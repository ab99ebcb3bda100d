"""accept(): a message's way from the end of DATA to a reply: parse, policy, plan, deliver or spool."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Protocol

import structlog

from gateway import campaigns, mime, policy, replies
from gateway.delivery import Delivery, Outcome
from gateway.dns import DnsResolver, DnsTemporaryError
from gateway.errors import (
    ContentRejected,
    Deferred,
    DnsTempFailure,
    GatewayError,
    PolicyRejected,
    Rejected,
    SpoolUnavailable,
)
from gateway.model import Principal, Submission
from gateway.observability import MESSAGES
from gateway.recipients import plan_legs
from gateway.replies import Reply
from gateway.settings import Settings

log = structlog.get_logger("gateway.pipeline")
MESSAGES_BY_CLASS = {cls: MESSAGES.labels(result=f"{cls}xx") for cls in (2, 4, 5)}

# Parsing a large message takes milliseconds of CPU: do it off the event loop (design invariant 6).
PARSE_IN_THREAD_BYTES = 256 * 1024
# Two parser threads: one per core. Parsing holds the GIL, so more threads add no speed, only more
# parse trees in memory at once (a 1 MB message's compat32 tree is several MB) and malloc arenas.
_PARSER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mime-parse")

CampaignCheck = Callable[[str, int], Awaitable[bool]]


class Spool(Protocol):
    """Durable store for accepted messages the upstream could not take yet (gateway/spool/)."""

    async def enqueue(
        self, submission: Submission, outcome: Outcome, inflight: Awaitable[Outcome] | None = None
    ) -> str:
        """Persist (fsync'd) the legs not yet delivered; return the local queue id. Raises SpoolUnavailable.

        `inflight`: the upstream call still running for the legs not in `outcome`; the spool records its
        result when it finishes (delivered legs are never sent again)."""
        ...


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        delivery: Delivery,
        campaign_known: CampaignCheck,
        spool: Spool | None = None,
        resolver: DnsResolver | None = None,
    ) -> None:
        self.resolver = resolver
        self.settings = settings
        self.delivery = delivery
        self.campaign_known = campaign_known
        self.spool = spool
        self.accounts = settings.accounts

    # -- SMTP phases -------------------------------------------------------------------------------

    async def check_sender(self, principal: Principal, address: str, smtputf8: bool) -> str:
        normalized = policy.check_sender(self.accounts[principal.account], principal, address, smtputf8)
        if self.resolver is not None and self.settings.dns.check_sender_domain:
            await self._domain_must_exist(normalized, replies.SENDER_DOMAIN_UNKNOWN)
        return normalized

    async def check_recipient(self, principal: Principal, address: str, smtputf8: bool) -> str:
        normalized = policy.check_recipient(address, smtputf8)
        if self.resolver is not None and self.settings.dns.check_recipient_domains:
            await self._domain_must_exist(normalized, replies.RECIPIENT_DOMAIN_UNKNOWN)
        return normalized

    async def _domain_must_exist(self, address: str, refusal: Reply) -> None:
        assert self.resolver is not None
        domain = policy.domain_of(address)
        try:
            exists = await self.resolver.domain_exists(domain)
        except DnsTemporaryError as exc:
            raise DnsTempFailure(reply=replies.DNS_TEMPFAIL.with_text(
                f"<{address}>: DNS lookup of {domain} failed temporarily ({exc}); try again later"
            )) from None
        if not exists:
            # DMDS' own wording ("The domain name escuelaxyz.com does not exist.").
            raise PolicyRejected(reply=refusal.with_text(f"<{address}>: The domain name {domain} does not exist."))

    async def accept(
        self, principal: Principal, mail_from: str, rcpt_tos: list[str], raw: bytes | bytearray, smtputf8: bool
    ) -> Reply:
        """The reply to the end of DATA. Never raises: unexpected errors become 451 4.3.0."""
        bound = log.bind(login=principal.login, account=principal.account, size=len(raw), rcpts=len(rcpt_tos))
        try:
            submission = await self.prepare(principal, mail_from, rcpt_tos, raw, smtputf8)
            reply = await self.deliver(submission, bound)
        except Rejected as exc:
            bound.info("message_rejected", reply=str(exc.reply))
            reply = exc.reply
        except Deferred as exc:
            bound.warning("message_deferred", reply=str(exc.reply), reason=exc.reason)
            reply = exc.reply
        except GatewayError as exc:
            bound.error("message_failed", reply=str(exc.reply), reason=exc.reason)
            reply = exc.reply
        MESSAGES_BY_CLASS[reply.code // 100].inc()
        return reply

    async def prepare(
        self, principal: Principal, mail_from: str, rcpt_tos: list[str], raw: bytes | bytearray, smtputf8: bool
    ) -> Submission:
        account = self.accounts[principal.account]
        if len(raw) > PARSE_IN_THREAD_BYTES or mime.expensive(raw):
            message = await asyncio.get_running_loop().run_in_executor(_PARSER, mime.parse, raw)
        else:
            message = mime.parse(raw)
        if isinstance(raw, bytearray):
            # Everything the call needs is in `message` now; release the raw copy (the session's
            # envelope and the callers' frames still point at this buffer, not at its contents).
            raw.clear()
        campaign, subject = campaigns.resolve_campaign(principal, message.subject, message.options)
        if account.campaigns and campaign not in account.campaigns:
            raise ContentRejected(reply=replies.UNKNOWN_CAMPAIGN.with_text(f"Unknown campaign {campaign}"))
        if (principal.campaign_from_subject or "campaign" in message.options) and not await self.campaign_known(
            principal.account, campaign
        ):
            raise ContentRejected(reply=replies.UNKNOWN_CAMPAIGN.with_text(f"Unknown campaign {campaign}"))
        if subject != message.subject:
            message = replace(message, subject=subject)
        message = policy.apply_from_policy(account, principal, message, mail_from, smtputf8)
        legs = plan_legs(rcpt_tos, message.to, message.cc)
        if not legs:
            raise ContentRejected(reply=replies.NO_VALID_RECIPIENTS)
        return Submission(
            principal=principal,
            mail_from=mail_from,
            rcpt_tos=tuple(rcpt_tos),
            message=message,
            campaign=campaign,
            legs=legs,
            archive=campaigns.option_flag(message.options, "archive", account.archive),
            batch_eeid=(message.options.get("batch") or "").strip() or None,
        )

    async def deliver(self, submission: Submission, bound: structlog.BoundLogger) -> Reply:
        """Inline within the budget; past it, the running call is not cancelled (that would make a duplicate
        likely on retry) but spooled as in flight and left to finish in the background."""
        budget = self.settings.delivery.inline_budget
        call = asyncio.ensure_future(self.delivery.attempt(submission))
        done, _ = await asyncio.wait({call}, timeout=budget)
        if call in done:
            return await self.conclude(submission, call.result(), bound)
        slow = Deferred("upstream did not answer within the inline budget")
        if self.spool is None or self.settings.delivery.mode == "passthrough":
            call.cancel()
            raise slow
        try:
            local_id = await self.spool.enqueue(submission, Outcome(), inflight=call)
        except SpoolUnavailable:
            # Cannot store it: the running call's answer is all there is. Wait for it (bounded by the HTTP timeout).
            try:
                outcome = await call
            except Exception:
                raise SpoolUnavailable("spool not writable and upstream slow") from None
            if outcome.complete and not outcome.rejected:
                return await self.conclude(submission, outcome, bound)
            raise
        bound.info("message_spooled", queue_id=local_id, inflight=True, reason=slow.reason)
        return replies.queued(local_id)

    async def conclude(self, submission: Submission, outcome: Outcome, bound: structlog.BoundLogger) -> Reply:
        if outcome.rejected and not outcome.delivered:
            raise next(iter(outcome.rejected.values()))
        if outcome.complete and not outcome.rejected:
            first = outcome.first_id
            assert first is not None
            bound.info("message_sent", upstream_id=first, legs=len(submission.legs), campaign=submission.campaign)
            return replies.queued(first)
        passthrough = self.settings.delivery.mode == "passthrough"
        if self.spool is None or (passthrough and not outcome.delivered):
            raise next(iter(outcome.deferred.values()))
        try:
            local_id = await self.spool.enqueue(submission, outcome)
        except SpoolUnavailable:
            if outcome.delivered:
                bound.error("spool_unavailable_partial_delivery", delivered=sorted(outcome.delivered))
            raise
        first = outcome.first_id or local_id
        bound.info(
            "message_spooled", queue_id=local_id, upstream_id=outcome.first_id,
            delivered=sorted(outcome.delivered), deferred=sorted(outcome.deferred),
        )
        return replies.queued(first)

