"""aiosmtpd handler hooks: each SMTP phase asks the pipeline and turns its answer into a reply."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import math
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog
from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session

from gateway.auth import sasl
from gateway.auth.credentials import Authenticator, AuthFailed, AuthUnavailable
from gateway.config import LimitsSettings, ListenerSettings
from gateway.core import replies
from gateway.core.errors import GatewayError
from gateway.core.model import Origin, Principal, Receipt
from gateway.core.replies import Reply
from gateway.core.spill import SpillMap
from gateway.limits.clients import AuthTicket, Defenses, client_ip, client_key
from gateway.ops import logs
from gateway.ops.metrics import (
    AUTH,
    AUTH_DELAYED,
    AUTH_LOCKOUTS,
    AUTH_TRACKED,
    LIMIT_HITS,
    LOGIN_AUTH_FAILURES,
)
from gateway.pipeline import Pipeline
from gateway.smtp.logins import PerLogin
from gateway.smtp.peers import peer_text

if TYPE_CHECKING:
    from gateway.auth.oauth import OAuthVerifier

log = structlog.get_logger("gateway.smtp")

_AUTH_OK = AUTH.labels(result="ok")
# Keys the fingerprints of unknown usernames: stable within a process, useless to anyone reading old logs.
_FINGERPRINT_KEY = os.urandom(16)


class GatewayHandler:
    def __init__(
        self,
        listener: ListenerSettings,
        limits: LimitsSettings,
        pipeline: Pipeline,
        authenticator: Authenticator,
        defenses: Defenses | None = None,
        per_login: PerLogin | None = None,
        oauth: OAuthVerifier | None = None,
    ) -> None:
        self.listener = listener
        self.limits = limits
        self.pipeline = pipeline
        self.authenticator = authenticator
        # Per-client state shared by every session of the process (and kept across reloads).
        self.defenses = defenses or Defenses(limits)
        self._trusted = listener.trusted_map
        # Per-login controls (networks, TLS, recipients, quotas, test mode); None: none configured.
        self.per_login = per_login
        self.oauth = oauth  # token logins (AUTH XOAUTH2, OAUTHBEARER); None: not offered

    # -- who is sending ----------------------------------------------------------------------------

    def principal(self, session: Session) -> Principal | None:
        if isinstance(session.auth_data, Principal):
            return session.auth_data
        if self._trusted and isinstance(session.peer, tuple):
            ip = client_ip(session.peer[0])
            if ip is None:
                return None
            for network, login in self._trusted:  # most specific network first
                if ip in network:
                    # Remembered for the session: MAIL, RCPT and DATA all ask (AUTH may still replace it).
                    principal = self.authenticator.principal_for_user(login)
                    if principal is None:  # (config validation names only configured users here)
                        return None
                    session.auth_data = principal
                    if logs.enabled("debug"):  # its fields built only then: every trusted session comes here
                        # Debug: every summary line of the session names the login and account at info.
                        log.debug(
                            "trusted_client",
                            peer=_peer(session),
                            network=str(network),
                            login=login,
                            account=principal.account,
                        )
                    return principal
        return None

    def login_for(self, username: str) -> tuple[str, str | None]:
        """The login to check for an AUTH username, and how it was derived (None: as given).

        Devices that insist on an email-style username: a whole address listed in `login_aliases` becomes
        its login; with `strip_login_domain`, "login@anything" becomes "login". Nothing else is guessed.
        """
        alias = self.listener.login_aliases.get(username.strip().lower())
        if alias is not None:
            return alias, "login_aliases"
        if self.listener.strip_login_domain and "@" in username:
            return username.rpartition("@")[0], "strip_login_domain"
        return username, None

    def _loggable(self, login: str) -> dict[str, str]:
        """A login as it may appear in the log: one the gateway knows, else only a fingerprint.

        A user who types the password into the username field must not find it in the log.
        """
        if self.authenticator.knows(login):
            return {"login": self.authenticator.label(login)}  # never a provider's secret (dEngage userkey)
        digest = hmac.new(_FINGERPRINT_KEY, login.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return {"login_unknown": digest.hexdigest()[:12]}

    async def _initial_response(self, server: Any, args: list[str], challenge: str) -> bytes | None:
        """The initial response given with AUTH, or the answer to `challenge`; None when already answered."""
        if len(args) == 1:
            blob = await server.challenge_auth(challenge)
            return None if blob is MISSING else bytes(blob)
        # RFC 4954 §4: "=" is an empty initial response.
        decoded = b"" if args[1] == "=" else _b64(args[1])
        if decoded is None:
            await server.push(str(replies.AUTH_BAD_BASE64))
        return decoded

    async def _locked_out(self, server: Any) -> bool:
        """A client IP locked out after too many failures gets 421 at AUTH, before any challenge, password
        hash or upstream lookup (a lockout of any process or instance on the queue: the shared record is read)."""
        key = _client(server.session)
        verdict = await self.defenses.auth.check(key)
        if not verdict.locked_for:
            return False
        AUTH.labels(result="locked_out").inc()
        suppressed = self.defenses.sampler.allow(("auth_locked_out", key))
        if suppressed is not None:
            log.warning(
                "auth_locked_out",
                peer=_peer(server.session),
                client=key,
                retry_in=math.ceil(verdict.locked_for),
                suppressed=suppressed,
            )
        server.mark_logged()
        await server.push(str(replies.AUTH_LOCKED_OUT))
        server.transport.close()
        return True

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        if await self._locked_out(server):
            return AuthResult(success=False, handled=True)
        blob = await self._initial_response(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push(str(replies.AUTH_PLAIN_UNSPLIT))
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        # RFC 4616's authorization identity: to act as someone else. No login may (Postfix refuses it too
        # unless allowed): refused unchecked, as a failed AUTH, so it never logs in as either.
        return await self._check(server, login, password, other_identity=bool(authzid) and authzid != login)

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        if await self._locked_out(server):
            return AuthResult(success=False, handled=True)
        login = await self._initial_response(server, args, server.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False, handled=True)
        refusal = self._tls_refusal(server, login)  # before the password travels in clear
        if refusal is not None:
            try:
                return await self._tls_refused(server, refusal, login)
            finally:
                await self._end_attempt(server)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    def _tls_refusal(self, server: Any, login: bytes) -> str | None:
        """The reply when the login may authenticate only inside TLS here (its password is never checked)."""
        if self.per_login is None:
            return None
        try:
            checked, _ = self.login_for(login.decode("utf-8"))
        except UnicodeDecodeError:
            return None
        return self._tls_refusal_of(server, checked)

    def _tls_refusal_of(self, server: Any, checked: str) -> str | None:
        """`_tls_refusal` of a login already mapped (login_for), as a token's is: mapping it again would look up
        another login's rules (`erp@acme.example` stripped to `erp`)."""
        if self.per_login is None:
            return None
        owner = self.authenticator.owner(checked)
        return self.per_login.tls_refusal(server, owner, self.authenticator.label(checked))

    async def _tls_refused(self, server: Any, refusal: str, login: bytes) -> AuthResult:
        """The 538 of a login that may authenticate only inside TLS here: an AUTH attempt all the same,
        throttled like any (a locked-out client is refused, one that failed often waits) and counted as a
        failure, or probing which logins exist and require TLS would cost nothing."""
        checked, _ = self.login_for(login.decode("utf-8"))  # (decoded already by _tls_refusal)
        throttled = await self._throttle(server, self._loggable(checked))
        if throttled is not None:
            return throttled
        return await self._tls_refused_failure(server, refusal)

    async def _tls_refused_failure(self, server: Any, refusal: str) -> AuthResult:
        """The 538 of an attempt `_throttle` began, counted as a failure (PLAIN, LOGIN and token logins alike)."""
        ticket, server.auth_ticket = server.auth_ticket, None
        locked = await self.defenses.auth.end(ticket, failed=True)
        AUTH_TRACKED.set(len(self.defenses.auth))
        if locked:
            return await self._lock_out(server, server.session)
        return AuthResult(success=False, handled=False, message=refusal)

    async def _check(self, server: Any, login: bytes, password: bytes, other_identity: bool = False) -> AuthResult:
        try:
            return await self._checked(server, login, password, other_identity)
        finally:
            await self._end_attempt(server)

    async def _checked(self, server: Any, login: bytes, password: bytes, other_identity: bool) -> AuthResult:
        session: Session = server.session
        try:
            username, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return await self._refuse(server, session, {"login_unknown": "not UTF-8"})
        refusal = self._tls_refusal(server, login)
        if refusal is not None:
            return await self._tls_refused(server, refusal, login)
        checked, mapped_by = self.login_for(username)
        mapped = {"mapped_by": mapped_by} if mapped_by else {}
        fields = {**self._loggable(checked), **mapped}
        throttled = await self._throttle(server, fields)
        if throttled is not None:
            return throttled
        if other_identity:
            return await self._refuse(server, session, {**fields, "authzid": "differs from the login"})
        try:
            principal = await self.authenticator.authenticate(checked, secret)
        except AuthFailed as exc:
            if exc.reason and self.per_login is not None:
                self.per_login.expired(*self._owner_labels(checked))
            account, user = self._owner_labels(checked)
            if account and user != "*":
                LOGIN_AUTH_FAILURES.labels(account=account, login=user).inc()
            return await self._refuse(server, session, {**fields, **({"reason": exc.reason} if exc.reason else {})})
        except AuthUnavailable as exc:
            return self._unavailable(server, str(exc), fields)
        return await self._accepted(server, principal, fields, mapped)

    async def _throttle(self, server: Any, fields: dict[str, str]) -> AuthResult | None:
        """Before credentials are checked: the attempt is counted in flight from here until its outcome
        (attempts in flight count toward the lockout with the failures); a client locked out meanwhile is
        refused; one that failed often waits first (growing, bounded), then is checked."""
        session: Session = server.session
        ticket, verdict = await self.defenses.auth.begin(_client(session))
        if ticket is None:  # locked out (or as many attempts in flight as a lockout allows)
            return await self._refuse(server, session, fields, checked=False)
        server.auth_ticket = ticket  # ended by _refuse (a failure) or by _end_attempt (any other outcome)
        if verdict.delay:
            AUTH_DELAYED.inc()
            log.info("auth_delayed", peer=_peer(session), delay=verdict.delay, client_failures=verdict.failures)
            await asyncio.sleep(verdict.delay)
        return None

    def _unavailable(self, server: Any, reason: str, fields: dict[str, str]) -> AuthResult:
        AUTH.labels(result="unavailable").inc()
        log.warning("auth_unavailable", peer=_peer(server.session), reason=reason, **fields)
        server.mark_logged()
        return AuthResult(success=False, handled=False, message=str(replies.AUTH_TEMPFAIL))

    async def _accepted(
        self, server: Any, principal: Principal, fields: dict[str, str], mapped: dict[str, str]
    ) -> AuthResult:
        """Verified credentials: the login's own controls (its networks), then the session is the login's."""
        session: Session = server.session
        if self.per_login is not None:
            if self.per_login.network_refusal(session, principal):
                # The same reply as a wrong password: the network is not revealed. Logged with whether the
                # password was right (a leaked one used from elsewhere is what an operator must hear of).
                return await self._refuse(server, session, {**fields, "reason": "network", "password_valid": "yes"})
            self.per_login.authenticated(principal)
        _AUTH_OK.inc()
        log.info(
            "auth_ok",
            peer=_peer(session),
            login=principal.login,
            account=principal.account,
            credential=principal.credential or None,
            **mapped,
        )
        return AuthResult(success=True, auth_data=principal, message=str(replies.AUTH_OK))

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, "XOAUTH2")

    async def auth_OAUTHBEARER(self, server: Any, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, "OAUTHBEARER")

    async def _bearer(self, server: Any, args: list[str], mechanism: sasl.Mechanism) -> AuthResult:
        """A token login. Refused as RFC 7628 says: a 334 JSON error challenge, the client's dummy answer, 535."""
        if self.oauth is None:  # not advertised then (auth_exclude_mechanism); nor accepted
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_UNKNOWN_MECHANISM))
        if await self._locked_out(server):
            return AuthResult(success=False, handled=True)
        blob = await self._initial_response(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        fields: dict[str, str] = {"mechanism": mechanism}
        try:
            return await self._bearer_checked(server, blob, mechanism, fields)
        finally:
            await self._end_attempt(server)

    async def _bearer_checked(
        self, server: Any, blob: bytes, mechanism: sasl.Mechanism, fields: dict[str, str]
    ) -> AuthResult:
        assert self.oauth is not None
        # Loaded with the verifier at start-up (gateway.app.oauth_verifier): only a look-up in sys.modules here.
        from gateway.auth.oauth import TokenRefused, TokenUnavailable

        throttled = await self._throttle(server, fields)
        if throttled is not None:
            return throttled
        try:
            token = await self.oauth.login(mechanism, blob, self.login_for)
            principal = self.authenticator.principal_for_user(token.login)
            if principal is None:
                # With no `logins` map the claim's value is the login: any other user of the issuer's
                # tenant holds a valid token naming no login here. A refusal like any other.
                raise TokenRefused(f"{token.issuer.claim} {token.claim[:80]!r} is no configured login")
        except TokenUnavailable as exc:
            return self._unavailable(server, str(exc), fields)
        except TokenRefused as exc:
            challenge = sasl.error_challenge(mechanism, self.oauth.scope(), self.oauth.discovery)
            answered = await server.challenge_auth(challenge) is not MISSING  # else aiosmtpd said 501
            refused = await self._refuse(server, server.session, {**fields, "reason": str(exc)})
            return refused if answered else AuthResult(success=False, handled=True)
        refusal = self._tls_refusal_of(server, token.login)  # the token's login, mapped already
        if refusal is not None:
            return await self._tls_refused_failure(server, refusal)
        credential = f"oauth:{token.issuer.name}"
        principal = replace(principal, credential=credential, credential_expires=token.expires)
        return await self._accepted(server, principal, {**fields, "login": token.login}, {"mechanism": mechanism})

    def _owner_labels(self, login: str) -> tuple[str, str]:
        owner = self.authenticator.owner(login)
        if owner is None:
            return "", login
        return owner[0], owner[1].username if owner[1] is not None else "*"

    async def _end_attempt(self, server: Any) -> None:
        """The attempt `_throttle` began ended otherwise than refused (accepted, upstream unavailable, ...)."""
        ticket = getattr(server, "auth_ticket", None)
        if ticket is not None:
            server.auth_ticket = None
            await self.defenses.auth.end(ticket, failed=False)
        # Read again at every AUTH (the app's figures loop does too): what expired meanwhile is pruned.
        AUTH_TRACKED.set(len(self.defenses.auth))

    async def _refuse(self, server: Any, session: Session, fields: dict[str, str], checked: bool = True) -> AuthResult:
        key = _client(session)
        if checked:
            AUTH.labels(result="invalid").inc()
            ticket, server.auth_ticket = getattr(server, "auth_ticket", None), None
            locked = await self.defenses.auth.end(ticket or AuthTicket(key, "none"), failed=True)
            AUTH_TRACKED.set(len(self.defenses.auth))
        else:
            AUTH.labels(result="locked_out").inc()
            locked = True
        failures = getattr(session, "auth_failures", 0) + 1
        session.auth_failures = failures  # type: ignore[attr-defined]
        unchecked = {} if checked else {"checked": False}  # refused before any check: no guess was made
        log.info("auth_failed", peer=_peer(session), failures=failures, **fields, **unchecked)
        server.mark_logged()
        if locked and checked:
            return await self._lock_out(server, session)
        if locked:
            await server.push(str(replies.AUTH_LOCKED_OUT))
            server.transport.close()
            return AuthResult(success=False, handled=True)
        if failures >= self.limits.max_auth_failures:
            LIMIT_HITS.labels(limit="max_auth_failures").inc()
            await server.push(str(replies.AUTH_TOO_MANY))
            server.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=str(replies.AUTH_INVALID))

    async def _lock_out(self, server: Any, session: Session) -> AuthResult:
        """This failure locked the client out: logged once, 421, closed."""
        AUTH_LOCKOUTS.inc()
        limits = self.defenses.limits
        log.warning(
            "auth_lockout",
            peer=_peer(session),
            client=_client(session),
            failures=limits.auth_lockout_failures,
            window=limits.auth_failure_window,
            locked_for=limits.auth_lockout_time,
        )
        server.mark_logged()
        await server.push(str(replies.AUTH_LOCKED_OUT))
        server.transport.close()
        return AuthResult(success=False, handled=True)

    # -- envelope ----------------------------------------------------------------------------------

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        principal = self.principal(session)
        if principal is None:
            return str(replies.AUTH_REQUIRED)
        smtputf8 = "SMTPUTF8" in mail_options
        busy = _declared_too_large(server, mail_options)
        if busy is not None:
            log.info("sender_deferred", peer=_peer(session), login=principal.login, reply=busy)
            server.mark_logged()
            return busy
        # messages_per_minute counts the MAILs accepted (as SES counts messages it accepts): a MAIL refused for
        # its quota, its sender or a DNS failure costs nothing. A client out of tokens is refused before any
        # lookup; the token is taken once every check has passed (docs/per-login.md).
        rate_key = f"{principal.account}/{principal.login}"
        wait = self.defenses.rates.wait(rate_key)
        if wait:
            return self._rate_limited(server, session, principal, wait)
        refusal = await self.per_login.mail_refusal(server, principal, mail_options) if self.per_login else None
        if refusal is not None:
            return refusal
        try:
            address = await self.pipeline.check_sender(principal, address, smtputf8)
        except GatewayError as exc:
            log.info("sender_rejected", peer=_peer(session), login=principal.login, reply=str(exc.reply), **_why(exc))
            server.mark_logged()
            return str(exc.reply)
        wait = self.defenses.rates.take(rate_key)  # another session of the login may have taken it meanwhile
        if wait:
            return self._rate_limited(server, session, principal, wait)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(replies.SENDER_OK)

    def _rate_limited(self, server: Any, session: Session, principal: Principal, wait: float) -> str:
        LIMIT_HITS.labels(limit="messages_per_minute").inc()
        log.info(
            "message_rate_limited",
            peer=_peer(session),
            login=principal.login,
            retry_in=math.ceil(wait),
            limit=self.defenses.limits.messages_per_minute,
        )
        server.mark_logged()
        return str(
            replies.LOGIN_RATE_LIMITED.with_text(
                f"Message rate limit reached for {principal.login}; try again in {math.ceil(wait)} s"
            )
        )

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        principal = self.principal(session)
        if principal is None:
            return str(replies.AUTH_REQUIRED)
        if len(envelope.rcpt_tos) >= self.limits.max_recipients:
            LIMIT_HITS.labels(limit="max_recipients").inc()
            log.info(
                "recipient_rejected",
                peer=_peer(session),
                login=principal.login,
                reply=str(replies.TOO_MANY_RECIPIENTS),
                limit=self.limits.max_recipients,
            )
            server.mark_logged()
            return str(replies.TOO_MANY_RECIPIENTS)
        try:
            # The normalized form travels on (an IDN domain as its xn-- form).
            address = await self.pipeline.check_recipient(principal, address, "SMTPUTF8" in envelope.mail_options)
        except GatewayError as exc:
            log.info(
                "recipient_rejected", peer=_peer(session), login=principal.login, reply=str(exc.reply), **_why(exc)
            )
            server.mark_logged()
            return str(exc.reply)
        refusal = self.per_login.recipient_refusal(server, principal, address) if self.per_login else None
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RECIPIENT_OK)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        assert isinstance(raw, (bytes, bytearray, SpillMap)) and envelope.mail_from is not None
        # A spilled message's file is discarded by accept() once accept has it (at once, or when its first
        # attempt ends). Until then it is this hook's: every other way out (a quota refusal, a quota store that
        # fails, the client gone while the quota is counted) discards it here. The session only drops its
        # reference, and the unlinked file would keep its disk space and a descriptor until the process exits.
        unhanded = raw if isinstance(raw, SpillMap) else None
        try:
            principal = self.principal(session)
            if principal is None:
                return str(replies.AUTH_REQUIRED)
            txn = server.txn
            # Read after accept(): a resend answered with its first message's 250 sent nothing (resend_of).
            receipt = txn.receipt if txn is not None else Receipt()
            taken = None
            per_login = self.per_login
            if per_login is not None:
                refusal, taken = await per_login.take(server, principal, len(raw))
                if refusal is not None:
                    return refusal

            def gone(decided: Reply | None) -> None:
                # The client left during delivery (this task cancelled): the delivery goes on, and the quota is
                # settled by its outcome; given back only when nothing was accepted (refused, or never sent).
                assert per_login is not None
                per_login.settle(principal, taken, "" if decided is None else str(decided))

            origin = Origin(listener=server.listener, peer=_peer(session))
            test_mode = per_login.test_mode(principal) if per_login is not None else False
            unhanded = None  # accept() owns it from its first line: nothing may fail between here and there
            reply = await self.pipeline.accept(
                principal,
                envelope.mail_from,
                list(envelope.rcpt_tos),
                raw,
                "SMTPUTF8" in envelope.mail_options,
                receipt=receipt,
                reservation=server.take_reservation(),
                origin=origin,
                test_mode=test_mode,
                drop_invalid_header_addresses=self.listener.drop_invalid_header_addresses,
                on_gone=gone if per_login is not None else None,
            )
        finally:
            if unhanded is not None:
                unhanded.discard()
        if per_login is not None:
            per_login.settle(principal, taken, str(reply), resend=receipt.resend_of is not None)
        return str(reply)


def _why(exc: GatewayError) -> dict[str, str]:
    """The refusal's reason for its log line, when the reply does not already say it (a DNS failure's
    library detail is in the reason only)."""
    return {} if exc.reason in str(exc.reply) else {"reason": exc.reason}


def _b64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _peer(session: Session) -> str:
    return peer_text(session.peer)


def _declared_too_large(server: Any, mail_options: list[str]) -> str | None:
    """A SIZE= (RFC 1870) past the large-message budget free now: 452 4.3.1 at MAIL, before any DATA."""
    budget = server.budget
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isascii() and value.isdigit():
            size = int(value)
            if budget is not None and size > budget.threshold and size > budget.free():
                return str(replies.LARGE_BUSY)
    return None


def _client(session: Session) -> str:
    """The client as per-IP limits count it (the real client behind a PROXY header)."""
    peer = session.peer
    return client_key(str(peer[0]) if isinstance(peer, tuple) else str(peer))
