"""Typed errors raised by pure modules; each carries the SMTP reply the edge sends.

    GatewayError
     ├── Rejected        permanent: answered 5xx, never retried
     │    ├── PolicyRejected      sender/recipient/header policy
     │    ├── ContentRejected     unparseable or unacceptable message
     │    └── UpstreamRejected    the API refused the content
     └── Deferred        temporary: answered 4xx, or spooled and retried
          ├── UpstreamUnavailable 5xx, 429, timeouts, connection errors
          ├── UpstreamAuthFailed  the API refused the gateway's key (operator error)
          └── DnsTempFailure      DNS lookups timed out
"""

from __future__ import annotations

from gateway import replies
from gateway.replies import Reply


class GatewayError(Exception):
    default_reply: Reply = replies.INTERNAL_ERROR

    def __init__(self, reason: str = "", reply: Reply | None = None) -> None:
        super().__init__(reason or (reply or self.default_reply).text)
        self.reason = reason or (reply or self.default_reply).text
        self.reply = reply or (self.default_reply.with_text(reason) if reason else self.default_reply)


class Rejected(GatewayError):
    default_reply = replies.INVALID_CONTENT


class PolicyRejected(Rejected):
    default_reply = replies.SENDER_NOT_OWNED


class ContentRejected(Rejected):
    default_reply = replies.INVALID_CONTENT


class UpstreamRejected(Rejected):
    default_reply = replies.UPSTREAM_REFUSED


class Deferred(GatewayError):
    default_reply = replies.UPSTREAM_UNAVAILABLE


class UpstreamUnavailable(Deferred):
    default_reply = replies.UPSTREAM_UNAVAILABLE


class UpstreamAuthFailed(Deferred):
    default_reply = replies.UPSTREAM_AUTH


class DnsTempFailure(Deferred):
    default_reply = replies.DNS_TEMPFAIL


class SpoolUnavailable(Deferred):
    default_reply = replies.SPOOL_FULL
