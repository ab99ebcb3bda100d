"""Test mode: a test login's message goes through everything a real one does (AUTH, policy, parsing, the
provider's decisions and plan, the requests built) except the upstream call, and is answered with an id that
says so: `250 2.0.0 Ok: queued as TEST-<id>`. What would have been sent is logged and handed to a recorder
(the message ledger records it), without secrets or attachment contents."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from gateway.core import replies
from gateway.core.model import Receipt, Submission
from gateway.core.replies import Reply
from gateway.delivery.owner import new_id

PREFIX = "TEST-"
# Where a test message's requests go besides the log: (test id, submission, requests as Provider.requests).
TestRecorder = Callable[[str, Submission, list[dict[str, Any]]], None]


def accept(
    requests: list[dict[str, Any]],
    submission: Submission,
    bound: structlog.typing.FilteringBoundLogger,
    receipt: Receipt,
    recorder: TestRecorder | None = None,
) -> Reply:
    """The reply to a test login's message, whose provider built `requests` (Provider.requests); nothing is
    sent, nothing is queued."""
    test_id = PREFIX + new_id()
    receipt.queue_id = test_id
    bound.info("message_test_mode", test_id=test_id, calls=len(requests), requests=requests)
    if recorder is not None:
        recorder(test_id, submission, requests)
    return replies.queued(test_id)
