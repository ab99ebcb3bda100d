"""Delivery status notices (RFC 3464) to the senders of messages whose recipients bounced hard, were reported
not sent, or became dead letters.

Each failed recipient has one decision row (ledger_notices), written with what made it fail: a poll's
events, a dead letter's rows. An instance leases the pending decisions, decides each message's at once and
records the decision with its timeline rows; an instance that stops mid-decision leaves its lease to
expire, and another takes the decision over. A notice is built (gateway/ledger/dsn.py), parsed by the
gateway's own MIME parser and handed to the delivery owner as a new message of the same account and login
(queued, retried and recorded like any other; its ledger record names the message it is about), under an
idempotency key of its message and recipients, so a decision taken over after the notice was handed on is
answered with the first one's id instead of sending it twice.

No notice: for a null sender or about a notice (no loops: a notice's own failures never make one), when
nobody is to be told (`notify = "off"`), to a suppressed address, past the per-sender limit, for recipients
an operator deleted, for a message held as ambiguous (it may have been delivered), for a message whose
record was rebuilt from a queue row without a notice's data (its accepting instance died before writing the
record, and the row was stored, or claimed, by a version before the queue kept that data). A record rebuilt
from a newer row has the notice data the accepting instance would have written, or says nobody is to be
told (gateway/ledger/notice.py `rebuilt`, `NOBODY`).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from gateway import mime
from gateway.config import Settings
from gateway.core.errors import ContentRejected
from gateway.core.model import Origin, Principal, Receipt, StoredData, Submission
from gateway.core.waits import woken
from gateway.delivery.owner import DeliveryOwner
from gateway.ledger import dsn, model, notice
from gateway.ledger.model import EventRow, Record, address_key
from gateway.ledger.notice import NoticeData
from gateway.ledger.returns import Claim, ReturnStore
from gateway.ledger.store import LedgerUnavailable
from gateway.ledger.suppression import SuppressionSet
from gateway.ops.metrics import INTERNAL_ERRORS, NOTICES
from gateway.providers.base import Provider

log = structlog.get_logger("gateway.notices")

LEASE = 120.0
BATCH = 50
RETRY_LATER = 60.0  # a notice the queue could not take now (4xx): looked at again after this
LISTENER = "notice"  # the ledger record's listener: made by the gateway itself


@dataclass(frozen=True, slots=True)
class Decision:
    """`result`: the metric's label; `state`: the decision row's (sent, skipped, failed); `words`: why."""

    result: str
    state: str
    words: str


SKIP = {
    "null_sender": "the message had a null sender",
    "notice": "the message is itself a notice (notices never make notices)",
    "notify_off": "nobody is to be told (notify = off)",
    "no_data": "the message's record has no notice data",
    "rebuilt": "its record was rebuilt from the queue (the accepting instance died before writing it): "
    "its queue row was without what a notice needs (stored, or claimed, by a version before the queue kept it)",
    "suppressed": "the address to tell is suppressed",
    "rate_limited": "the sender got its limit of notices in this window",
    "deleted": "an operator deleted it",
    "held": "it was held as ambiguous (it may have been delivered)",
    "no_account": "its account is no longer configured",
    "no_longer_failed": model.NO_LONGER_FAILED,
}
# The states a notice tells of: a recipient in any other state at decision time (a newer Delivered overruled
# its bounce, an operator requeued its dead letter and it is under way or delivered) is not told as failed.
FAILED_STATES = frozenset({"bounced", "not_sent", "dead"})


def _skip(result: str) -> Decision:
    return Decision(result, "skipped", SKIP[result])


class NoticeSender:
    def __init__(
        self,
        returns: ReturnStore,
        owner: DeliveryOwner,
        providers: Callable[[], Mapping[str, Provider]],
        settings: Callable[[], Settings],
        suppressions: SuppressionSet,
        *,
        actor: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.returns = returns
        self.owner = owner
        self.providers = providers
        self.settings = settings
        self.suppressions = suppressions
        self.actor = actor
        self.clock = clock
        self.wakeup = asyncio.Event()
        self._failing: str | None = None

    async def run(self) -> None:
        while True:
            try:
                while await self.round() >= BATCH:
                    pass
                if self._failing is not None:
                    log.info("notices_recovered")
                    self._failing = None
            except LedgerUnavailable as exc:
                if self._failing is None:
                    log.error("notices_unavailable", error=exc.reason, effect="notices wait")
                self._failing = exc.reason
            except Exception as exc:  # a bug: once with its traceback; the loop goes on
                INTERNAL_ERRORS.labels(where="notices").inc()
                log.error("notices_internal_error", exc_info=exc)
            await woken(self.wakeup, self.settings().return_path.poll_interval)

    async def round(self) -> int:
        """Decide what is pending now, one message at a time; returns how many decisions were leased."""
        claims = await self.returns.claim_notices(self.actor, self.clock(), LEASE, BATCH)
        by_message: dict[str, list[Claim]] = {}
        for claim in claims:
            by_message.setdefault(claim.msg_id, []).append(claim)
        for msg_id, group in by_message.items():
            await self.decide(msg_id, group)
        return len(claims)

    async def _send_or_fail(
        self, record: Record, data: NoticeData, recipients: Sequence[model.Recipient]
    ) -> tuple[Decision | None, str | None]:
        """_send, where a bug fails this notice for good (logged once with its traceback, counted): retried, it
        would come back at every lease, first in each batch, and hold up the notices claimed with it."""
        try:
            return await self._send(record, data, recipients)
        except LedgerUnavailable:
            raise
        except Exception as exc:
            INTERNAL_ERRORS.labels(where="notices").inc()
            log.error("notice_internal_error", queue_id=record.id, exc_info=exc)
            return Decision("failed", "failed", "the notice could not be made (an internal error, logged)"), None

    async def decide(self, msg_id: str, claims: Sequence[Claim]) -> None:
        found = await self.returns.notice_data(msg_id)
        record, text = found if found is not None else (None, None)
        rcpts = {c.rcpt for c in claims}
        claimed = [r for r in record.recipients if address_key(r.address) in rcpts] if record else []
        # Decided against each recipient's state now, not when it failed: one no longer failed is left out
        # of the notice, and its decision is recorded skipped (its sender is told nothing about it).
        recipients = [r for r in claimed if r.state in FAILED_STATES]
        settled = [r for r in claimed if r.state not in FAILED_STATES]
        if settled and record is not None and await self.returns.notice_counted(_key(record, claimed), self.clock()):
            # A decision taken over after its notice was handed to the queue (counted under its key), its
            # recipients requeued since: the notice went out, so it is recorded sent (review today6a F4).
            recipients, settled = claimed, []
        if settled:
            keys = {address_key(r.address) for r in settled}
            await self._finish(
                msg_id, record, [c for c in claims if c.rcpt in keys], settled, _skip("no_longer_failed"), None, None
            )
            claims = [c for c in claims if c.rcpt not in keys]
            if not claims:
                return
        decision, notice_id, data = self._rules(record, text, recipients)
        if decision is None and record is not None and data is not None:
            decision, notice_id = await self._send_or_fail(record, data, recipients)
        if decision is None:  # the queue cannot take it now: later
            await self.returns.postpone_notices(claims, self.clock() + RETRY_LATER, "the delivery owner was busy")
            return
        await self._finish(msg_id, record, claims, recipients, decision, notice_id, data)

    async def _finish(
        self,
        msg_id: str,
        record: Record | None,
        claims: Sequence[Claim],
        recipients: Sequence[model.Recipient],
        decision: Decision,
        notice_id: str | None,
        data: NoticeData | None,
    ) -> None:
        """Record the decision for these claims, with a timeline row per recipient, counted and logged."""
        account = record.account if record is not None else ""
        now = self.clock()
        kind = model.DSN_SENT if decision.state == "sent" else model.DSN_SKIPPED
        # A timeline row's id is what makes it once (a decision recorded again after a takeover writes the same
        # row). A decision skipped as no_longer_failed is reopened when its recipient fails again (sql
        # notice_insert): its row's id takes the lease's token, so the later decision's row is a row of its own
        # and not dropped as one already written.
        tokens = {c.rcpt: c.token for c in claims}
        again = decision.result == "no_longer_failed"
        rows = [
            EventRow(
                f"{msg_id}.notice.{address_key(r.address)}"
                + (f".{tokens.get(address_key(r.address), 0)}" if again else ""),
                msg_id,
                record.created if record else now,
                now,
                kind,
                recipient=r.address,
                detail=decision.words,
                actor=self.actor,
                data=model.json({"notice": notice_id, "to": data.to if data else None, "result": decision.result}),
            )
            for r in recipients
        ]
        await self.returns.finish_notices(claims, decision.state, now, notice_id, decision.words, rows)
        NOTICES.labels(account=account or "unknown", result=decision.result).inc()
        log.info(
            "notice_decided",
            queue_id=msg_id,
            result=decision.result,
            recipients=[r.address for r in recipients],
            to=data.to if data and decision.state == "sent" else None,
            notice=notice_id,
        )

    def _rules(
        self, record: Record | None, text: str | None, recipients: Sequence[model.Recipient]
    ) -> tuple[Decision | None, str | None, NoticeData | None]:
        """A decision not to send (with its reason), or None and the notice's data: send it."""
        if record is None or not recipients:
            return _skip("no_data"), None, None
        if record.dsn_of is not None:
            return _skip("notice"), None, None
        if not record.mail_from:
            return _skip("null_sender"), None, None
        if text is None:
            # No reply: the record is the one a claiming instance wrote from what the queue holds, and its
            # queue row had no notice data (stored, or claimed, by a version before the queue kept whom to
            # tell and the header block: a newer one's record has them, or notice.NOBODY when nobody would
            # be told, notice.rebuilt); nobody chose `notify = off`.
            return _skip("notify_off" if record.reply else "rebuilt"), None, None
        if notice.nobody(text):
            return _skip("notify_off"), None, None  # rebuilt from a row whose accepting instance told nobody
        try:
            data = NoticeData.read(text)
        except ValueError:
            return _skip("no_data"), None, None
        if all(r.reason in model.DELETED_REASONS for r in recipients):
            return _skip("deleted"), None, data
        causes = [e.data.get("cause") for e in record.events if e.kind == model.DEAD_LETTERED and e.data]
        if causes and causes[-1] == "held" and all(r.state == "dead" for r in recipients):
            return _skip("held"), None, data
        settings = self.settings()
        if record.account not in settings.accounts or record.account not in self.providers():
            return _skip("no_account"), None, data
        if self.suppressions.check(record.account, data.to) is not None:
            return _skip("suppressed"), None, data
        return None, None, data

    async def _send(
        self, record: Record, data: NoticeData, recipients: Sequence[model.Recipient]
    ) -> tuple[Decision | None, str | None]:
        settings = self.settings()
        account = settings.accounts[record.account]
        provider = self.providers()[record.account]
        now = self.clock()
        failures = [_failure(record, r) for r in recipients if r.reason not in model.DELETED_REASONS]
        domain = account.dsn.from_domain or _domain(account.return_paths(), data.from_address or record.mail_from)
        local = secrets.token_hex(8).upper()
        raw = dsn.build(
            original=dsn.Original(record.id, record.created, data.headers, record.subject, record.message_id),
            failures=failures,
            reporting_mta=settings.hostname,
            sender=f"MAILER-DAEMON@{domain}",
            to=data.to,
            now=now,
            message_id=f"dsn.{local}.{record.id}@{settings.hostname}",
        )
        try:
            message = mime.parse(raw)
        except ContentRejected as exc:  # our own bytes: a bug if it ever happens
            return Decision("failed", "failed", f"the notice could not be parsed: {exc.reason}"), None
        principal = Principal(
            account=record.account, login=data.login or record.login or "", extra=StoredData(data.extra)
        )
        submission = Submission(
            principal=principal,
            mail_from="",
            rcpt_tos=(data.to,),
            message=message,
            params=provider.notice_params(StoredData(data.params)),
        )
        plan = provider.plan(submission)
        key = _key(record, recipients)
        # Counted once the notice exists: one that cannot be made takes nothing from the sender's limit. Counted
        # by its key: a decision taken over after the notice was handed to the queue (its instance killed, or
        # the database failing, before the decision was recorded) finds the count, hands the notice again and
        # is answered with the first one's id (recorded sent, not rate_limited; counted once).
        to = address_key(data.to)
        if not await self.returns.count_notice(
            key, record.account, to, account.dsn.window, account.dsn.per_sender, now
        ):
            return _skip("rate_limited"), None
        receipt = Receipt()
        origin = Origin(listener=LISTENER, peer="", size=len(raw), dsn_of=record.id)
        reply = await self.owner.submit(
            submission, plan, log.bind(notice_of=record.id, account=record.account), key, receipt, origin=origin
        )
        if reply.code == 250:
            notice_id = reply.text.rsplit(" ", 1)[-1]
            return Decision("sent", "sent", f"a notice ({notice_id}) went to {data.to}"), notice_id
        if reply.code >= 500:
            return Decision("failed", "failed", f"the notice was refused: {reply}"), None
        # Not handed over (the queue was busy): the count taken for it goes back, or each retry a minute
        # later would take another until the per-sender limit skipped a notice never sent.
        await self.returns.uncount_notice(key)
        log.warning("notice_deferred", queue_id=record.id, reply=str(reply), reason=receipt.reason)
        return None, None


def _key(record: Record, recipients: Sequence[model.Recipient]) -> str:
    """The notice's idempotency key (the queue's, and its count's): one per message and set of recipients."""
    addresses = ",".join(sorted(address_key(r.address) for r in recipients))
    return "notice:" + hashlib.sha256(f"{record.id}\0{addresses}".encode()).hexdigest()[:32]


def _failure(record: Record, r: model.Recipient) -> dsn.Failure:
    how: str = r.state
    if r.state == "dead":
        causes = [e.data.get("cause") for e in record.events if e.kind == model.DEAD_LETTERED and e.data]
        how = str(causes[-1]) if causes else "refused"
    detail = r.reason or ("the upstream reported it" if r.state != "dead" else "it could not be delivered")
    return dsn.Failure(r.address, how, detail, r.at)


def _domain(return_paths: Mapping[str, str], sender: str) -> str:
    """The domain of the return path the account registered for the sender's domain, else that domain."""
    domain = sender.rpartition("@")[2].lower()
    registered = return_paths.get(domain)
    return registered.rpartition("@")[2].lower() if registered and "@" in registered else domain
