"""Typed errors raised by pure modules; each carries the SMTP reply the edge sends.

GatewayError
 ├── Rejected        permanent: answered 5xx, never retried
 │    ├── PolicyRejected      sender/recipient/header policy
 │    ├── ContentRejected     unparseable or unacceptable message
 │    └── UpstreamRejected    the API refused the content
 └── Deferred        temporary: answered 4xx, or spooled and retried
      ├── UpstreamUnavailable 5xx, 429, or the request never reached the upstream (safe to resend)
      │    ├── AnswerLost      the request was sent but no complete answer came back (read
      │    │                   timeout, reset after sending): the upstream MAY have the message
      │    └── RateLimited     the upstream (429) or our own limiter said "not now"
      ├── UpstreamAuthFailed  the API refused the gateway's key (operator error)
      ├── DnsTempFailure      DNS lookups timed out
      ├── SpoolUnavailable    the queue cannot store the message
      │    ├── QueueUnreachable  its database server cannot be reached at all
      │    └── SpillFailed       a large message's temporary file cannot be written (disk full, I/O error)
      └── Fenced              a call not sent: this process's lease on its message is over (or cannot
                              be checked), another owner may be sending it
"""

from __future__ import annotations

from gateway.core import replies
from gateway.core.replies import Reply


class GatewayError(Exception):
    """`reason` is for the log; `reply` for the client. A refusal's reason is what the client must read
    (the upstream's own words); a temporary failure's is internal (timeouts, status codes, library
    names) and the client gets the reply table's generic text."""

    default_reply: Reply = replies.INTERNAL_ERROR
    reason_in_reply = False

    def __init__(self, reason: str = "", reply: Reply | None = None) -> None:
        super().__init__(reason or (reply or self.default_reply).text)
        self.reason = reason or (reply or self.default_reply).text
        if reply is None:
            reply = self.default_reply.with_text(reason) if reason and self.reason_in_reply else self.default_reply
        self.reply = reply


class Rejected(GatewayError):
    default_reply = replies.INVALID_CONTENT
    reason_in_reply = True


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


class AnswerLost(UpstreamUnavailable):
    """The request went out and its answer was lost: resending it may deliver a second copy."""


class AnswerInvalid(AnswerLost):
    """What came back after the request was sent is not HTTP (a malformed status line or header: a proxy, a
    wrong port, a broken server): whether the request was acted on is as unknown as for a lost answer."""


class AnswerTooLarge(AnswerLost):
    """The answer was bigger than the gateway reads (gateway.upstream.client.MAX_RESPONSE): not read, so as lost
    as any other; a reader that asked for it (an event page) can ask for less."""


class RateLimited(UpstreamUnavailable):
    default_reply = replies.RATE_LIMITED

    def __init__(self, reason: str = "", reply: Reply | None = None, retry_after: float | None = None) -> None:
        super().__init__(reason, reply)
        self.retry_after = retry_after


class UpstreamAuthFailed(Deferred):
    default_reply = replies.UPSTREAM_AUTH


class DnsTempFailure(Deferred):
    default_reply = replies.DNS_TEMPFAIL


class SpoolUnavailable(Deferred):
    default_reply = replies.SPOOL_FULL


class QueueUnreachable(SpoolUnavailable):
    """The queue's database server cannot be reached (refused, unknown host, timeout): not a wrong database."""


class QueueBusy(SpoolUnavailable):
    """The queue's database answers but did not serve in time: a lock held by another session past the
    queue's lock_timeout, a statement past its statement_timeout (the server cancelled it: a definite
    rollback, nothing written), or every pooled connection in use. 452 4.3.1, as SQLite's busy timeout; not an
    outage (the circuit stays closed)."""


class PoolExhausted(QueueBusy):
    """Every pooled connection of this instance in use while the database answers: this instance's own overload
    (another instance may store the message), where a lock or a slow statement is every instance's."""


class SpillFailed(SpoolUnavailable):
    """A write to a message's spill file failed (ENOSPC, EDQUOT, EIO: gateway/core/spill.py): 452 4.3.1, as
    when DATA cannot be written to it. `directory`: the file's (limits.spill_dir); `error`: the system's words."""

    def __init__(self, reason: str, *, directory: str, error: str) -> None:
        super().__init__(reason)
        self.directory = directory
        self.error = error


class QueueTooNew(SpoolUnavailable):
    """The queue was written by a newer version of the gateway (its schema version is above this one's): not
    an outage that passes, so `serve` refuses to start on it rather than answer 452 to every queued message."""


class Fenced(Deferred):
    """The fencing check before a call failed: the message's lease is not this process's any more (it was
    paused past it, and another owner may have claimed it), or the queue could not say (`checked` False).
    The call was not sent: safe to send later, by whoever holds the message then."""

    def __init__(self, reason: str, *, checked: bool = True) -> None:
        super().__init__(reason)
        self.checked = checked
