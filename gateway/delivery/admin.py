"""Operator actions on queued messages (retry now, requeue, delete), each recorded in the message's ledger
record. One code path for every way in: `smtp-gateway queue ...`, and any other admin surface."""

from __future__ import annotations

import getpass
import socket
from collections.abc import Mapping
from typing import Any

from gateway.core.records import CallRow
from gateway.ledger import model
from gateway.ledger.model import RecipientState
from gateway.ledger.recorder import Recorder, addresses
from gateway.queue.store import QueueStore


def operator_name() -> str:
    """Who acts, as the timeline shows it: the local user at this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "operator"
    return f"{user}@{socket.gethostname()}"


def _calls(info: Mapping[str, Any]) -> list[CallRow]:
    return [
        CallRow(c["key"], c["recipients"], c["state"], c["upstream_id"], c["error"], c["lost"])
        for c in info.get("calls", [])
    ]


class QueueAdmin:
    def __init__(self, store: QueueStore, ledger: Recorder) -> None:
        self.store = store
        self.ledger = ledger

    async def retry(self, msg_id: str, now: float) -> bool:
        """A queued message due now. False: unknown, in flight or dead (see requeue)."""
        info = await self.store.show(msg_id)
        if info is None or not await self.store.retry_now(msg_id, now):
            return False
        self.ledger.operator(
            msg_id=msg_id, created=info["created"], action=model.RETRIED, detail="made due now by an operator"
        )
        return True

    async def requeue(self, msg_id: str, now: float, max_lifetime: float) -> bool:
        """A dead letter back in the queue with a fresh lifetime; its refused calls are tried again."""
        info = await self.store.show(msg_id)
        if info is None or not await self.store.requeue(msg_id, now, max_lifetime):
            return False
        back: dict[str, tuple[RecipientState, str | None]] = {}
        for call in _calls(info):
            if call.state != "done":
                back.update({a: ("deferred", "requeued by an operator") for a in addresses(call)})
        self.ledger.operator(
            msg_id=msg_id,
            created=info["created"],
            action=model.REQUEUED,
            detail=f"dead letter requeued by an operator (was: {info.get('dead_reason')})",
            changed=back,
        )
        return True

    async def delete(self, msg_id: str) -> bool:
        """A queued message or dead letter deleted (not while its call runs): its unsent recipients are dead."""
        info = await self.store.show(msg_id)
        if info is None or not await self.store.delete(msg_id):
            return False
        reason = model.DELETED_BY_OPERATOR
        gone: dict[str, tuple[RecipientState, str | None]] = {}
        for call in _calls(info):
            if call.state != "done":
                gone.update({a: ("dead", reason) for a in addresses(call)})
        self.ledger.operator(msg_id=msg_id, created=info["created"], action=model.DELETED, detail=reason, changed=gone)
        return True
