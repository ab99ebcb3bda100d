"""Per-login controls at the SMTP edge: the handler's hooks ask here and get the reply to send (None: go on).
Each refusal is logged once, with its reason, and counted per login (gateway/auth/controls.py decides)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from aiosmtpd.smtp import Session

from gateway.auth.controls import LoginControls, client_address, network_allows, tls_missing
from gateway.config.base import UserSettings
from gateway.core import replies
from gateway.core.model import Principal
from gateway.core.quota import Verdict
from gateway.limits.quotas import QuotaTracker, Taken
from gateway.ops.metrics import (
    INTERNAL_ERRORS,
    LOGIN_CREDENTIAL_LAST_USED,
    LOGIN_CREDENTIALS,
    LOGIN_REFUSALS,
    TEST_MESSAGES,
)
from gateway.smtp.peers import peer_text

log = structlog.get_logger("gateway.smtp")


def _peer(session: Session) -> str:
    return peer_text(session.peer)


def _size(mail_options: list[str]) -> int:
    """The SIZE= a MAIL FROM declares (RFC 1870), 0 without one."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isascii() and value.isdigit():
            return int(value)
    return 0


class PerLogin:
    """What the handler asks about a login's controls, for the sessions of one configuration."""

    def __init__(self, controls: LoginControls, quotas: QuotaTracker) -> None:
        self.controls = controls
        self.quotas = quotas
        self._returns: set[asyncio.Task[None]] = set()

    def _refused(self, principal: Principal, reason: str) -> None:
        LOGIN_REFUSALS.labels(
            account=principal.account, login=self.controls.metric_login(principal), reason=reason
        ).inc()

    # -- AUTH ----------------------------------------------------------------------------------------------

    def tls_refusal(self, server: Any, owner: tuple[str, UserSettings | None] | None, login: str) -> str | None:
        """Before any password is checked: 538 when this login may authenticate only inside TLS here."""
        if owner is None:
            return None
        session: Session = server.session
        if not tls_missing(self.controls.for_owner(owner), client_address(session.peer), server.tls_up):
            return None
        account, user = owner
        LOGIN_REFUSALS.labels(account=account, login=user.username if user else "*", reason="tls_required").inc()
        log.info("auth_tls_required", peer=_peer(session), login=login, account=account)
        server.mark_logged()
        return str(replies.LOGIN_TLS_REQUIRED)

    def network_refusal(self, session: Session, principal: Principal) -> bool:
        """After the password: True when the login may not be used from this client (it gets the reply of a
        wrong password, so the network is not revealed; the caller logs the refusal with its reason)."""
        if network_allows(self.controls.rules(principal), client_address(session.peer)):
            return False
        self._refused(principal, "network")
        return True

    def expired(self, account: str, login: str) -> None:
        LOGIN_REFUSALS.labels(account=account, login=login, reason="expired_password").inc()

    def authenticated(self, principal: Principal) -> None:
        """Which credential logged in: for an operator retiring an old password or key."""
        labels = {
            "account": principal.account,
            "login": self.controls.metric_login(principal),
            "credential": principal.credential or "-",
        }
        LOGIN_CREDENTIALS.labels(**labels).inc()
        LOGIN_CREDENTIAL_LAST_USED.labels(**labels).set(time.time())

    # -- envelope ------------------------------------------------------------------------------------------

    def recipient_refusal(self, server: Any, principal: Principal, address: str) -> str | None:
        rules = self.controls.rules(principal).recipients
        if rules is None or rules.allows(address):
            return None
        self._refused(principal, "recipient")
        reply = str(replies.RECIPIENT_NOT_ALLOWED.with_text(f"<{address}>: {replies.RECIPIENT_NOT_ALLOWED.text}"))
        log.info("recipient_rejected", peer=_peer(server.session), login=principal.login, reply=reply)
        server.mark_logged()
        return reply

    async def mail_refusal(self, server: Any, principal: Principal, mail_options: list[str]) -> str | None:
        """At MAIL: the login's quota is used up (or the declared SIZE= would go past it)."""
        limits = self.controls.rules(principal).quota
        if not limits:
            return None
        verdict = await self.quotas.check(principal.account, principal.login, limits, _size(mail_options))
        return self._quota_reply(server, principal, verdict)

    async def take(self, server: Any, principal: Principal, size: int) -> tuple[str | None, Taken | None]:
        """At the end of DATA: count the message against the login's quota, or the refusal."""
        limits = self.controls.rules(principal).quota
        if not limits:
            return None, None
        verdict, taken = await self.quotas.take(principal.account, principal.login, limits, size)
        return self._quota_reply(server, principal, verdict, at_data=True), taken

    def test_mode(self, principal: Principal) -> bool:
        return self.controls.rules(principal).test_mode

    def settle(self, principal: Principal, taken: Taken | None, reply: str, resend: bool = False) -> None:
        """The message was answered: a counted one that was not accepted is taken back, and so is a resend
        answered with its first message's 250 (`resend`: nothing was sent, the first message is counted)."""
        if reply.startswith("2") and self.test_mode(principal):
            TEST_MESSAGES.labels(account=principal.account, login=self.controls.metric_login(principal)).inc()
        if taken is None or (reply.startswith("2") and not resend):
            return
        task = asyncio.get_running_loop().create_task(self._give_back(taken))
        self._returns.add(task)
        task.add_done_callback(self._returns.discard)

    async def _give_back(self, taken: Taken) -> None:
        try:
            await self.quotas.give_back(taken)
        except Exception as exc:  # a bug: logged once, counted; the count stays one too high until the window ends
            INTERNAL_ERRORS.labels(where="quota_return").inc()
            log.error("quota_return_failed", login=taken.key, exc_info=exc)

    def _quota_reply(self, server: Any, principal: Principal, verdict: Verdict, at_data: bool = False) -> str | None:
        window, unit = verdict.window, verdict.unit
        if window is None or unit is None:
            return None
        self._refused(principal, f"quota_{unit}")
        limit = window.max_messages if unit == "messages" else window.max_bytes
        if verdict.too_big:
            reply = replies.QUOTA_TOO_BIG.with_text(
                f"Message larger than the byte quota of {principal.login} ({limit} bytes per {window.name})"
            )
        else:
            resets = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(window.end))
            base = replies.QUOTA_MESSAGES if unit == "messages" else replies.QUOTA_BYTES
            reply = base.with_text(
                f"{'Message' if unit == 'messages' else 'Byte'} quota of {principal.login} reached "
                f"({limit} {unit} per {window.name}); resets at {resets}"
            )
        if at_data:  # the transaction's summary line says it, with this reason
            if server.txn is not None:
                server.txn.receipt.reason = f"quota: {limit} {unit} per {window.name}"
            return str(reply)
        log.info(
            "quota_reached",
            peer=_peer(server.session),
            login=principal.login,
            account=principal.account,
            window=window.name,
            unit=unit,
            limit=limit,
            resets=window.end,
            too_big=verdict.too_big or None,
        )
        server.mark_logged()
        return str(reply)
