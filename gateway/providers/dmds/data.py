"""Pure: what a DMDS login (Principal.extra) and a DMDS message (Submission.params) carry through the core
and the queue, with their JSON as the queue stores it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from gateway.core.model import TypedData


@dataclass(frozen=True, slots=True)
class DmdsLogin(TypedData):
    """A login's campaign rules: its own campaign (a configured user's, or the SMTP-API login's), the
    campaign from a "[NN]" Subject prefix (the SMTP-DMDS sandbox login), or chosen by X-Gateway-Campaign."""

    campaign: int | None = None
    campaign_from_subject: bool = False
    may_choose_campaign: bool = False

    def to_json(self) -> Mapping[str, Any]:
        return {
            "campaign": self.campaign,
            "campaign_from_subject": self.campaign_from_subject,
            "may_choose_campaign": self.may_choose_campaign,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        # Logins stored with only the keys that applied to them ({"campaign": 22}) are read as well.
        campaign = data.get("campaign")
        return cls(
            campaign=None if campaign is None else int(campaign),
            campaign_from_subject=bool(data.get("campaign_from_subject")),
            may_choose_campaign=bool(data.get("may_choose_campaign")),
        )


@dataclass(frozen=True, slots=True)
class DmdsParams(TypedData):
    """A message's decisions made at acceptance: its campaign, whether DMDS archives it, the batch (eeid)
    it joins when the client named one (X-Gateway-Batch), and whether each contact gets a call of its own
    (a message with a Reply-To: gateway/providers/dmds/legs.py)."""

    campaign: int
    archive: bool = False
    batch: str | None = None
    one_contact_per_call: bool = False

    def to_json(self) -> Mapping[str, Any]:
        return {
            "campaign": self.campaign,
            "archive": self.archive,
            "batch": self.batch,
            "one_contact_per_call": self.one_contact_per_call,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        # Messages queued before one_contact_per_call existed keep the calls they were planned with.
        return cls(
            campaign=int(data["campaign"]),
            archive=bool(data.get("archive")),
            batch=data.get("batch") or None,
            one_contact_per_call=bool(data.get("one_contact_per_call")),
        )
