"""Pure: console sessions as signed cookies (HMAC-SHA256 under a server-side key) and the CSRF tokens bound to
them. A cookie holds who signed in, when, when last seen, a random session id and a fingerprint of the
admin's password hash (a changed or removed password ends its sessions); never a secret."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass, replace

import orjson

# Each MAC is over a purpose and the value: a token made for one use is never valid for another.
_SESSION, _CSRF, _SIGNIN, _ADMIN, _OUTCOME = b"session|", b"csrf|", b"signin|", b"admin|", b"outcome|"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    admin: str
    issued: float  # when the admin signed in
    seen: float  # the last request (a session idle longer than idle_timeout has ended)
    sid: str  # random: what a sign-out revokes and CSRF tokens are bound to
    fingerprint: str  # of the admin's password hash when they signed in

    def touched(self, now: float) -> Session:
        return replace(self, seen=now)


def new_session(admin: str, fingerprint: str, now: float) -> Session:
    return Session(admin, now, now, secrets.token_urlsafe(16), fingerprint)


# Seconds a session's sign-in time may lie ahead of this process's clock: it was signed in on an instance whose
# clock is ahead of this one's (sessions' times are each instance's own clock, docs/operations/instances.md).
# The same 5 minutes the queue keeps a sign-out past a session's lifetime for clocks that differ
# (SIGNOUT_KEPT_PAST): within them every instance takes the session; beyond them it is ended (a cookie from
# further ahead than any clock the sign-outs allow for). It was 60 s: a sibling 61 s ahead sent every admin it
# signed in back to sign-in at each request another instance served.
FUTURE_TOLERANCE = 300.0


def ended(session: Session, now: float, idle: float, lifetime: float) -> str | None:
    """Why a session is over (`idle`, `lifetime`), or None while it holds."""
    if now - session.issued >= lifetime or session.issued > now + FUTURE_TOLERANCE:
        return "lifetime"
    if now - session.seen >= idle:
        return "idle"
    return None


class SessionKeys:
    """Seals and opens session cookies and makes the CSRF tokens, all under one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, purpose: bytes, value: str) -> str:
        return _b64(hmac.new(self._key, purpose + value.encode("utf-8", "surrogateescape"), hashlib.sha256).digest())

    def seal(self, session: Session) -> str:
        payload = _b64(orjson.dumps([session.admin, session.issued, session.seen, session.sid, session.fingerprint]))
        return f"{payload}.{self._mac(_SESSION, payload)}"

    def open(self, cookie: str | None) -> Session | None:
        """The session a cookie holds, or None when it is missing, malformed or not signed by this key."""
        # A sealed cookie is ASCII (base64 and a dot); anything else is no session of ours. compare_digest
        # raises TypeError on a str that is not ASCII: it compares bytes here, which it never refuses.
        if not cookie or not cookie.isascii() or cookie.count(".") != 1:
            return None
        payload, mac = cookie.split(".")
        if not hmac.compare_digest(mac.encode(), self._mac(_SESSION, payload).encode()):
            return None
        try:
            admin, issued, seen, sid, fingerprint = orjson.loads(_unb64(payload))
            return Session(str(admin), float(issued), float(seen), str(sid), str(fingerprint))
        except (ValueError, TypeError, binascii.Error):
            return None

    def csrf(self, session: Session) -> str:
        """The CSRF token of a session's forms."""
        return self._mac(_CSRF, session.sid)

    def csrf_valid(self, session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf(session).encode())

    def signin_token(self, nonce: str) -> str:
        """The sign-in form's CSRF token, bound to a random nonce in a cookie of its own (before any session)."""
        return self._mac(_SIGNIN, nonce)

    def signin_valid(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or token is None:
            return False
        return hmac.compare_digest(token.encode(), self.signin_token(nonce).encode())

    def outcome(self, session: Session, text: str) -> str:
        """A tag for an action's outcome carried in the URL it redirects to (the page after a POST shows it):
        bound to the session, so a link made by someone else cannot make the console say its words."""
        return self._mac(_OUTCOME, f"{session.sid}|{text}")

    def outcome_valid(self, session: Session, text: str, tag: str | None) -> bool:
        return tag is not None and hmac.compare_digest(tag.encode(), self.outcome(session, text).encode())

    def fingerprint(self, password_hash: str) -> str:
        return self._mac(_ADMIN, password_hash)[:22]
