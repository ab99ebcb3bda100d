"""dEngage transactional email provider: one call per envelope recipient, a shared bearer token, the
account's From identities as the permitted sender domains, tags and a template per message."""

from __future__ import annotations

import fnmatch
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import structlog

from gateway.config.base import UserSettings
from gateway.core import replies
from gateway.core.errors import ContentRejected, RateLimited, UpstreamAuthFailed
from gateway.core.events import EventSource
from gateway.core.model import Address, Call, Message, Principal, ProviderData, Submission
from gateway.core.outcome import BeforeSend, Outcome, no_hook
from gateway.mime import jsonbody
from gateway.ops.metrics import FIELDS_NOT_SENT
from gateway.policy import SenderPolicy, ascii_domain, domain_of
from gateway.providers.base import ProviderBase
from gateway.providers.dengage import wire
from gateway.providers.dengage.config import DengageAccount, DengageUser
from gateway.providers.dengage.data import DengageLogin, DengageParams
from gateway.providers.dengage.events import DengageEvents
from gateway.providers.dengage.session import JSON, Identities, TokenSource
from gateway.upstream.client import HttpClient
from gateway.upstream.ratelimit import RateLimiter, Unlimited
from gateway.upstream.response import HttpResponse

if TYPE_CHECKING:
    from gateway.providers.checks import AccountCheck

log = structlog.get_logger("gateway.dengage")
T = TypeVar("T")

TAGS_OPTION = "tags"  # X-Gateway-Tags: a, b
TEMPLATE_OPTION = "template"  # X-Gateway-Template: <content uuid>


def merge_tags(*groups: object) -> list[str]:
    """Tags in order, each once; a string group is a comma-separated header value."""
    out: dict[str, None] = {}
    for group in groups:
        items = group.split(",") if isinstance(group, str) else group if isinstance(group, (list, tuple)) else ()
        for tag in items:
            text = str(tag).strip()
            if text:
                out.setdefault(text, None)
    return list(out)


class DengageProvider(ProviderBase[DengageAccount]):
    kind = "dengage"

    def __init__(
        self,
        account: str,
        settings: DengageAccount,
        http: HttpClient,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(account, settings, http, limiter or Unlimited())
        self.tokens = TokenSource(account, http, self.limiter, settings.api_userkey, settings.api_password, clock)
        self.identities = Identities(account, self._fetch_froms, settings.froms_ttl, clock)
        self._policy: tuple[tuple[wire.Identity, ...], SenderPolicy] | None = None
        # The API user's login as it appears in logs and replies: never the userkey itself.
        self._api_login = f"{account}:api-user"
        self._warned_no_id = False
        self._events: DengageEvents | None = None
        self._x_header_patterns = tuple(p.lower() for p in settings.forward_x_headers)

    # -- logins ------------------------------------------------------------------------------------

    def user_extra(self, user: UserSettings) -> ProviderData:
        assert isinstance(user, DengageUser)
        return DengageLogin(tuple(user.tags))

    def _is_api_user(self, username: str) -> bool:
        return hmac.compare_digest(username.encode(), self.settings.api_userkey.encode())

    def owns_login(self, username: str) -> bool:
        return self.settings.api_user_logins and self._is_api_user(username)

    def login_label(self, username: str) -> str:
        return self._api_login if self._is_api_user(username) else username

    async def verify_login(self, username: str, password: str) -> Principal | None:
        """The API user's userkey + password, checked by a real POST /rest/login (the core caches it)."""
        if not self.owns_login(username):
            return None
        response = await self.http.request(
            "login",
            "POST",
            str(wire.WIRE["login"]),
            headers=JSON,
            content=orjson.dumps(wire.login_body(username, password)),
            limiter=self.limiter,
        )
        try:
            wire.login_token(response)
        except wire.IpNotAllowlisted:
            raise  # dEngage checks the caller's IP before the credentials: they cannot be checked now
        except UpstreamAuthFailed:
            return None
        return Principal(account=self.account, login=self._api_login, extra=DengageLogin())

    async def check_upstream(self) -> AccountCheck:
        """Harmless read-only calls against dEngage (smtp-gateway check-upstream)."""
        from gateway.providers.dengage.check import check_account

        return await check_account(self)

    # -- acceptance --------------------------------------------------------------------------------

    async def sender_policy(self) -> SenderPolicy:
        """The domains of the account's From identities (narrowed by sender_domains); a From outside them
        is refused with a reply that names them. Raises Deferred while they were never fetched."""
        identities = await self.identities.current()
        cached = self._policy
        if cached is not None and cached[0] is identities:
            return cached[1]
        domains = frozenset(ascii_domain(domain_of(i.address)) for i in identities)
        if self.settings.sender_domains:
            wanted = frozenset(ascii_domain(d) for d in self.settings.sender_domains)
            if wanted - domains:
                log.warning(
                    "dengage_sender_domain_not_identity",
                    account=self.account,
                    domains=sorted(wanted - domains),
                    identities=sorted(domains),
                )
            domains &= wanted
        policy = SenderPolicy(domains=domains, name_domains=True)
        self._policy = (identities, policy)
        return policy

    async def prepare(
        self, principal: Principal, message: Message, mail_from: str, rcpt_tos: tuple[str, ...]
    ) -> Submission:
        options = message.options
        template = (options.get(TEMPLATE_OPTION) or "").strip() or None
        if template is not None:
            try:
                uuid.UUID(template)
            except ValueError:
                raise ContentRejected(
                    f"X-Gateway-Template must be a dEngage content id (a UUID), got {template[:60]!r}"
                ) from None
        elif not message.subject.strip():
            if self.settings.default_subject is None:
                raise ContentRejected(reply=replies.NO_SUBJECT)
            message = replace(message, subject=self._default_subject(principal, message, mail_from))
        message = self._forwarded(message)
        tags = merge_tags(
            self.settings.tags, DengageLogin.read(principal.extra).tags, options.get(TAGS_OPTION, ""), self._event_tag()
        )
        # `ref` is chosen once and kept with the queued message: the seed of each call's idempotency key.
        params = DengageParams(tags=tuple(tags), template=template, ref=uuid.uuid4().hex)
        return Submission(principal=principal, mail_from=mail_from, rcpt_tos=rcpt_tos, message=message, params=params)

    def _event_tag(self) -> list[str]:
        """The tag the report is read by, on every message while events are read back."""
        events = self.settings.events
        return [events.tag] if events.enabled and events.tag else []

    def notice_params(self, original: ProviderData) -> ProviderData:
        """A notice keeps the message's tags, not its template, and gets its own idempotency seed."""
        return DengageParams(tags=DengageParams.read(original).tags, ref=uuid.uuid4().hex)

    def event_source(self) -> EventSource | None:
        if not self.settings.events.enabled:
            return None
        if self._events is None:
            self._events = DengageEvents(self.account, self.settings, self._authorized)
        return self._events

    def _default_subject(self, principal: Principal, message: Message, mail_from: str) -> str:
        """The account's default_subject for a message without one (its placeholders filled in)."""
        template = self.settings.default_subject
        assert template is not None
        sender = message.from_ or Address(mail_from)
        values = {
            "login": principal.login,
            "account": self.account,
            "from": sender.email,
            "from_name": sender.name or sender.email,
            "date": datetime.now(UTC).date().isoformat(),
        }
        return replies.sanitize(template.format_map(values), limit=998)

    def _forwarded(self, message: Message) -> Message:
        """The message with only the X- headers the account forwards (forward_x_headers); what dEngage cannot
        be given is counted (smtp_gateway_fields_not_sent_total)."""
        if message.x_headers:
            kept = tuple((name, value) for name, value in message.x_headers if self._forwards(name.lower()))
            if len(kept) != len(message.x_headers):
                FIELDS_NOT_SENT.labels(account=self.account, field="x_headers").inc()
                message = replace(message, x_headers=kept)
        if not wire.WIRE["att_cid"] and any(a.inline and a.content_id for a in message.attachments):
            FIELDS_NOT_SENT.labels(account=self.account, field="content_id").inc()
        return message

    def _forwards(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self._x_header_patterns)

    def _named_sender(self, message: Message) -> dict[str, str]:
        """The From's address and name where the account's settings put them (none by default: no name is
        confirmed)."""
        sender = message.from_
        if sender is None:
            return {}
        settings, w = self.settings, wire.WIRE
        fields: dict[str, str] = {}
        if address_field := settings.from_address_field or w["from_address"]:
            fields[address_field] = sender.email
        if (name_field := settings.from_name_field or w["from_name"]) and sender.name:
            fields[name_field] = sender.name
        return fields

    async def _sender(self, message: Message) -> dict[str, str]:
        """The From's fields where the account's settings put them: address, name and identity id."""
        sender = message.from_
        if sender is None:
            return {}
        fields = self._named_sender(message)
        if identity_field := self.settings.from_identity_field or wire.WIRE["from_identity"]:
            identity = wire.identity_for(await self.identities.current(), sender.email)
            if identity is not None and identity.id is not None:
                fields[identity_field] = identity.id
            else:
                FIELDS_NOT_SENT.labels(account=self.account, field="from_identity").inc()
        return fields

    def plan(self, submission: Submission) -> tuple[Call, ...]:
        """One call per envelope recipient (send.to takes one address); the key is the address in lower
        case, so RCPT TO repeating an address in another case is still one copy."""
        calls: dict[str, Call] = {}
        for rcpt in submission.rcpt_tos:
            key = rcpt.lower()
            if key not in calls:
                calls[key] = Call(key, (rcpt,))
        return tuple(calls.values())

    def requests(self, submission: Submission, *, bodies: bool = True) -> list[dict[str, Any]]:
        """One call per recipient as planned (the bearer token goes in the Authorization header)."""
        return [
            {
                "call": call.key,
                "method": "POST",
                "path": str(wire.WIRE["send"]),
                "body": wire.build_payload(
                    submission,
                    call.recipients[0],
                    self._named_sender(submission.message),  # the identity id is looked up when sending
                    attachment=jsonbody.attachment_omitted,
                    bodies=bodies,
                ),
            }
            for call in self.plan(submission)
        ]

    # -- delivery ----------------------------------------------------------------------------------

    async def deliver(
        self, submission: Submission, done: Mapping[str, str], before_send: BeforeSend = no_hook
    ) -> Outcome:
        """Every pending recipient's call at once (the rate limiter spaces them); no call waits for another."""
        outcome = Outcome()
        await outcome.record_all(
            {
                call.key: self.send_one(submission, call, before_send)
                for call in self.plan(submission)
                if call.key not in done
            }
        )
        return outcome

    async def send_one(self, submission: Submission, call: Call, before_send: BeforeSend = no_hook) -> wire.SendResult:
        recipient = call.recipients[0]
        sender = await self._sender(submission.message)

        def content() -> bytes | jsonbody.Body:
            # Built once this call holds a connection (gateway/upstream/client.py), not when deliver starts
            # every recipient's call: each body is a copy of the HTML (and of small attachments' base64),
            # so a 10 MB HTML to 50 recipients held 50 of them at once; now at most the connection limit's
            # number (docs/messages.md). Built again for the one repeat after a 401: the same bytes.
            return jsonbody.encode(wire.build_payload(submission, recipient, sender))

        extra: dict[str, str] = {}
        header = wire.WIRE["idempotency_header"]
        ref = DengageParams.read(submission.params).ref
        if header and ref:
            extra[header] = wire.idempotency_key(ref, recipient)

        async def sending() -> None:
            await before_send((call.key,))

        result = await self._authorized(
            "send", "POST", str(wire.WIRE["send"]), wire.send_result, content, extra, sending
        )
        if not result.upstream_id and not self._warned_no_id:
            # The id keys are unconfirmed (wire.ID_KEYS): say once what the answer held instead.
            self._warned_no_id = True
            log.warning("dengage_answer_without_id", account=self.account, keys=list(result.keys))
        return result

    async def _fetch_froms(self) -> tuple[wire.Identity, ...]:
        try:
            found = await self._authorized("froms", "GET", str(wire.WIRE["froms"]), wire.from_identities)
        except UpstreamAuthFailed as exc:
            # The same refusal as at the send endpoint (the IP allowlist, a refused API user): counted, logged
            # when it begins, and /readyz names it; MAIL FROM gets 451 while no list was ever fetched.
            self.health.failed(self.account, exc)
            raise
        self.health.credentials_accepted(self.account)
        return found

    async def _authorized(
        self,
        endpoint: str,
        method: str,
        path: str,
        parse: Callable[[HttpResponse], T],
        content: bytes | jsonbody.Body | Callable[[], bytes | jsonbody.Body] | None = None,
        extra: Mapping[str, str] | None = None,
        sending: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """One API call with the shared token: a 401 logs in again (once for every caller that saw the
        same token) and repeats the call once. A 429 slows the account's rate limiter."""
        for attempt in (1, 2):
            token = await self.tokens.get()
            headers = {**JSON, "Authorization": f"Bearer {token}", **(extra or {})}
            # `sending` (the fencing check) runs after the waits for the token, a connection and the limiter's
            # slot (taken once the connection is free: gateway/upstream/client.py).
            response = await self.http.request(
                endpoint, method, path, headers=headers, content=content, before_send=sending, limiter=self.limiter
            )
            try:
                return parse(response)
            except wire.TokenRejected as exc:
                self.tokens.invalidate(token)
                if attempt == 2 and exc.foreign:
                    raise wire.ForeignRefusal(f"a fresh token was answered 401 too ({exc.reason})") from None
                if attempt == 2:
                    raise UpstreamAuthFailed(f"dEngage refused a fresh token too ({exc.reason})") from None
                log.info("dengage_token_rejected", account=self.account, endpoint=endpoint)
            except RateLimited as exc:
                await self.limiter.penalize(exc.retry_after)
                raise
        raise AssertionError("unreachable")  # pragma: no cover
