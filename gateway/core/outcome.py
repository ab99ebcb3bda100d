"""Pure: the per-call results of one delivery attempt, keyed by the provider's opaque call keys, and what the
delivery owner needs of a provider to make an attempt (Deliverer; gateway.providers.base.Provider is one)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from gateway.core.errors import AnswerLost, Deferred, Rejected
from gateway.core.model import Call, Submission

# Called by a provider right before it sends calls, with their keys: the delivery owner records that
# they may now reach the upstream (a lease that expires after this is an ambiguous call, not a safe one).
BeforeSend = Callable[[Sequence[str]], Awaitable[None]]
_E = TypeVar("_E", bound=BaseException)


async def no_hook(keys: Sequence[str]) -> None:
    return None


class Sent(Protocol):
    """A provider's answer to one call. It may also say how many mails the upstream says the call sent
    (an int `sent`, DMDS; copies included, and possibly fewer than the call's recipients): that is recorded
    in Outcome.sent, never read as a delivery."""

    @property
    def upstream_id(self) -> str: ...


@dataclass
class Outcome:
    """What one attempt learnt: each call attempted is delivered, deferred (temporary) or rejected.

    `skipped` calls were not attempted because the provider's call order made them wait for another
    call that did not succeed (DMDS: later calls join the first call's batch). A call that was sent but
    whose answer was lost is deferred with an AnswerLost: the upstream may have it (see `ambiguous`)."""

    delivered: dict[str, str] = field(default_factory=dict)  # call key -> upstream id
    # call key -> mails the upstream says the call sent, for the calls whose answer says (DMDS `sent`): what
    # the logs, the transaction's receipt and the message ledger record of it.
    sent: dict[str, int] = field(default_factory=dict)
    deferred: dict[str, Deferred] = field(default_factory=dict)
    rejected: dict[str, Rejected] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)
    # call key -> the unexpected exception (a bug) the call ended with. Its result is not known (the bug may
    # have struck after the request went): the delivery owner logs and counts each one as an internal error,
    # and the call stays pending while its siblings keep what they answered.
    failed: dict[str, Exception] = field(default_factory=dict)

    def defer(self, key: str, exc: Deferred) -> None:
        self.deferred[key] = _kept(exc)

    def reject(self, key: str, exc: Rejected) -> None:
        self.rejected[key] = _kept(exc)

    @property
    def ambiguous(self) -> set[str]:
        return {key for key, exc in self.deferred.items() if isinstance(exc, AnswerLost)}

    async def record_all(self, calls: Mapping[str, Awaitable[Sent]]) -> None:
        """Run `calls` (key -> the call) concurrently and record each one's result. Deferred and Rejected
        are the answers a call can have; any other exception is a bug in that call alone: it goes in `failed`
        and never costs the other calls their results (a delivered sibling forgotten would be sent again).
        A BaseException that is not an Exception (cancellation) is raised, after every result is recorded."""
        if len(calls) == 1:
            # Most messages make one call: awaited in place, as gather would wrap it in a task of its own (a
            # task and a turn of the event loop for every message).
            [(key, call)] = calls.items()
            try:
                self._record(key, await call)
            except Exception as exc:  # (Deferred, Rejected, or a bug; a cancellation is raised as it is)
                self._record(key, exc)
            return
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        stop: BaseException | None = None
        for key, result in zip(calls, results, strict=True):
            if isinstance(result, Exception) or not isinstance(result, BaseException):
                self._record(key, result)
            else:
                stop = stop or result
        if stop is not None:
            raise stop

    def _record(self, key: str, result: Sent | Exception) -> None:
        if isinstance(result, Deferred):
            self.defer(key, result)
        elif isinstance(result, Rejected):
            self.reject(key, result)
        elif isinstance(result, Exception):
            self.failed[key] = result  # its traceback is kept for the owner's log line
        else:
            self.delivered[key] = result.upstream_id
            count = getattr(result, "sent", None)
            if isinstance(count, int) and not isinstance(count, bool):
                self.sent[key] = count

    def sent_total(self) -> int | None:
        """Mails the upstream says this attempt's calls sent (None when no answer said)."""
        return sum(self.sent.values()) if self.sent else None

    def first_reason(self) -> str | None:
        for exc in (*self.rejected.values(), *self.deferred.values()):
            return exc.reason
        for bug in self.failed.values():
            return bug_reason(bug)
        return None


def bug_reason(exc: BaseException) -> str:
    """What a call that met a bug records as its error (the traceback is in the log line)."""
    return f"internal error (logged as delivery_internal_error): {type(exc).__name__}: {exc}"


def _kept(exc: _E) -> _E:
    """An answer kept without its traceback: its frames (the call's, holding the message and its request body)
    and the exception would otherwise keep each other, and the message, until the cyclic GC runs."""
    return exc.with_traceback(None)


class UpstreamHealth(Protocol):
    """Where a provider reports what its upstream said outside a delivery attempt (a lookup before the
    message is taken): gateway.delivery.health.AccountHealth, which the delivery owner also tells."""

    def failed(self, account: str, error: Deferred) -> None:
        """The upstream failed or refused the gateway (a refusal is counted, logged and shown by /readyz)."""
        ...

    def credentials_accepted(self, account: str) -> None:
        """The upstream accepted the gateway's credentials: a refusal, if any, is over."""
        ...


class NoHealth:
    """Reports going nowhere: a provider built outside a running gateway (the CLI, tests)."""

    def failed(self, account: str, error: Deferred) -> None:
        return None

    def credentials_accepted(self, account: str) -> None:
        return None


class Deliverer(Protocol):
    """What the delivery owner needs of one upstream account: its calls and a way to make them."""

    account: str

    def plan(self, submission: Submission) -> tuple[Call, ...]:
        """The calls this submission needs. Pure and deterministic: the retry worker plans again from
        the stored submission and skips the keys already delivered."""
        ...

    def requests(self, submission: Submission, *, bodies: bool = True) -> list[dict[str, Any]]:
        """The planned calls as they would be sent, for the message ledger: each {call, method, path, body}.
        Secrets are never in them (credentials travel in headers); each attachment's content is replaced by
        its size, and so is the message's text when `bodies` is false. Pure; the order and keys of plan()."""
        ...

    async def deliver(
        self, submission: Submission, done: Mapping[str, str], before_send: BeforeSend = no_hook
    ) -> Outcome:
        """Make every planned call whose key is not in `done` (key -> upstream id), in this provider's
        order, and report each one. Never raises for an upstream answer: it goes in the Outcome."""
        ...
