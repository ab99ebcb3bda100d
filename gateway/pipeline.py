"""accept(): a message's way from the end of DATA to a reply: parse, provider, policy, plan, delivery owner."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import structlog

from gateway import mime, policy
from gateway.config import Settings
from gateway.core import replies
from gateway.core.errors import (
    ContentRejected,
    Deferred,
    DnsTempFailure,
    GatewayError,
    PolicyRejected,
    Rejected,
    SpillFailed,
)
from gateway.core.model import Call, Message, Origin, Principal, Receipt, Submission
from gateway.core.replies import Reply
from gateway.core.spill import SpillMap
from gateway.delivery import idempotency, testmode
from gateway.delivery.owner import DeliveryOwner
from gateway.ledger import notice
from gateway.ledger.model import iso
from gateway.ledger.suppression import SuppressionSet
from gateway.limits.budget import Reservation
from gateway.mime.headers import header_block
from gateway.ops.metrics import (
    FIELDS_NOT_SENT,
    INTERNAL_ERRORS,
    LIMIT_HITS,
    MESSAGES_REPAIRED,
    SPILL_FAILURES,
    SUPPRESSED_RECIPIENTS,
)
from gateway.policy.dns import DnsResolver, DnsTemporaryError
from gateway.providers.base import Provider

log = structlog.get_logger("gateway.pipeline")

# Parsing a large message takes milliseconds of CPU: do it off the event loop.
PARSE_IN_THREAD_BYTES = 256 * 1024
# Two parser threads: one per core. Parsing holds the GIL, so more threads add no speed, only more
# parse trees in memory at once (a 1 MB message's compat32 tree is several MB) and malloc arenas.
# Attachments this large travel as base64 text from the parser thread on (model.Attachment.b64).
CARRY_MIN = 64 * 1024
_PARSER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mime-parse")


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        owner: DeliveryOwner,
        resolver: DnsResolver | None = None,
        suppressions: SuppressionSet | None = None,
    ) -> None:
        self.resolver = resolver
        self.settings = settings
        self.providers = providers
        self.owner = owner
        self.suppressions = suppressions
        # Whom each configured login's notices go to (`notify`, else its account's); other logins: the account's.
        self._notify = {
            (name, user.username): user.notify or account.dsn.notify
            for name, account in settings.accounts.items()
            for user in account.configured_users
        }
        # Where test-mode messages' requests are recorded besides the log (the message ledger).

    # -- SMTP phases -------------------------------------------------------------------------------

    async def check_sender(self, principal: Principal, address: str, smtputf8: bool) -> str:
        senders = await self.providers[principal.account].sender_policy()
        normalized = policy.check_sender(senders, principal, address, smtputf8)
        if self.resolver is not None and self.settings.dns.check_sender_domain:
            await self._domain_must_exist(normalized, replies.SENDER_DOMAIN_UNKNOWN)
        return normalized

    async def check_recipient(self, principal: Principal, address: str, smtputf8: bool) -> str:
        normalized = policy.check_recipient(address, smtputf8)
        if self.suppressions is not None and self.settings.accounts[principal.account].suppress_recipients:
            # The in-memory copy: no database round trip on RCPT.
            hit = self.suppressions.check(principal.account, normalized)
            if hit is not None:
                SUPPRESSED_RECIPIENTS.labels(account=principal.account).inc()
                raise PolicyRejected(
                    f"suppressed ({hit.source})",
                    reply=replies.recipient_suppressed(normalized, hit.reason, iso(hit.created)[:10]),
                )
        if self.resolver is not None and self.settings.dns.check_recipient_domains:
            await self._domain_must_exist(normalized, replies.RECIPIENT_DOMAIN_UNKNOWN)
        return normalized

    async def _domain_must_exist(self, address: str, refusal: Reply) -> None:
        assert self.resolver is not None
        domain = policy.domain_of(address)
        try:
            exists = await self.resolver.domain_exists(domain)
        except DnsTemporaryError as exc:
            # The reply quotes the gateway's words only; dnspython's (exc.detail) go to the log with the reason.
            raise DnsTempFailure(
                f"{exc} ({exc.detail})" if exc.detail else str(exc),
                reply=replies.DNS_TEMPFAIL.with_text(
                    f"<{address}>: DNS lookup of {domain} failed temporarily ({exc}); try again later"
                ),
            ) from None
        if not exists:
            # DMDS' own wording ("The domain name escuelaxyz.com does not exist.").
            raise PolicyRejected(reply=refusal.with_text(f"<{address}>: The domain name {domain} does not exist."))

    async def accept(
        self,
        principal: Principal,
        mail_from: str,
        rcpt_tos: list[str],
        raw: bytes | bytearray | SpillMap,
        smtputf8: bool,
        receipt: Receipt | None = None,
        reservation: Reservation | None = None,
        origin: Origin | None = None,
        test_mode: bool = False,
        drop_invalid_header_addresses: bool = False,
        on_gone: Callable[[Reply | None], None] | None = None,
    ) -> Reply:
        """The reply to the end of DATA. Never raises: unexpected errors become 451 4.3.0.

        `raw`: a SpillMap when DATA went to a file (gateway/core/spill.py), discarded when the first attempt
        has ended. `receipt` learns what became of the message (queue id, upstream ids, or why not) for the one
        log line the SMTP session writes per transaction. `reservation`: the message's share of the
        large-message budget, released when its first attempt has ended. `origin`: the listener and client,
        for the message's ledger record. `test_mode`: everything but the upstream call
        (gateway/delivery/testmode.py). `drop_invalid_header_addresses`: the listener's choice for invalid
        To/Cc addresses that are not recipients (left out, not refused). `on_gone`: when the client leaves before
        the reply (the task is cancelled), called once: with the reply the message's first attempt decided, or
        None when nothing was sent (gone before the message was handed to the delivery owner)."""
        # A spilled message is this call's from here (the SMTP hook no longer discards it): whatever happens
        # below, the finally clause discards it unless the delivery owner took it over.
        spill = raw if isinstance(raw, SpillMap) else None
        receipt = receipt if receipt is not None else Receipt()
        bound = log.bind(login=principal.login, account=principal.account, size=len(raw), rcpts=len(rcpt_tos))
        handed = False  # to the owner, which then answers on_gone itself
        try:
            account = self.settings.accounts[principal.account]
            setting = self._notify.get((principal.account, principal.login), account.dsn.notify)
            notify = notice.target(setting, mail_from)
            # A notice quotes the header block as received; kept only when a notice could be sent.
            headers = header_block(raw) if notify is not None else None
            origin = replace(origin or Origin(), size=len(raw), notify=notify, headers=headers)
            submission, plan = await self.prepare(
                principal, mail_from, rcpt_tos, raw, smtputf8, drop_invalid_header_addresses, reservation
            )
            if submission.message.defects:
                # Repaired or sent as it arrived (never upstream in these words): for the operator to see.
                bound.warning("message_repaired", defects=list(submission.message.defects))
                for kind in sorted({defect.partition(":")[0] for defect in submission.message.defects}):
                    MESSAGES_REPAIRED.labels(account=principal.account, defect=kind).inc()
            if test_mode:
                requests = self.providers[principal.account].requests(submission)
                return testmode.accept(requests, submission, bound, receipt, self._test_recorder(origin))
            key = idempotency.key_of(submission, account.idempotency_from_message_id)
            digest = None if key is None else await _digest(submission)
            if spill is not None:
                # Parsed and hashed: what the call needs of the file is read again only while it is sent.
                spill.release_pages()
            handed = True
            # From here the owner releases the share and the spill file, when the first attempt has ended:
            # also when this task is cancelled meanwhile (the client gone after its final dot), since the
            # attempt goes on and still holds the message (the finally below must not free them then).
            done, reservation, spill = _ended(reservation, spill), None, None
            reply = await self.owner.submit(
                submission,
                plan,
                bound,
                key,
                receipt,
                on_done=done,
                origin=origin,
                digest=digest,
                on_gone=on_gone,
                # This session's provider, kept if a reload replaces or removes the account meanwhile.
                provider=self.providers[principal.account],
            )
        except asyncio.CancelledError:
            if on_gone is not None and not handed:
                on_gone(None)  # the client left before its message was handed over: nothing is sent
            raise
        except SpillFailed as exc:
            # As a spill file that cannot take DATA (gateway/smtp/protocol.py): the same reply, counter and event.
            SPILL_FAILURES.inc()
            bound.error("data_spill_failed", directory=exc.directory, error=exc.error)
            receipt.reason = exc.reason
            reply = exc.reply
        except (Rejected, Deferred) as exc:
            receipt.reason = exc.reason
            reply = exc.reply
        except GatewayError as exc:
            bound.error("message_failed", reply=str(exc.reply), reason=exc.reason)
            receipt.reason = exc.reason
            reply = exc.reply
        except Exception as exc:
            INTERNAL_ERRORS.labels(where="accept").inc()
            # A bug (in MIME parsing, a provider's prepare, ...): once with its traceback; the client gets 451.
            bound.error("message_internal_error", error_type=type(exc).__name__, exc_info=exc)
            receipt.reason = "internal error (logged as message_internal_error)"
            reply = replies.INTERNAL_ERROR
        finally:
            if reservation is not None:  # refused before the owner took it (or a test message: never sent)
                reservation.release()
            if spill is not None:
                spill.discard()
        return reply

    def _test_recorder(self, origin: Origin) -> testmode.TestRecorder:
        """A test message's record in the ledger: the requests it would have sent, its TEST- reply."""

        def record(test_id: str, submission: Submission, requests: list[dict[str, Any]]) -> None:
            reply = str(replies.queued(test_id))
            self.owner.ledger.test_message(
                msg_id=test_id, submission=submission, origin=origin, reply=reply, requests=requests
            )

        return record

    async def prepare(
        self,
        principal: Principal,
        mail_from: str,
        rcpt_tos: list[str],
        raw: bytes | bytearray | SpillMap,
        smtputf8: bool,
        drop_invalid_header_addresses: bool = False,
        reservation: Reservation | None = None,
    ) -> tuple[Submission, tuple[Call, ...]]:
        """Parse, let the provider decide what it must (campaign, ...), apply the From policy, plan the calls.
        `reservation`: the message's share of the large-message budget, grown by what its text's HTML adds."""
        charge = None if reservation is None else _charger(reservation, len(raw))
        if len(raw) > PARSE_IN_THREAD_BYTES or mime.expensive(raw):
            message = await asyncio.get_running_loop().run_in_executor(_PARSER, _parse_large, raw, charge)
        else:
            message = mime.parse(raw, charge=charge)
        if isinstance(raw, bytearray) and not any(isinstance(a.b64, memoryview) for a in message.attachments):
            # Everything the call needs is in `message` now; release the raw copy (the session's envelope
            # and the callers' frames still point at this buffer, not at its contents). A scan's base64 was
            # compacted within the buffer and its attachment is a view of it: the buffer then stays, once.
            raw.clear()
        elif isinstance(raw, SpillMap) and not any(isinstance(a.b64, memoryview) for a in message.attachments):
            raw.discard()  # likewise: nothing of the file is needed any more
        provider = self.providers[principal.account]
        submission = await provider.prepare(principal, message, mail_from, tuple(rcpt_tos))
        senders = await provider.sender_policy()
        before = submission.message
        checked = policy.apply_from_policy(
            senders, principal, before, mail_from, smtputf8, drop_invalid_header_addresses
        )
        if checked is not before:
            if len(checked.to) + len(checked.cc) < len(before.to) + len(before.cc):
                FIELDS_NOT_SENT.labels(account=principal.account, field="header_addresses").inc()
            submission = replace(submission, message=checked)
        plan = provider.plan(submission)
        if not plan:
            raise ContentRejected(reply=replies.NO_VALID_RECIPIENTS)
        for field in mime.not_sent_fields(message.defects):
            # A From or Reply-To with several addresses: the upstream's field takes one (a logged defect too).
            FIELDS_NOT_SENT.labels(account=principal.account, field=field).inc()
        return submission, plan


def _ended(reservation: Reservation | None, spill: SpillMap | None) -> Callable[[], None] | None:
    """What the delivery owner calls when the message's first attempt has ended: its memory may go."""
    if spill is None:
        return reservation.release if reservation is not None else None

    def ended() -> None:
        if reservation is not None:
            reservation.release()
        spill.discard()

    return ended


async def _digest(submission: Submission) -> str:
    """The message's digest for its idempotency key; a large one's on a parser thread (hashing megabytes)."""
    if idempotency.digest_size(submission) <= idempotency.DIGEST_IN_THREAD_BYTES:
        return idempotency.digest_of(submission)
    return await asyncio.get_running_loop().run_in_executor(_PARSER, idempotency.digest_of, submission)


def _charger(reservation: Reservation, size: int) -> Callable[[int], None]:
    """What the parser calls before it builds HTML from a text body (gateway/mime/bodies.py extract), with
    what escaping adds to the text in memory: the message is charged by what it becomes, `size` + that, so
    that "about 6 times limits.max_large_bytes" holds for text of "&", "<" or ">" too (docs/messages.md).
    Thread-safe (a parser thread calls it): Reservation.grow takes the budget's lock."""

    def charge(extra: int) -> None:
        if extra <= 0:
            return
        charged = size + extra
        if not reservation.fits(charged):
            # Never fits, even with the whole budget free: permanent, as the decoded-size check's refusal.
            LIMIT_HITS.labels(limit="max_large_bytes").inc()
            raise ContentRejected(
                f"decoded message would be charged {charged} bytes, over limits.max_large_bytes",
                reply=replies.MESSAGE_TOO_BIG.with_text("Message size exceeds fixed limit once decoded"),
            )
        if not reservation.grow(charged):
            LIMIT_HITS.labels(limit="max_large_bytes").inc()
            raise Deferred(
                f"decoded message would be charged {charged} bytes: too many large messages in this process now "
                "(limits.max_large_bytes)",
                reply=replies.LARGE_BUSY,
            )

    return charge


def _parse_large(raw: bytes | bytearray | SpillMap, charge: Callable[[int], None] | None = None) -> Message:
    """mime.parse on a parser thread, and large decoded attachments made base64 there, once: the API
    wants base64, and encoding megabytes later would run on the event loop (payload) or twice (queue)."""
    message = mime.parse(raw, charge=charge)
    if not any(a.b64 is None and len(a.data) >= CARRY_MIN for a in message.attachments):
        return message
    attachments = tuple(
        replace(a, data=b"", b64=base64.b64encode(a.data)) if a.b64 is None and len(a.data) >= CARRY_MIN else a
        for a in message.attachments
    )
    return replace(message, attachments=attachments)
